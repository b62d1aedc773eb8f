"""The fp32 GEMM driver's panel fusion (cpu/gemm.cpp run_panels): a task whose rows are one A block
(M <= MC) packs each B micro-panel right before its micro-kernel calls instead of all of a column
block's panels first. Same micro-kernel calls per C tile, so bit-identical to QLORA_GEMM_PANEL_FUSE=0
and within the fp32 bound of float64, at both SIMD levels, 1 and 2 threads (the task grid and the
shared-A driver); shapes with one and several row blocks, several column blocks (NC = 1024) and depth
blocks, a ragged last tile and panel, nn and nt (the NF4 and Q8_0 GEMMs pass their own packers to the
same driver: tests/test_lm_head_f32_q8.py)."""
import pytest

from helpers_gemm import switch_keeps_bits

SHAPES = [(17, 100, 70), (40, 33, 1500), (256, 1100, 576), (300, 2050, 2100), (100, 45, 80), (1031, 70, 96)]


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_panel_fuse_bit_identical(rng, monkeypatch, threads, backend, layout):
    switch_keeps_bits(rng, monkeypatch, "QLORA_GEMM_PANEL_FUSE", backend, layout, SHAPES)
