import os

import numpy as np
import pytest

from helpers_smollm import SMOLLM_FILE, require_smollm
from qlora_native.gguf_source import GGUFSource, _unpermute_rows


def test_unpermute_inverts_llama_cpp_permute(rng):
    # llama.cpp's convert_hf_to_gguf.py permute(), written independently here as the reference.
    def permute(w, n_head):
        return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for n_head, out, inp in [(4, 32, 8), (3, 24, 5), (1, 8, 3)]:
        w = rng.standard_normal((out, inp)).astype(np.float32)
        np.testing.assert_array_equal(_unpermute_rows(permute(w, n_head), n_head), w)


def test_not_a_gguf_is_a_clear_error(tmp_path):
    from qlora_native import FormatError

    p = tmp_path / "bad.gguf"
    p.write_bytes(b"GGUF" + os.urandom(64))
    with pytest.raises(FormatError, match="not a readable GGUF"):
        GGUFSource(p)
    with pytest.raises(FileNotFoundError):
        GGUFSource(tmp_path / "missing.gguf")


@pytest.mark.slow
def test_smollm_gguf_matches_transformers_gguf_loader():
    """Our GGUF -> HF conversion equals transformers' own GGUF loader, tensor by tensor."""
    path = require_smollm()
    transformers = pytest.importorskip("transformers")
    src = GGUFSource(path)
    cfg = src.config
    assert cfg["hidden_size"] == 576 and cfg["num_hidden_layers"] == 30
    assert cfg["num_attention_heads"] == 9 and cfg["num_key_value_heads"] == 3 and cfg["head_dim"] == 64
    assert cfg["tie_word_embeddings"] is True and cfg["vocab_size"] == 49152
    ref = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=SMOLLM_FILE)
    ref_sd = {k: v.float().numpy() for k, v in ref.state_dict().items()}
    tcfg = ref.config
    assert tcfg.rope_theta == pytest.approx(cfg["rope_theta"]) if hasattr(tcfg, "rope_theta") else True
    assert tcfg.rms_norm_eps == pytest.approx(cfg["rms_norm_eps"])
    seen = 0
    for name, w in src.tensors():
        np.testing.assert_array_equal(np.asarray(w), ref_sd[name], err_msg=name)
        seen += 1
    assert seen == 30 * 9 + 2
