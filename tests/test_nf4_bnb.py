"""NF4 codec parity with bitsandbytes on CPU (quantize_4bit / dequantize_4bit, compress_statistics)."""
import numpy as np
import pytest

from qlora_native import nf4

torch = pytest.importorskip("torch")
bnb_f = pytest.importorskip("bitsandbytes.functional")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def to_numpy_input(w32, dtype):
    """(numpy array for nf4.quantize, torch tensor for bitsandbytes) holding the same values."""
    t = torch.from_numpy(w32).to(TORCH_DTYPES[dtype])
    if dtype == "bfloat16":
        import ml_dtypes
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), t
    return t.numpy(), t


def bnb_quant_state_of(t):
    """A bitsandbytes QuantState holding OUR arrays (to decode them with bitsandbytes). Its shape
    is flat: bitsandbytes 0.50's CPU dequantize_4bit kernel mis-decodes 2-D tensors whose blocks
    straddle rows (blocksize > row length, e.g. [513, 64] with block 512), even its own output."""
    state2 = None
    if t.double_quant:
        state2 = bnb_f.QuantState(absmax=torch.from_numpy(t.nested_absmax), code=torch.from_numpy(t.nested_map.copy()),
                                  blocksize=256, dtype=torch.float32)
    return bnb_f.QuantState(
        absmax=torch.from_numpy(t.absmax), shape=torch.Size([int(np.prod(t.shape))]), code=bnb_f.get_4bit_type("nf4", device="cpu"),
        blocksize=t.blocksize, quant_type="nf4", dtype=TORCH_DTYPES[t.dtype],
        offset=torch.tensor(np.float32(t.offset)) if t.double_quant else None, state2=state2)


def test_tables_match_bitsandbytes():
    np.testing.assert_array_equal(nf4.dynamic_map(), bnb_f.create_dynamic_map().numpy())
    np.testing.assert_array_equal(nf4.nf4_codes(), bnb_f.get_4bit_type("nf4", device="cpu").numpy())


CASES = [((96, 200), 64), ((33, 65), 64), ((1,), 64), ((7, 3), 32), ((129, 257), 128), ((64 * 300 + 17,), 64),
         ((40, 1024), 4096), ((3, 2048), 2048), ((513, 64), 512), ((256, 256), 1024), ((1000,), 256)]


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,blocksize", CASES, ids=[f"{s}-{b}" for s, b in CASES])
def test_matches_bitsandbytes(rng, dtype, shape, blocksize):
    w32 = (rng.standard_normal(shape) * np.exp(rng.uniform(-2, 2))).astype(np.float32)
    w, wt = to_numpy_input(w32, dtype)
    t = nf4.quantize(w, blocksize, True)
    q, st = bnb_f.quantize_4bit(wt, blocksize=blocksize, quant_type="nf4", compress_statistics=True)
    # Level 1: identical nibbles (bitsandbytes keeps them as [(n+1)//2, 1]).
    assert tuple(q.shape) == (t.packed.size, 1)
    np.testing.assert_array_equal(q.numpy().reshape(-1), t.packed)
    # Level 2: offset (torch's float32 mean vs our compensated double mean) within a few ulps;
    # nested absmax follows; codes within one step (bitsandbytes CPU uses a lookup table).
    eps = np.finfo(np.float32).eps
    assert abs(st.offset.item() - t.offset) <= 4 * eps * abs(t.offset)
    np.testing.assert_allclose(st.state2.absmax.numpy(), t.nested_absmax, rtol=8 * eps, atol=8 * eps * abs(t.offset))
    ours, theirs = t.absmax.astype(int), st.absmax.numpy().astype(int)
    live = np.repeat(t.nested_absmax > 0, 256)[: ours.size]  # a zero nested absmax: bnb computes 0/0
    # bitsandbytes CPU picks codes through a 65,536-bin table over [-1, 1]: near 0, where the
    # dynamic map's entries are far denser than its bins (1e-7 apart vs 3e-5), it can be several
    # codes off; elsewhere at most one. So: one code step, or within one table bin in value.
    dmap = nf4.dynamic_map().astype(np.float64)
    close = (np.abs(ours - theirs) <= 1) | (np.abs(dmap[ours] - dmap[theirs]) <= 2.0 / 65536)
    assert np.all(close[live])
    assert np.mean(ours[live] != theirs[live]) < 0.01 if live.sum() > 1000 else True
    # bitsandbytes decodes OUR arrays to exactly what we decode.
    ref = bnb_f.dequantize_4bit(torch.from_numpy(t.packed).reshape(-1, 1), bnb_quant_state_of(t))
    np.testing.assert_array_equal(ref.float().numpy().reshape(-1), t.dequantize(dtype).astype(np.float32).reshape(-1))
    # Its own tensor decodes within the double-quant difference (<= one nested step per block).
    st.shape = torch.Size([w32.size])  # flat: see bnb_quant_state_of
    theirs_deq = bnb_f.dequantize_4bit(q, st).float().numpy().astype(np.float64).reshape(shape)
    ours_deq = t.dequantize().astype(np.float64)
    step = np.max(np.diff(nf4.dynamic_map().astype(np.float64)))
    bound = np.repeat((step * t.nested_absmax.astype(np.float64))[:, None], 256 * blocksize).reshape(-1)[: w32.size]
    tol = bound.reshape(shape) + 2 * eps * np.abs(ours_deq) + (0 if dtype == "float32" else 2 ** -7 * np.abs(ours_deq))
    assert np.all(np.abs(theirs_deq - ours_deq) <= tol + 8 * eps * abs(t.offset))


