"""The training attention's bf16 products on AMX tiles (cpu/attention_amx*.{hpp,cpp}, driven by
cpu/ops_attention_train_bf16.cpp): P.v, dout.v^T and dS.k as in-place row products, dk and dv as
transposed sums (dk^T += q^T.dS, dv^T += dout^T.P). The tiles follow the bf16 GEMM's switch
(ops.bf16_gemm_kernel: QLORA_AMX=0 / emulate / real AMX where usable); QLORA_ATTN_AMX=0 keeps the
attention on the AVX512-BF16 tiles. The same values are rounded to bf16 as there; only the k order of
the fp32 sums differs (tdpbf16ps: per 32 k, even and odd products in two sums; dk, dv summed across
query blocks and heads in place), so the results stay within test_attention_bf16's float64 bound, differ
in bits from the AVX512-BF16 tiles (the AMX path really ran), and the emulated tiles (the same kernel
source, instructions per the Intel SDM) equal the real ones bit for bit where the CPU has AMX."""
import numpy as np
import pytest

from qlora_native import ops

from test_attention_bf16 import CASES, HAVE_BF16, check_vs_float64, float64_case, run

pytestmark = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU (the bf16 attention needs it)")

BE = "cpu:avx512"
# CASES (odd T, partial panels, hd 20..128) plus SmolLM2's attention (9 x 3 heads, hd 64, whole blocks)
AMX_CASES = CASES + [(1, 256, 9, 3, 64, "left")]


def run_env(monkeypatch, case, inputs, refs, amx, attn_amx=None):
    """out, lse, dq, dk, dv of the fused bf16 forward and backward under QLORA_AMX=amx (None: unset) and
    QLORA_ATTN_AMX=attn_amx."""
    for key, val in (("QLORA_AMX", amx), ("QLORA_ATTN_AMX", attn_amx)):
        if val is None:
            monkeypatch.delenv(key, raising=False)
        else:
            monkeypatch.setenv(key, val)
    monkeypatch.setenv("QLORA_ATTN_BACKWARD", "fused")
    q, k, v, mask, scale, dout = inputs
    Hq, Hkv = case[2], case[3]
    out_in, lse_in = refs[0].astype(np.float32), refs[1].astype(np.float32)
    return run(BE, q, k, v, mask, Hq, Hkv, scale, dout, out_in, lse_in)


def real_amx(monkeypatch):
    monkeypatch.delenv("QLORA_AMX", raising=False)
    return ops.bf16_gemm_kernel() == "amx-bf16"


@pytest.mark.parametrize("case", AMX_CASES, ids=[f"T{c[1]}-hd{c[4]}-{c[2]}x{c[3]}-{c[5]}" for c in AMX_CASES])
def test_attention_amx_within_bound_and_differs(rng, monkeypatch, case):
    inputs, refs, bnds = float64_case(rng, case)
    avx = run_env(monkeypatch, case, inputs, refs, "0")
    emu = run_env(monkeypatch, case, inputs, refs, "emulate")
    check_vs_float64("amx-emulated ", emu, refs, bnds)
    # QLORA_ATTN_AMX=0 wins over QLORA_AMX=emulate: the AVX512-BF16 tiles, bit for bit
    off = run_env(monkeypatch, case, inputs, refs, "emulate", "0")
    for x, y in zip(off, avx):
        np.testing.assert_array_equal(x, y)
    # the scores stay fp32 (lse unchanged); every bf16 product went through the tiles (other bits)
    np.testing.assert_array_equal(emu[1], avx[1])
    for name, x, y in zip(("out", "dq", "dk", "dv"), emu[::2] + emu[3:4], avx[::2] + avx[3:4]):
        assert not np.array_equal(x, y), f"{name}: AMX tiles gave the AVX512-BF16 bits"
    mask = inputs[3]
    assert np.all(emu[3][mask.reshape(-1) == 0] == 0) and np.all(emu[4][mask.reshape(-1) == 0] == 0)
    if real_amx(monkeypatch):  # the real tiles: the emulator's bits
        real = run_env(monkeypatch, case, inputs, refs, None)
        for name, x, y in zip(("out", "lse", "dq", "dk", "dv"), real, emu):
            np.testing.assert_array_equal(x, y, err_msg=name)


def test_attention_amx_real_tiles_ran(rng, monkeypatch):
    """Where the CPU has AMX the default run takes the real tiles: other bits than QLORA_ATTN_AMX=0."""
    if not real_amx(monkeypatch):
        pytest.skip("no usable AMX-BF16 (CPU or OS)")
    case = (2, 128, 6, 2, 64, "right")
    inputs, refs, bnds = float64_case(rng, case)
    real = run_env(monkeypatch, case, inputs, refs, None)
    off = run_env(monkeypatch, case, inputs, refs, None, "0")
    check_vs_float64("amx ", real, refs, bnds)
    for name, x, y in zip(("out", "dq", "dk", "dv"), real[::2] + real[3:4], off[::2] + off[3:4]):
        assert not np.array_equal(x, y), name
