"""Our C++ dequantization of GGUF tensor types (cpp/src/gguf/dequant.cpp) against the `gguf`
package's numpy reference (gguf.quants.dequantize), bit for bit, on random blocks: every byte
random (scales included, so subnormal, infinite and NaN scales occur), and real quantized data."""
import numpy as np
import pytest

from qlora_native import _core

gguf = pytest.importorskip("gguf")
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the reference on NaN / inf scales

TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K"]


def ours(t, raw: np.ndarray, n: int) -> np.ndarray:
    return _core.gguf.dequantize(int(t), raw.reshape(-1), n)


def reference(t, raw: np.ndarray, rows: int) -> np.ndarray:
    out = dequantize(raw.reshape(rows, -1), t)
    return np.asarray(out, dtype=np.float32).reshape(-1)


def assert_bits_equal(a: np.ndarray, b: np.ndarray, what: str):
    a, b = a.view(np.uint32), b.view(np.uint32)
    bad = np.flatnonzero(a != b)
    assert bad.size == 0, f"{what}: {bad.size} of {a.size} values differ, first at {bad[0]}: " \
                          f"{a[bad[0]]:#010x} vs {b[bad[0]]:#010x}"


@pytest.mark.parametrize("name", TYPES)
def test_random_blocks_bit_exact(name, rng):
    t = Q[name]
    block, size = GGML_QUANT_SIZES[t]
    assert _core.gguf.type_traits(int(t)) == (block, size)
    assert _core.gguf.dequant_supported(int(t))
    rows, blocks_per_row = 8, max(1, 512 // block)
    raw = rng.integers(0, 256, rows * blocks_per_row * size, dtype=np.uint8)
    n = rows * blocks_per_row * block
    assert_bits_equal(ours(t, raw, n), reference(t, raw, rows), name)


@pytest.mark.parametrize("name", ["BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
def test_quantized_weights_bit_exact(name, rng):
    """Blocks as a converter writes them (finite scales), quantized by the gguf package."""
    t = Q[name]
    w = (rng.standard_normal((16, 256)) * 0.05).astype(np.float32)
    raw = quantize(w, t)
    assert_bits_equal(ours(t, np.ascontiguousarray(raw), w.size), reference(t, raw, 16), name)


def test_special_halves():
    """Every fp16 bit pattern (zeros, subnormals, infinities, NaN payloads) as numpy converts it."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8)
    assert_bits_equal(ours(Q.F16, raw, 1 << 16), np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(
        np.float32), "F16")


def test_bad_arguments_are_value_errors():
    with pytest.raises(ValueError, match="multiple of the block size 32"):
        _core.gguf.dequantize(int(Q.Q8_0), np.zeros(34, np.uint8), 31)
    with pytest.raises(ValueError, match="need 34 bytes, got 33"):
        _core.gguf.dequantize(int(Q.Q8_0), np.zeros(33, np.uint8), 32)
    with pytest.raises(ValueError, match="cannot dequantize GGUF type IQ4_NL"):
        _core.gguf.dequantize(int(Q.IQ4_NL), np.zeros(18, np.uint8), 32)
    with pytest.raises(ValueError, match="unknown GGML type 4"):
        _core.gguf.dequantize(4, np.zeros(18, np.uint8), 32)
    assert not _core.gguf.dequant_supported(int(Q.Q8_K))
