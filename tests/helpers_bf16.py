"""bf16 test helpers: RNE rounding as the hardware does, the bf16 GEMM bound, and the bf16 training
tests' model, error measures and PEFT references (torch imported only inside peft_references).

U = 2^-8 is bf16's unit roundoff bound per rounded operand; EPS32 float32's machine epsilon."""
import os

import numpy as np
import pytest

from qlora_native import ops

EPS32 = float(np.finfo(np.float32).eps)
U = 2.0 ** -8
HAVE_BF16 = ops.bf16_compute_available("cpu")
needs_bf16 = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU (bf16 mode runs fp32)")
# The bf16 training tests' model (test_lora_model.build) and adapter.
TINY = dict(nf4=True, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100, layers=2)
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def env_fixture(*keys):
    """A test fixture `env` (assign it to a module-level name `env`): yields os.environ and afterwards
    restores each of `keys` (the QLORA_* switches a test sets) to its value before the test, or unset."""
    @pytest.fixture
    def env():
        saved = {k: os.environ.get(k) for k in keys}
        yield os.environ
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return env


def bf16(x):
    """numpy RNE rounding to bf16 (denormals flushed, as the hardware), returned as float64."""
    b = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000).astype(np.uint32)
    r = np.where((b & 0x7F800000) == 0, b & 0x80000000, r).astype(np.uint32)
    return r.view(np.float32).astype(np.float64)


def check(c, a, b, K, alpha=1.0, beta=0.0, c0=None):
    """c vs alpha * a @ b + beta * c0 (a [M, K], b [K, N], fp32): within (K + 4) eps32 |a|·|b| of the
    product of the bf16-rounded operands (fp32 accumulation), and 2u + u^2 more of the exact one."""
    exact = alpha * (a.astype(np.float64) @ b.astype(np.float64))
    rounded = alpha * (bf16(a) @ bf16(b))
    scale = abs(alpha) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    if c0 is not None and beta != 0.0:
        exact = exact + beta * c0.astype(np.float64)
        rounded = rounded + beta * c0.astype(np.float64)
        scale = scale + abs(beta) * np.abs(c0.astype(np.float64))
    acc = (K + 4) * EPS32 * scale + 1e-30
    assert np.all(np.abs(c - rounded) <= acc), float(np.max(np.abs(c - rounded) / acc))
    assert np.all(np.abs(c - exact) <= (2 * U + U * U) * scale + acc)


def strided(rng, rows, cols, pad=3):
    """A float32 [rows, cols] view with row stride cols + pad (not contiguous)."""
    return rng.standard_normal((rows, cols + pad)).astype(np.float32)[:, :cols]


def global_rel(got, want):
    """Relative Frobenius error over all tensors of `want` together, in float64."""
    num = sum(float(np.sum((np.asarray(got[k], np.float64) - want[k]) ** 2)) for k in want)
    return np.sqrt(num / sum(float(np.sum(np.asarray(want[k], np.float64) ** 2)) for k in want))


def max_rel(got, want):
    """The largest per-tensor relative Frobenius error."""
    return max(float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want)


def engine_pass(model, ids, mask, labels):
    model.zero_grad()
    loss = model.forward_backward(ids, labels, mask)
    return loss, model.get_adapter_gradients()


def peft_references(model, cfg, ref, tmp_path, ids, mask, labels):
    """The two references of adapter "a" (model, cfg, ref from test_lora_model.build): transformers +
    PEFT in float64 (the exact one) and PEFT in float32 under torch.autocast("cpu", bfloat16), the
    usual bf16 QLoRA recipe. Returns (loss64, float64 gradients, autocast gradients as float64)."""
    import torch
    from test_lora_model import peft_reference
    from test_train_parity import peft_grads, torch_loss

    pm = peft_reference(model, cfg, ref, "a", tmp_path)
    loss64 = torch_loss(pm, ids, mask, labels)
    loss64.backward()
    pm32 = peft_reference(model, cfg, ref, "a", tmp_path / "ac", "float32")
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        loss_ac = torch_loss(pm32, ids, mask, labels)
    loss_ac.backward()  # outside autocast, as torch advises (bit-identical to inside on these tests)
    return loss64.item(), peft_grads(pm), peft_grads(pm32)
