"""qlora_native.io safetensors reader/writer vs the `safetensors` package (the reference)."""
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy as stnp
from safetensors import safe_open as ref_safe_open

import qlora_native
from qlora_native import io as qio

BF16 = np.dtype(ml_dtypes.bfloat16)
# numpy dtype -> safetensors name, every dtype qlora::DType supports
DTYPES = {
    np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", BF16: "BF16",
    np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16", np.dtype(np.int8): "I8",
    np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32", np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8",
    np.dtype(np.bool_): "BOOL",
}


def random_array(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        a = rng.random(shape) < 0.5
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        a = rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    else:
        a = (rng.standard_normal(shape) * 100).astype(dtype)
    return np.asarray(a).reshape(shape)  # numpy returns scalars for shape ()


def random_tensors(rng):
    """Every dtype, with scalar, empty and multi-dimensional shapes mixed in."""
    shapes = [(), (0,), (3, 0, 2), (7,), (2, 3), (4, 1, 5)]
    out = {}
    for i, dt in enumerate(DTYPES):
        out[f"t{i}.{DTYPES[dt].lower()}"] = random_array(rng, dt, shapes[i % len(shapes)])
        out[f"m{i}"] = random_array(rng, dt, (int(rng.integers(1, 9)), int(rng.integers(1, 9))))
    return out


def ref_raw(path):
    """The reference's framework-free view: name -> (dtype name, shape, bytes)."""
    with open(path, "rb") as fh:
        return {n: (v["dtype"], tuple(v["shape"]), bytes(v["data"])) for n, v in safetensors.deserialize(fh.read())}


def assert_same(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()  # bitwise (NaN-safe, -0.0-safe)


def test_ours_to_reference_all_dtypes(tmp_path, rng):
    tensors = random_tensors(rng)
    meta = {"format": "np", "note": "ünïcode \"quoted\"\n"}
    p = tmp_path / "ours.safetensors"
    qio.save_safetensors(p, tensors, metadata=meta)
    raw = ref_raw(p)
    assert set(raw) == set(tensors)
    for name, arr in tensors.items():
        dt, shape, data = raw[name]
        assert (dt, shape) == (DTYPES[arr.dtype], arr.shape)
        assert data == arr.tobytes()
    # The numpy API of the reference (no BF16 support there) and its metadata.
    with ref_safe_open(str(p), framework="numpy") as f:
        assert f.metadata() == meta
        assert sorted(f.keys()) == sorted(tensors)
    no_bf16 = {k: v for k, v in tensors.items() if v.dtype != BF16}
    q = tmp_path / "nobf16.safetensors"
    qio.save_safetensors(q, no_bf16)
    loaded = stnp.load_file(str(q))
    for name, arr in no_bf16.items():
        assert_same(loaded[name], arr)


def test_reference_to_ours_all_dtypes(tmp_path, rng):
    tensors = random_tensors(rng)
    p = tmp_path / "ref.safetensors"
    stnp.save_file(tensors, str(p), metadata={"k": "v", "empty": ""})
    f = qio.safe_open(p)
    assert f.keys() == sorted(tensors)
    assert f.metadata() == {"k": "v", "empty": ""}
    for name, arr in tensors.items():
        got = f[name]
        assert_same(got, arr)
        assert f.dtype(name) == arr.dtype
        assert f.dtype_name(name) == DTYPES[arr.dtype]
        assert f.shape(name) == arr.shape


@pytest.mark.parametrize("meta", [None, {"format": "pt"}])
def test_byte_identical_to_reference(tmp_path, rng, meta):
    """Same tensor order (dtype alignment, then name), compact JSON and space padding as the reference."""
    tensors = random_tensors(rng)
    p = tmp_path / "ours.safetensors"
    qio.save_safetensors(p, tensors, metadata=meta)
    assert p.read_bytes() == stnp.save(tensors, metadata=meta)


def test_header_padded_and_data_aligned(tmp_path, rng):
    tensors = random_tensors(rng)
    tensors["odd.name.x"] = random_array(rng, np.uint8, (3,))
    p = tmp_path / "a.safetensors"
    qio.save_safetensors(p, tensors)
    n = int.from_bytes(p.read_bytes()[:8], "little")
    assert n % 8 == 0
    f = qio.safe_open(p)
    for name in f:
        a = f[name]
        if a.size:
            assert a.__array_interface__["data"][0] % a.dtype.itemsize == 0, name


def test_zero_copy_read_only(tmp_path, rng):
    x = random_array(rng, np.float32, (64, 33))
    b = random_array(rng, BF16, (5, 7))
    p = tmp_path / "z.safetensors"
    qio.save_safetensors(p, {"x": x, "b": b})
    f = qio.load_safetensors(p)
    a1, a2 = f["x"], f.get("x")
    assert np.shares_memory(a1, a2)  # two gets view the same mapped bytes
    assert not a1.flags.owndata and not a1.flags.writeable
    assert isinstance(a1.base, qlora_native._core.io.SafetensorsFile)
    with pytest.raises(ValueError):
        a1[0, 0] = 1.0
    with pytest.raises(ValueError):
        a1.flags.writeable = True
    bf = f["b"]
    assert bf.dtype == BF16 and not bf.flags.writeable and np.shares_memory(bf, f["b"])
    # The arrays keep the mapping alive after the file object is gone.
    del f
    import gc

    gc.collect()
    assert_same(a1, x)
    assert_same(bf, b)


def test_mapping_api(tmp_path, rng):
    p = tmp_path / "m.safetensors"
    qio.save_safetensors(p, {"b": random_array(rng, np.int8, (2,)), "a": random_array(rng, np.float16, ())})
    f = qio.safe_open(p)
    assert list(f) == ["a", "b"] and len(f) == 2 and "a" in f and "zz" not in f and 3 not in f
    assert f.shape("a") == () and f["a"].shape == ()
    assert f.get("missing") is None and f.metadata() == {}
    for call in (lambda: f["missing"], lambda: f.get_tensor("missing"), lambda: f.shape("missing"), lambda: f.dtype("missing")):
        with pytest.raises(KeyError):
            call()
    with qio.safe_open(p) as g:
        assert_same(g["b"], f["b"])


def test_noncontiguous_and_big_endian_inputs(tmp_path, rng):
    base = random_array(rng, np.float32, (6, 8))
    big = random_array(rng, np.int32, (4, 3)).astype(">i4")
    tensors = {"strided": base[:, ::2], "transposed": base.T, "big": big, "f64list": [1.5, -2.25]}
    p = tmp_path / "nc.safetensors"
    qio.save_safetensors(p, tensors)
    f = qio.safe_open(p)
    assert_same(f["strided"], np.ascontiguousarray(base[:, ::2]))
    assert_same(f["transposed"], np.ascontiguousarray(base.T))
    assert f["big"].dtype == np.int32 and np.array_equal(f["big"], big)
    assert_same(f["f64list"], np.array([1.5, -2.25]))
    assert ref_raw(p)["big"][2] == big.astype("<i4").tobytes()


def test_empty_file_of_tensors(tmp_path):
    p = tmp_path / "e.safetensors"
    qio.save_safetensors(p, {})
    assert p.read_bytes() == stnp.save({})
    f = qio.safe_open(p)
    assert f.keys() == [] and len(f) == 0


@pytest.mark.parametrize(
    "tensors, meta, match",
    [
        ({"c": np.zeros(2, np.complex64)}, None, "unsupported dtype"),
        ({"o": np.array([object()])}, None, "unsupported dtype"),
        ({1: np.zeros(2, np.float32)}, None, "names must be str"),
        ({"__metadata__": np.zeros(2, np.float32)}, None, "reserved"),
        ({"x": np.ones(2, np.float32)}, {"k": 1}, "str"),
        ({"x": np.ones(2, np.float32)}, ["k"], "dict"),
        ([np.ones(2)], None, "dict"),
    ],
)
def test_save_rejects_bad_input(tmp_path, tensors, meta, match):
    p = tmp_path / "bad.safetensors"
    with pytest.raises(ValueError, match=match):
        qio.save_safetensors(p, tensors, metadata=meta)
    assert list(tmp_path.iterdir()) == []


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        qio.safe_open(tmp_path / "nope.safetensors")
    with pytest.raises(IsADirectoryError):
        qio.safe_open(tmp_path)
    with pytest.raises(FileNotFoundError):
        qio.save_safetensors(tmp_path / "no_dir" / "x.safetensors", {"a": np.ones(2, np.float32)})


def test_overwrite_is_atomic_and_leaves_no_temp(tmp_path, rng):
    p = tmp_path / "w.safetensors"
    qio.save_safetensors(p, {"a": random_array(rng, np.float32, (3,))})
    x = random_array(rng, np.float32, (5, 5))
    old = qio.safe_open(p)["a"]  # a view of the old file stays valid: rename swaps inodes
    qio.save_safetensors(p, {"x": x})
    assert sorted(os.listdir(tmp_path)) == ["w.safetensors"]
    assert_same(qio.safe_open(p)["x"], x)
    assert old.shape == (3,) and np.isfinite(old).all()


def test_failed_write_leaves_old_file_and_no_temp(tmp_path, rng):
    """A write that fails midway (file size limit -> EFBIG) must keep the old file intact."""
    p = tmp_path / "keep.safetensors"
    old = {"a": random_array(rng, np.float32, (16,))}
    qio.save_safetensors(p, old)
    before = p.read_bytes()
    script = textwrap.dedent(
        f"""
        import resource, signal, sys
        import numpy as np
        from qlora_native import io as qio
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        try:
            qio.save_safetensors({str(p)!r}, {{"big": np.ones((1 << 20,), np.float32)}})
        except OSError as e:
            print("OSError", e.errno)
            sys.exit(0)
        sys.exit(3)
        """
    )
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=os.environ.copy())
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("OSError")
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]  # no temp file left behind
    assert p.read_bytes() == before


@pytest.mark.parametrize(
    "item, match",
    [
        (("a", "F32", (3,), np.zeros(8, np.uint8)), "has 8 bytes but dtype F32 and its shape need 12"),
        (("a", "U8", (-1,), np.zeros(0, np.uint8)), "negative dimension"),
        (("a", "U8", (2**40, 2**40), np.zeros(0, np.uint8)), "overflows"),
        (("a", "F8_E4M3", (1,), np.zeros(1, np.uint8)), "unknown dtype"),
        (("a", "U8", (2,), np.zeros(2, np.float32)), "uint8"),
    ],
)
def test_core_writer_validates(tmp_path, item, match):
    """The C++ writer checks what io.py would never send, before creating any file."""
    with pytest.raises(ValueError, match=match):
        qlora_native._core.io.save_safetensors(str(tmp_path / "x.safetensors"), [item], {})
    with pytest.raises(ValueError, match="duplicate tensor name"):
        ok = ("a", "U8", (1,), np.zeros(1, np.uint8))
        qlora_native._core.io.save_safetensors(str(tmp_path / "x.safetensors"), [ok, ok], {})
    assert list(tmp_path.iterdir()) == []
