"""The qlora-native command line on a tiny random model with a sentencepiece tokenizer."""
import shutil

import numpy as np
import pytest

from helpers_model import make_checkpoint
from helpers_tokenizer import train_sentencepiece
from qlora_native import Model, Tokenizer
from qlora_native.cli import main


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    sp = train_sentencepiece(tmp, vocab_size=1000)
    path, _, _ = make_checkpoint(tmp, rng, vocab=1000)
    shutil.copy(sp, f"{path}/tokenizer.model")
    return path


def test_generate_prompt_streams_greedy_text(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "the old house", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    model = Model.from_pretrained(tiny_model_dir, tokenizer=tok)
    want = model.generate([tok.encode("the old house")], max_new_tokens=6, eos_token_id=sorted(tok.eos_token_ids))[0]
    assert captured.out.strip() == tok.decode(want, skip_special_tokens=True).strip()


def test_generate_bad_model_path_is_an_error(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)):
        main(["generate", "--model", str(tmp_path / "nope"), "--prompt", "x"])
