"""The fp32 GEMM's row walk for shallow depth (cpu/gemm.cpp run_task, K <= 64: LoRA's rank-r expand
C += s·t·Bᵀ and the grouped dX = dt·A): a tile row runs across all column panels before the next
tile row. Same tiles through the same micro-kernel calls, so the result is bit-identical to the
panel-major order (QLORA_GEMM_ROW_WALK=0) and within the fp32 bound of float64, at both SIMD
levels that share the driver; shapes span several row blocks (MC), column blocks (NC = 1024), a
ragged last tile and panel, and K at and just over the limit."""
import pytest

from helpers_gemm import switch_keeps_bits

SHAPES = [(1, 40, 1), (300, 1100, 16), (1031, 70, 48), (97, 2049, 64), (45, 33, 65)]


@pytest.mark.parametrize("backend", ["cpu:avx512", "cpu:avx2"])
@pytest.mark.parametrize("layout", ["nt", "nn"])
def test_row_walk_bit_identical(rng, monkeypatch, backend, layout):
    switch_keeps_bits(rng, monkeypatch, "QLORA_GEMM_ROW_WALK", backend, layout, SHAPES)
