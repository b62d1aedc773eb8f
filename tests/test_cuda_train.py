"""Training plumbing on device backends (issue 11): activation offload for gradient checkpointing,
the optimizer step on the adapter's contiguous buffers through the backend ops, training on
"cpu:devsim" (the CPU kernels behind CUDA's op table and a device face) equal to the CPU backend,
and a resume across backends. CUDA cases run only with a GPU (skipped with the reason otherwise).
"""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig, _core

from helpers_tiny import build_tiny

HAVE_GPU = _core.cuda_device_count() > 0
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason=f"no CUDA GPU: {_core.cuda_device_summary()}"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), num_hidden_layers=3)


def _model(path, backend, quantize="nf4", dropout=0.0, seed=3):
    m = qlora_native.Model.from_pretrained(path, quantize=quantize, backend=backend, tokenizer=None)
    m.add_adapter("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"), seed=seed)
    m.set_adapter("a")
    return m


def _batch(seed=0, B=2, T=12, V=64):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(B, T)).astype(np.int32)
    labels = ids.copy()
    labels[:, :3] = -100
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, labels, mask


def _grads(m):
    return {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim", CUDA])
def test_offload_checkpoints_bit_identical(tiny, backend):
    """Offloading the checkpointed layer inputs gives the same loss and gradients bit for bit, and
    the pass keeps (layers - 1) fewer [tokens, hidden] buffers in backend memory."""
    m = _model(tiny, backend)
    ids, labels, mask = _batch()
    assert m.offload_checkpoints is False
    m.gradient_checkpointing = True
    m.zero_grad()
    loss0 = m.forward_backward(ids, labels, mask)
    peak0 = m.last_train_peak_bytes
    g0 = _grads(m)
    m.offload_checkpoints = True
    assert m.offload_checkpoints is True
    for _ in range(2):  # the second pass reuses the cached host staging
        m.zero_grad()
        loss1 = m.forward_backward(ids, labels, mask)
        assert loss1 == loss0
        g1 = _grads(m)
        assert g1.keys() == g0.keys()
        for k in g0:
            np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)
    M, D, L = ids.size, m.config.hidden_size, m.config.num_hidden_layers
    assert peak0 - m.last_train_peak_bytes == (L - 1) * M * D * 4
    with pytest.raises(ValueError, match="bool"):
        m.offload_checkpoints = 1
