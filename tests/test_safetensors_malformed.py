"""Malformed safetensors files: every one raises qlora_native.FormatError, never a crash.

Each case also records whether the reference (`safetensors` package) rejects it; where we are
stricter than the reference the case says so.
"""
import json
import os
import struct
import tempfile

import numpy as np
import pytest
import safetensors

import qlora_native
from qlora_native import io as qio

FormatError = qlora_native.FormatError


def st_bytes(header, data=b"", pad=True):
    """A file from a header (dict -> compact JSON, str/bytes verbatim) and a data buffer."""
    if isinstance(header, dict):
        header = json.dumps(header, separators=(",", ":"))
    if isinstance(header, str):
        header = header.encode()
    if pad:
        header += b" " * ((8 - len(header) % 8) % 8)
    return struct.pack("<Q", len(header)) + header + data


def entry(dtype="U8", shape=(2,), offsets=(0, 2)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


def ref_rejects(blob):
    try:
        safetensors.deserialize(blob)
    except Exception:
        return True
    return False


OK = st_bytes({"a": entry()}, b"xy")

# (id, file bytes, does the reference reject it too?)
CASES = [
    ("empty_file", b"", True),
    ("shorter_than_8", b"\x10\x00\x00", True),
    ("header_len_past_eof", struct.pack("<Q", 1000) + b"{}", True),
    ("header_len_huge", struct.pack("<Q", 2**63 + 5) + b"{}      ", True),
    ("header_len_over_limit", struct.pack("<Q", 100_000_001) + b"{}", True),
    ("invalid_json", st_bytes('{"a": {"dtype": "U8",'), True),
    ("invalid_utf8", st_bytes(b'{"\xff\xfe":1}'), True),
    ("nul_padding", st_bytes(b'{}\x00\x00\x00\x00\x00\x00', pad=False), True),
    ("header_is_array", st_bytes("[]"), True),
    ("header_is_string", st_bytes('"x"'), True),
    ("entry_not_object", st_bytes({"a": [1, 2]}), True),
    ("missing_dtype", st_bytes({"a": {"shape": [2], "data_offsets": [0, 2]}}, b"xy"), True),
    ("missing_shape", st_bytes({"a": {"dtype": "U8", "data_offsets": [0, 2]}}, b"xy"), True),
    ("missing_offsets", st_bytes({"a": {"dtype": "U8", "shape": [2]}}, b"xy"), True),
    ("dtype_not_string", st_bytes({"a": entry(dtype=3)}, b"xy"), True),
    ("unknown_dtype", st_bytes({"a": entry(dtype="F17")}, b"xy"), True),
    ("shape_not_array", st_bytes({"a": {"dtype": "U8", "shape": 2, "data_offsets": [0, 2]}}, b"xy"), True),
    ("negative_dim", st_bytes({"a": entry(shape=(-2,))}, b"xy"), True),
    ("float_dim", st_bytes({"a": entry(shape=(2.0,))}, b"xy"), True),
    ("dim_beyond_int64", st_bytes('{"a":{"dtype":"U8","shape":[18446744073709551617],"data_offsets":[0,2]}}', b"xy"), True),
    ("shape_product_overflow", st_bytes({"a": entry(shape=(2**32, 2**32, 2), offsets=(0, 2))}, b"xy"), True),
    ("overflow_before_zero_dim", st_bytes({"a": entry(shape=(2**62, 8, 0), offsets=(0, 0))}), True),
    ("bytes_overflow", st_bytes({"a": entry(dtype="F64", shape=(2**61 + 1,), offsets=(0, 8))}, b"x" * 8), True),
    ("offsets_three", st_bytes({"a": entry(offsets=(0, 2, 2))}, b"xy"), True),
    ("offsets_not_array", st_bytes({"a": {"dtype": "U8", "shape": [2], "data_offsets": 2}}, b"xy"), True),
    ("offset_negative", st_bytes({"a": entry(offsets=(-1, 1))}, b"xy"), True),
    ("begin_gt_end", st_bytes({"a": entry(shape=(0,), offsets=(2, 0))}, b"xy"), True),
    ("end_past_data", st_bytes({"a": entry(shape=(4,), offsets=(0, 4))}, b"xy"), True),
    ("size_mismatch", st_bytes({"a": entry(dtype="F32", shape=(1,), offsets=(0, 2))}, b"xy"), True),
    ("hole_at_start", st_bytes({"a": entry(shape=(1,), offsets=(1, 2))}, b"xy"), True),
    ("hole_between", st_bytes({"a": entry(shape=(1,), offsets=(0, 1)), "b": entry(shape=(1,), offsets=(2, 3))}, b"xyz"), True),
    ("overlap", st_bytes({"a": entry(shape=(2,), offsets=(0, 2)), "b": entry(shape=(2,), offsets=(1, 3))}, b"xyz"), True),
    ("trailing_bytes", st_bytes({"a": entry()}, b"xyz"), True),
    ("truncated_data", st_bytes({"a": entry(shape=(3,), offsets=(0, 3))}, b"xy"), True),
    ("metadata_not_object", st_bytes({"__metadata__": "x"}), True),
    ("metadata_int_value", st_bytes({"__metadata__": {"k": 1}}), True),
    ("metadata_null_value", st_bytes({"__metadata__": {"k": None}}), True),
    # Stricter than the reference, which keeps the last duplicate silently:
    ("duplicate_tensor", st_bytes('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy"), False),
    ("duplicate_metadata_key", st_bytes('{"__metadata__":{"k":"1","k":"2"}}'), False),
]


def test_valid_control_file_loads():
    # The template the cases derive from is itself fine for both implementations.
    assert not ref_rejects(OK)


@pytest.mark.parametrize("name, blob, ref", CASES, ids=[c[0] for c in CASES])
def test_malformed_raises_format_error(tmp_path, name, blob, ref):
    p = tmp_path / f"{name}.safetensors"
    p.write_bytes(blob)
    with pytest.raises(FormatError) as ei:
        qio.safe_open(p)
    assert str(p) in str(ei.value)  # the message names the file
    assert isinstance(ei.value, ValueError)
    assert ref_rejects(blob) == ref


def test_accepted_like_reference(tmp_path):
    """Inputs the reference accepts are accepted too (extra fields, null metadata, any header order)."""
    blobs = {
        "extra_field": st_bytes({"a": {**entry(), "foo": [1]}}, b"xy"),
        "null_metadata": st_bytes({"__metadata__": None, "a": entry()}, b"xy"),
        "unordered": st_bytes({"b": entry(shape=(1,), offsets=(1, 2)), "a": entry(shape=(1,), offsets=(0, 1))}, b"xy"),
        "shared_zero_size": st_bytes({"a": entry(shape=(0,), offsets=(0, 0)), "b": entry(shape=(2, 0), offsets=(0, 0)), "c": entry()}, b"xy"),
        "leading_space": st_bytes(' {"a":' + json.dumps(entry()) + "}", b"xy"),
        "empty_name": st_bytes({"": entry()}, b"xy"),
    }
    for name, blob in blobs.items():
        assert not ref_rejects(blob), name
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        f = qio.safe_open(p)
        ref = {n: bytes(v["data"]) for n, v in safetensors.deserialize(blob)}
        assert sorted(f.keys()) == sorted(ref), name
        for n in ref:
            assert f[n].tobytes() == ref[n], (name, n)


def _valid_file(rng):
    tensors = {
        "w.f32": rng.standard_normal((3, 5)).astype(np.float32),
        "b.f16": rng.standard_normal((7,)).astype(np.float16),
        "ids": rng.integers(-1000, 1000, (2, 2), dtype=np.int64),
        "mask": rng.random((5,)) < 0.5,
        "scalar": np.asarray(rng.standard_normal(), np.float64),
        "empty": np.zeros((0, 3), np.int8),
    }
    return st_bytes_from_ours(tensors)


def st_bytes_from_ours(tensors):
    with tempfile.TemporaryDirectory() as d:
        p = os.path.join(d, "v.safetensors")
        qio.save_safetensors(p, tensors, metadata={"format": "np"})
        with open(p, "rb") as fh:
            return fh.read()


def test_fuzz_flips_and_truncations(tmp_path, rng):
    """300 corrupted variants: each loads cleanly or raises FormatError, exactly when the reference
    accepts/rejects it (<= 4 flipped bytes cannot forge the duplicate keys only we reject), and
    loaded data is readable and identical to the reference's."""
    good = _valid_file(rng)
    n_header = 8 + int.from_bytes(good[:8], "little")
    outcomes = {"ok": 0, "error": 0}
    for i in range(300):
        blob = bytearray(good)
        kind = i % 3
        if kind == 0:  # truncate anywhere
            blob = blob[: int(rng.integers(0, len(good)))]
        else:  # flip 1-4 bytes, mostly in the length field and the header
            for _ in range(int(rng.integers(1, 5))):
                pos = int(rng.integers(0, n_header if rng.random() < 0.85 else len(blob)))
                if rng.random() < 0.5:
                    blob[pos] ^= 1 << int(rng.integers(0, 8))
                else:  # a structurally interesting character
                    blob[pos] = int(rng.choice(list(b'{}[]",:0123456789-e. \\u')))
        blob = bytes(blob)
        p = tmp_path / f"v{i}.safetensors"
        p.write_bytes(blob)
        ref_ok = not ref_rejects(blob)
        try:
            f = qio.safe_open(p)
        except FormatError as e:
            assert not ref_ok, (i, str(e))
            outcomes["error"] += 1
            p.unlink()
            continue
        assert ref_ok, i
        outcomes["ok"] += 1
        arrays = {n: f[n] for n in f.keys()}
        total = sum(len(a.tobytes()) for a in arrays.values())  # touch every byte
        assert total == sum(f._f.nbytes(n) for n in arrays)
        ref = {n: bytes(v["data"]) for n, v in safetensors.deserialize(blob)}
        assert sorted(ref) == sorted(arrays), i
        for n, a in arrays.items():
            assert a.tobytes() == ref[n], (i, n)
        del f, arrays
        p.unlink()
    # Both outcomes must occur, or the corruption is not exercising the validator.
    assert outcomes["ok"] > 0 and outcomes["error"] > 100, outcomes