@pytest.mark.parametrize("blocksize", [64, 256])
def test_matches_bitsandbytes_without_double_quant(rng, blocksize):
    w = rng.standard_normal((77, 131)).astype(np.float32)
    w[3] = 0.0  # zero blocks: nibble 7 on CPU
    t = nf4.quantize(w, blocksize, False)
    q, st = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=blocksize, quant_type="nf4", compress_statistics=False)
    np.testing.assert_array_equal(q.numpy().reshape(-1), t.packed)
    np.testing.assert_array_equal(st.absmax.numpy(), t.absmax)
    np.testing.assert_array_equal(bnb_f.dequantize_4bit(q, st).numpy(), t.dequantize())


@pytest.mark.parametrize("scale", [1e30, 1e-30])
def test_huge_and_tiny_match_bitsandbytes(rng, scale):
    w = (rng.standard_normal((64, 96)) * scale).astype(np.float32)
    t = nf4.quantize(w)
    q, st = bnb_f.quantize_4bit(torch.from_numpy(w), blocksize=64, quant_type="nf4", compress_statistics=True)
    np.testing.assert_array_equal(q.numpy().reshape(-1), t.packed)
    assert np.all(np.abs(t.absmax.astype(int) - st.absmax.numpy().astype(int)) <= 1)


def test_quant_state_matches_bitsandbytes(rng):
    w = rng.standard_normal((96, 200)).astype(np.float32)
    w_bf16, wt = to_numpy_input(w, "bfloat16")
    t = nf4.quantize(w_bf16)
    _, st = bnb_f.quantize_4bit(wt, blocksize=64, quant_type="nf4", compress_statistics=True)
    ref = {k: v for k, v in st.as_dict().items() if not isinstance(v, torch.Tensor)}
    ref["shape"] = list(ref["shape"])
    ours = t.quant_state()
    assert ours.keys() == ref.keys()
    assert {k: v for k, v in ours.items() if k != "nested_offset"} == {k: v for k, v in ref.items() if k != "nested_offset"}
    assert abs(ours["nested_offset"] - ref["nested_offset"]) <= 4 * np.finfo(np.float32).eps * abs(ref["nested_offset"])
