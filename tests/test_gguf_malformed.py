"""The C++ GGUF reader (cpp/src/io/gguf_read.cpp) on well-formed and malformed files.

Well-formed: every metadata value type (scalars and arrays of each), both byte orders, tensor
infos and data offsets, read equal to the `gguf` package's reader. Malformed: hand-built files
with one defect each (truncated, counts / lengths / offsets out of range, overlapping data,
unknown types, invalid UTF-8, ...) raise qlora_native.FormatError naming the file and the field,
key or tensor, never a crash; the safetensors counterpart is test_safetensors_malformed.py."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import qlora_native
from qlora_native import FormatError, _core

gguf = pytest.importorskip("gguf")
T = gguf.GGUFValueType

# ------------------------------------------------------------------ a tiny hand-built GGUF
_CODE = {T.UINT8: "B", T.INT8: "b", T.UINT16: "H", T.INT16: "h", T.UINT32: "I", T.INT32: "i", T.FLOAT32: "f",
         T.BOOL: "?", T.UINT64: "Q", T.INT64: "q", T.FLOAT64: "d"}


def s(text: bytes | str) -> bytes:
    b = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(b)) + b


def kv(key, vtype, value, sub=None) -> bytes:
    out = s(key) + struct.pack("<I", vtype)
    if vtype == T.STRING:
        return out + s(value)
    if vtype == T.ARRAY:
        out += struct.pack("<IQ", sub, len(value))
        return out + b"".join(s(v) if sub == T.STRING else struct.pack("<" + _CODE[sub], v) for v in value)
    return out + struct.pack("<" + _CODE[vtype], value)


def tinfo(name, dims, gtype, offset) -> bytes:
    return s(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + \
        struct.pack("<IQ", gtype, offset)


def build(kvs=None, tensors=None, data=None, n_kv=None, n_tensors=None, version=3, magic=b"GGUF", align=32) -> bytes:
    """A GGUF: two F32 tensors a[8], b[4] by default (data 48 bytes at offsets 0 and 32)."""
    kvs = [kv("general.architecture", T.STRING, "llama")] if kvs is None else kvs
    tensors = [tinfo("a", [8], 0, 0), tinfo("b", [4], 0, 32)] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                               len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += b"\0" * (-len(body) % align)
    if data is None:
        data = np.arange(8, dtype=np.float32).tobytes() + b"\0" * 0 + np.arange(4, dtype=np.float32).tobytes()
        data = data[:32] + data[32:]  # a: bytes [0, 32), b: [32, 48)
    return body + data


def write(tmp_path, blob, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(blob)
    return p


def test_hand_built_file_reads(tmp_path):
    f = _core.gguf.GGUFFile(str(write(tmp_path, build())))
    assert [t[0] for t in f.tensors()] == ["a", "b"]
    assert f.data_offset % 32 == 0 and f.tensors()[1][3] == f.data_offset + 32
    assert f.kv() == [("general.architecture", int(T.STRING), "llama", None, 0)]


# ------------------------------------------------------------------ parity with the gguf package
ALL_SCALARS = [(T.UINT8, 200), (T.INT8, -100), (T.UINT16, 60000), (T.INT16, -30000), (T.UINT32, 4_000_000_000),
               (T.INT32, -2_000_000_000), (T.FLOAT32, 1e-5), (T.BOOL, True), (T.UINT64, 2**64 - 1),
               (T.INT64, -2**63), (T.FLOAT64, 0.1), (T.STRING, "héllo ✓")]
ALL_ARRAYS = [(T.UINT8, [0, 255]), (T.INT8, [-128, 127]), (T.UINT16, [1, 65535]), (T.INT16, [-5, 5]),
              (T.UINT32, [7, 2**32 - 1]), (T.INT32, [-1, 1]), (T.FLOAT32, [0.5, -2.25]), (T.BOOL, [True, False]),
              (T.UINT64, [2**63 + 5]), (T.INT64, [-(2**40)]), (T.FLOAT64, [1e300, -0.0]),
              (T.STRING, ["a", "", "日本語"])]


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_every_value_type_reads_as_the_gguf_package(tmp_path, endian):
    p = tmp_path / f"{endian}.gguf"
    w = gguf.GGUFWriter(str(p), arch="llama", endianess=getattr(gguf.GGUFEndian, endian))
    for t, v in ALL_SCALARS:
        w.add_key_value(f"test.{t.name}", v, t)
    for t, v in ALL_ARRAYS:
        w.add_key_value(f"test.arr.{t.name}", v, T.ARRAY, t)
    w.add_tensor("q", np.arange(64, dtype=np.float32).reshape(2, 32))
    w.add_tensor("r", np.ones(3, dtype=np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = _core.gguf.GGUFFile(str(p))
    ref = gguf.GGUFReader(str(p))
    assert f.byte_order == (">" if endian == "BIG" else "<")
    ours = {k: (t, v, it, n) for k, t, v, it, n in f.kv()}
    fields = {k: v for k, v in ref.fields.items() if not k.startswith("GGUF.")}  # the reader's header pseudo-keys
    assert set(ours) == set(fields)
    assert f.version == ref.fields["GGUF.version"].contents()
    for key, field in fields.items():
        t, v, it, n = ours[key]
        assert t == int(field.types[0]), key
        if field.types[0] == T.ARRAY:
            want = field.contents()
            assert it == int(field.types[-1]) and n == len(want), key
            got = f.array(key)
            if field.types[-1] in (T.FLOAT32, T.FLOAT64):
                np.testing.assert_array_equal(np.array(got), np.array(want, dtype=np.float64), err_msg=key)
            else:
                assert got == want, key
        else:
            assert v == field.contents(), key
    for (name, dims, gtype, offset, nbytes), rt in zip(f.tensors(), ref.tensors):
        assert (name, dims, gtype, offset, nbytes) == (rt.name, tuple(int(d) for d in rt.shape), int(rt.tensor_type),
                                                       int(rt.data_offset), int(rt.n_bytes))
    if endian == "BIG":  # read, but not loaded as a model
        with pytest.raises(ValueError, match="big-endian GGUF files are not supported"):
            f.hf_config()


# ------------------------------------------------------------------ one defect per file
def _case(name, blob, match):
    return pytest.param(blob, match, id=name)


_GOOD = build()
_HEAD = 4 + 4 + 8 + 8
CASES = [
    _case("empty-magic", b"GG", r"magic at offset 0 needs 4 bytes"),
    _case("bad-magic", b"GGML" + _GOOD[4:], r"bad magic b'GGML'"),
    _case("version-1", build(version=1), "unsupported GGUF version 1"),
    _case("truncated-header", _GOOD[:12], "tensor count at offset 8 needs 8 bytes"),
    _case("kv-count-huge", build(n_kv=2**40), "metadata key/value count 1099511627776 is more than"),
    _case("tensor-count-huge", build(n_tensors=2**64 - 1), "tensor count 18446744073709551615 is more than"),
    _case("key-length-past-end", _GOOD[:_HEAD] + struct.pack("<Q", 2**40) + _GOOD[_HEAD + 8:],
          "key of metadata entry 0 at offset 32 needs 1099511627776 bytes"),
    _case("string-value-past-end", build([s("k") + struct.pack("<IQ", T.STRING, 10**6) + b"x"]),
          "value of k at offset .* needs 1000000 bytes"),
    _case("truncated-in-kv", build([kv("general.architecture", T.STRING, "llama")], tensors=[], data=b"")[:66],
          "value of general.architecture at offset 64 needs 5 bytes, only 2 left"),
    _case("unknown-value-type", build([s("k") + struct.pack("<I", 13) + b"\0" * 8]), "k has unknown value type 13"),
    _case("array-of-arrays", build([s("k") + struct.pack("<IIQ", T.ARRAY, T.ARRAY, 1)]), "k is an array of arrays"),
    _case("array-unknown-element", build([s("k") + struct.pack("<IIQ", T.ARRAY, 77, 1)]),
          "k is an array of unknown value type 77"),
    _case("array-count-huge", build([s("k") + struct.pack("<IIQ", T.ARRAY, T.UINT32, 2**62)]),
          "k has 4611686018427387904 elements: the metadata arrays exceed the limit"),
    _case("array-past-end", build([s("k") + struct.pack("<IIQ", T.ARRAY, T.UINT32, 1000)]),
          "1000 UINT32 elements of k at offset .* needs 4000 bytes"),
    _case("string-array-claims-too-many", build([s("k") + struct.pack("<IIQ", T.ARRAY, T.STRING, 2**20)]),
          "k claims 1048576 strings, more than the .* bytes left can hold"),
    _case("string-element-past-end", build([kv("k", T.ARRAY, ["ab", "cd"], T.STRING)[:-10] +
                                            struct.pack("<Q", 2**33) + b"cd"]), r"k\[1\] is 8589934592 bytes long"),
    _case("key-not-utf8", build([s(b"\xff\xfe") + struct.pack("<I", T.UINT8) + b"\1"]),
          "key of metadata entry 0 is not valid UTF-8"),
    _case("value-not-utf8", build([kv("k", T.STRING, b"\xc0\x80")]), "value of k is not valid UTF-8"),
    _case("surrogate-not-utf8", build([kv("k", T.STRING, b"\xed\xa0\x80")]), "value of k is not valid UTF-8"),
    _case("string-element-not-utf8", build([kv("k", T.ARRAY, [b"ok", b"\x80"], T.STRING)]),
          r"k\[1\] is not valid UTF-8"),
    _case("bool-2", build([s("k") + struct.pack("<IB", T.BOOL, 2)]), "k is a BOOL holding 2"),
    _case("bool-array-2", build([s("k") + struct.pack("<IIQBB", T.ARRAY, T.BOOL, 2, 1, 2)]),
          "k holds a BOOL that is neither 0 nor 1"),
    _case("duplicate-key", build([kv("k", T.UINT8, 1), kv("k", T.UINT8, 2)]), "duplicate metadata key 'k'"),
    _case("alignment-not-power-of-two", build([kv("general.alignment", T.UINT32, 48)]),
          "general.alignment must be a UINT32 power of two <= 65536, got UINT32 48"),
    _case("alignment-wrong-type", build([kv("general.alignment", T.UINT64, 32)]),
          "general.alignment must be a UINT32 power of two"),
    _case("duplicate-tensor", build(tensors=[tinfo("a", [8], 0, 0), tinfo("a", [4], 0, 32)]),
          "duplicate tensor name 'a'"),
    _case("tensor-name-too-long", build(tensors=[tinfo("x" * 300, [8], 0, 0)]),
          "name of tensor 0 is 300 bytes long \\(limit 256\\)"),
    _case("zero-dims", build(tensors=[tinfo("a", [], 0, 0)]), "tensor a has 0 dimensions"),
    _case("five-dims", build(tensors=[tinfo("a", [1] * 5, 0, 0)]), "tensor a has 5 dimensions"),
    _case("zero-dim", build(tensors=[tinfo("a", [8, 0], 0, 0)]), r"tensor a has a zero dimension \(dims \[8, 0\]\)"),
    _case("too-many-elements", build(tensors=[tinfo("a", [2**32, 2**32], 0, 0)]), "tensor a has too many elements"),
    _case("unknown-ggml-type", build(tensors=[tinfo("a", [8], 4, 0)]), "tensor a has unknown GGML type 4"),
    _case("ggml-type-huge", build(tensors=[tinfo("a", [8], 2**32 - 1, 0)]), "tensor a has unknown GGML type 4294967295"),
    _case("row-not-whole-blocks", build(tensors=[tinfo("a", [33], 8, 0)]),
          "tensor a: row length 33 is not a multiple of the type's block size 32"),
    _case("offset-unaligned", build(tensors=[tinfo("a", [8], 0, 4)]),
          "tensor a: data offset 4 is not a multiple of the alignment 32"),
    _case("data-past-end", build(tensors=[tinfo("a", [8], 0, 0), tinfo("b", [4], 0, 64)]),
          r"tensor b: data \[\d+, \d+\) runs past the end of the file"),
    _case("offset-huge", build(tensors=[tinfo("a", [8], 0, 2**64 - 32)]), "tensor a: data .* runs past the end"),
    _case("huge-tensor", build(tensors=[tinfo("a", [2**40, 2**20], 0, 0)]), "tensor a: data .* runs past the end"),
    _case("truncated-data", _GOOD[:-1], r"tensor b: data \[\d+, \d+\) runs past the end of the file"),
    _case("overlap-same-offset", build(tensors=[tinfo("a", [8], 0, 0), tinfo("b", [4], 0, 0)]),
          r"tensors (a and b|b and a) overlap"),
    _case("overlap-partial", build(tensors=[tinfo("a", [16], 0, 0), tinfo("b", [4], 0, 32)],
                                   data=b"\0" * 80), r"tensors a and b overlap \(data"),
    _case("truncated-tensor-info", build()[:_HEAD + len(kv("general.architecture", T.STRING, "llama")) + 10],
          "(name of tensor 0|length of name of tensor 0|dimension count of tensor a) .* needs"),
]


@pytest.mark.parametrize("blob,match", CASES)
def test_malformed_file_is_a_format_error_naming_file_and_field(tmp_path, blob, match):
    p = write(tmp_path, blob)
    with pytest.raises(FormatError, match=match) as ei:
        _core.gguf.GGUFFile(str(p))
    assert str(ei.value).startswith(f"{p}: not a readable GGUF file: "), str(ei.value)
    # The model loader and the layout check go through the same reader.
    with pytest.raises(FormatError, match=match):
        qlora_native.Model.from_pretrained(p, tokenizer=None)
    with pytest.raises(FormatError, match=match):
        qlora_native.gguf_check.check_gguf(p)


def test_every_truncation_of_a_real_file_is_refused(tmp_path):
    """A tiny llama GGUF cut at every 97th byte (and at each structure boundary): FormatError each."""
    from helpers_gguf import map_gguf, write_tiny_gguf

    data = write_tiny_gguf(tmp_path / "tiny.gguf").read_bytes()
    m = map_gguf(data)
    cuts = sorted(set(range(1, m.data_end, 97)) | {b for b in m.boundaries if 0 < b < m.data_end})
    p = tmp_path / "cut.gguf"
    for c in cuts:
        p.write_bytes(data[:c])
        with pytest.raises(FormatError, match="not a readable GGUF file"):
            _core.gguf.GGUFFile(str(p))
    assert len(cuts) > 50


def test_not_a_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        _core.gguf.GGUFFile(str(tmp_path / "missing.gguf"))
    with pytest.raises(IsADirectoryError):
        _core.gguf.GGUFFile(str(tmp_path))
    (tmp_path / "e.gguf").write_bytes(b"")
    with pytest.raises(FormatError, match="empty file"):
        _core.gguf.GGUFFile(str(tmp_path / "e.gguf"))
