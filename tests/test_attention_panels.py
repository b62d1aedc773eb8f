"""Issue 15: the training attention's fp32 products from K and V packed once per (batch, KV head)
into the GEMM panels, each query tile running only over the keys it sees (causal). They must give
the results of the per-block GEMMs (QLORA_ATTN_PANELS=0) bit for bit, at every SIMD level, on
shapes with partial tiles, padding, GQA and a last query block short enough for the GEMV route;
fp32 and bf16 compute (whose scores are fp32 products too); forward and the fused backward."""
import os

from helpers_attention import assert_same_bits, compute_dtypes, run_attention, simd_levels

CASES = [(2, 150, 4, 2, 20, "left"), (1, 70, 3, 1, 64, "right"), (2, 200, 6, 2, 32, "none"), (1, 12, 2, 2, 16, "none")]


def _run(path, levels, dtypes, panels):
    env = dict(os.environ, QLORA_ATTN_BACKWARD="fused")  # the backward way the panels serve, on any machine
    env.pop("QLORA_ATTN_PANELS", None)
    if not panels:
        env["QLORA_ATTN_PANELS"] = "0"
    return run_attention(path, CASES, 0, levels, dtypes, env)


def test_panels_bit_identical_to_block_gemms(tmp_path):
    levels, dtypes = simd_levels(), compute_dtypes()
    a = _run(str(tmp_path / "on.npz"), levels, dtypes, True)
    b = _run(str(tmp_path / "off.npz"), levels, dtypes, False)
    assert_same_bits(a, b)
