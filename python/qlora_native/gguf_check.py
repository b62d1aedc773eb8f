"""Bounded structural validation of a GGUF file, run before anything else parses it.

The `gguf` package's reader trusts every count and length in the file: a 96 KB file whose
token-type array claims 2^40 elements makes it loop past the end of the file, allocating until
the process dies. `check_gguf` walks the header, the metadata key/values and the tensor infos
with `struct` over a read-only memory map, checking every string length, array count, tensor
count, dimension and offset against the bytes that remain (and against sane limits) before it
reads or allocates anything sized by them. It returns the layout it found: the scalar metadata
values with their GGUF types and, for each tensor, its type, dims and absolute data range, so
the weight loader needs no second parse.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""
from __future__ import annotations

import functools
import mmap
import os
import stat
import struct
import traceback
from dataclasses import dataclass, field

from ._core import FormatError

GGUF_MAGIC = b"GGUF"
# GGUF value types (gguf.GGUFValueType)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
              "UINT64", "INT64", "FLOAT64")
INT_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
FLOAT_TYPES = frozenset({FLOAT32, FLOAT64})
# struct code of each fixed-size scalar type
_SCALAR = {UINT8: "B", INT8: "b", UINT16: "H", INT16: "h", UINT32: "I", INT32: "i", FLOAT32: "f", BOOL: "B",
           UINT64: "Q", INT64: "q", FLOAT64: "d"}
_SIZE = {t: struct.calcsize("<" + c) for t, c in _SCALAR.items()}

# Sane limits, far above any real model, that bound what a parser of this file may allocate.
MAX_TENSORS = 1 << 16  # Llama 3.1 405B has 1,138
MAX_ARRAY_ELEMENTS = 1 << 21  # all metadata arrays together (real vocabularies + merges + types: < 1M)
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_TENSOR_NAME = 256  # llama.cpp's own limit (GGML_MAX_NAME) is 64
MAX_ALIGNMENT = 1 << 16


@dataclass
class Value:
    """One metadata value: its GGUF type and, for scalars and strings, the value (arrays: the
    element type and count; their contents are not kept)."""

    type: int
    value: object = None
    item_type: int | None = None
    count: int = 0

    @property
    def type_name(self) -> str:
        if self.type == ARRAY:
            return f"ARRAY[{TYPE_NAMES[self.item_type]}]"
        return TYPE_NAMES[self.type]


@dataclass
class TensorInfo:
    name: str
    dims: tuple  # GGUF order: fastest-varying first
    ggml_type: int
    offset: int  # absolute file offset of the data
    n_bytes: int


@dataclass
class GGUFLayout:
    path: str
    size: int
    version: int
    byte_order: str  # "<" or ">" (struct prefix)
    alignment: int
    data_offset: int
    kv: dict = field(default_factory=dict)  # key -> Value
    tensors: list = field(default_factory=list)  # TensorInfo, in file order


def _quant_sizes() -> dict:
    from gguf.constants import GGML_QUANT_SIZES

    return {int(t): v for t, v in GGML_QUANT_SIZES.items()}


def open_regular_file(path: str | os.PathLike) -> tuple[str, int]:
    """(path, size) of an existing, non-empty regular file (symlinks followed), else a clear error."""
    path = os.fspath(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"GGUF file not found: {path}") from None
    except OSError as e:
        raise FormatError(f"{path}: cannot read the GGUF file ({e.strerror or e})") from None
    if stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"{path}: is a directory, not a GGUF file")
    if not stat.S_ISREG(st.st_mode):
        raise FormatError(f"{path}: not a regular file (a device, pipe or socket), so not a GGUF file")
    if st.st_size == 0:
        raise FormatError(f"{path}: empty file, not a GGUF file")
    return path, st.st_size


def check_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Validates the structure of a GGUF file without trusting any of its numbers; returns its
    layout. Raises FileNotFoundError, FormatError (naming the file and the field) or MemoryError."""
    path, size = open_regular_file(path)
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as e:
        raise FormatError(f"{path}: cannot map the GGUF file ({e})") from None
    try:
        return _Walker(path, mm, size).walk()
    finally:
        mm.close()


class _Walker:
    def __init__(self, path: str, mm, size: int):
        self.path, self.mm, self.size = path, mm, size
        self.off = 0
        self.bo = "<"
        self.elements = 0  # array elements seen so far (MAX_ARRAY_ELEMENTS)

    def fail(self, what: str):
        raise FormatError(f"{self.path}: not a readable GGUF file: {what}")

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.off:
            self.fail(f"{what} at offset {self.off} needs {n} bytes, only {self.size - self.off} left in the file")

    def scalar(self, t: int, what: str):
        n = _SIZE[t]
        self.need(n, what)
        (v,) = struct.unpack_from(self.bo + _SCALAR[t], self.mm, self.off)
        self.off += n
        return v

    def string(self, what: str, limit: int | None = None) -> str:
        n = self.scalar(UINT64, f"length of {what}")
        if limit is not None and n > limit:
            self.fail(f"{what} is {n} bytes long (limit {limit})")
        self.need(n, what)
        raw = self.mm[self.off : self.off + n]
        self.off += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            self.fail(f"{what} is not valid UTF-8")

    def skip_strings(self, count: int, what: str) -> None:
        # The hot loop (a vocabulary and its merges): lengths checked, contents UTF-8 validated.
        mm, size, off, fmt = self.mm, self.size, self.off, self.bo + "Q"
        unpack = struct.unpack_from
        for i in range(count):
            if off + 8 > size:
                self.off = off
                self.fail(f"{what}[{i}] runs past the end of the file")
            (n,) = unpack(fmt, mm, off)
            off += 8
            if n > size - off:
                self.off = off
                self.fail(f"{what}[{i}] is {n} bytes long, only {size - off} left in the file")
            try:
                mm[off : off + n].decode("utf-8")
            except UnicodeDecodeError:
                self.fail(f"{what}[{i}] is not valid UTF-8")
            off += n
        self.off = off

    def value(self, t: int, key: str) -> Value:
        if t in _SCALAR:
            v = self.scalar(t, f"value of {key}")
            if t == BOOL:
                if v > 1:
                    self.fail(f"{key} is a BOOL holding {v} (not 0 or 1)")
                v = bool(v)
            return Value(t, v)
        if t == STRING:
            return Value(t, self.string(f"value of {key}"))
        if t != ARRAY:
            self.fail(f"{key} has unknown value type {t}")
        it = self.scalar(UINT32, f"element type of {key}")
        count = self.scalar(UINT64, f"element count of {key}")
        if it == ARRAY:
            self.fail(f"{key} is an array of arrays (not supported)")
        if it not in _SCALAR and it != STRING:
            self.fail(f"{key} is an array of unknown value type {it}")
        self.elements += count
        if self.elements > MAX_ARRAY_ELEMENTS:
            self.fail(f"{key} has {count} elements: the metadata arrays exceed the limit of "
                      f"{MAX_ARRAY_ELEMENTS} elements in all")
        if it == STRING:
            # each element takes at least its 8-byte length
            if count > (self.size - self.off) // 8:
                self.fail(f"{key} claims {count} strings, more than the {self.size - self.off} bytes left can hold")
            self.skip_strings(count, key)
        else:
            n = count * _SIZE[it]
            self.need(n, f"{count} {TYPE_NAMES[it]} elements of {key}")
            if it == BOOL and any(b > 1 for b in self.mm[self.off : self.off + n]):
                self.fail(f"{key} holds a BOOL that is neither 0 nor 1")
            self.off += n
        return Value(ARRAY, None, it, count)

    def walk(self) -> GGUFLayout:
        self.need(4, "magic")
        if self.mm[:4] != GGUF_MAGIC:
            self.fail(f"bad magic {bytes(self.mm[:4])!r} (expected b'GGUF')")
        self.off = 4
        version = self.scalar(UINT32, "version")
        if version & 0xFFFF == 0 and version != 0:  # written on a machine of the other byte order
            self.bo = ">"
            version = struct.unpack_from(">I", self.mm, 4)[0]
        if version not in (2, 3):
            self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        n_tensors = self.scalar(UINT64, "tensor count")
        n_kv = self.scalar(UINT64, "metadata key/value count")
        left = self.size - self.off
        # a key/value takes at least 8 (key length) + 4 (type) + 1 bytes; a tensor info 8 + 4 + 4 + 8
        if n_kv > left // 13:
            self.fail(f"metadata key/value count {n_kv} is more than the {left} bytes left can hold")
        if n_tensors > min(left // 24, MAX_TENSORS):
            self.fail(f"tensor count {n_tensors} is more than the file can hold (or the limit of {MAX_TENSORS})")
        kv: dict[str, Value] = {}
        for i in range(n_kv):
            key = self.string(f"key of metadata entry {i}")
            t = self.scalar(UINT32, f"type of {key}")
            if key in kv:
                self.fail(f"duplicate metadata key {key!r}")
            kv[key] = self.value(t, key)

        align = kv.get("general.alignment")
        alignment = 32
        if align is not None:
            if align.type != UINT32 or not 0 < align.value <= MAX_ALIGNMENT or align.value & (align.value - 1):
                self.fail(f"general.alignment must be a UINT32 power of two <= {MAX_ALIGNMENT}, got "
                          f"{align.type_name} {align.value!r}")
            alignment = align.value

        sizes = _quant_sizes()
        infos = []
        names = set()
        for i in range(n_tensors):
            name = self.string(f"name of tensor {i}", MAX_TENSOR_NAME)
            if name in names:
                self.fail(f"duplicate tensor name {name!r}")
            names.add(name)
            n_dims = self.scalar(UINT32, f"dimension count of tensor {name}")
            if not 1 <= n_dims <= MAX_DIMS:
                self.fail(f"tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS})")
            dims = tuple(self.scalar(UINT64, f"dimension {d} of tensor {name}") for d in range(n_dims))
            gtype = self.scalar(UINT32, f"type of tensor {name}")
            rel = self.scalar(UINT64, f"data offset of tensor {name}")
            if gtype not in sizes:
                self.fail(f"tensor {name} has unknown GGML type {gtype}")
            n_el = 1
            for d in dims:
                if d == 0:
                    self.fail(f"tensor {name} has a zero dimension (dims {list(dims)})")
                n_el *= d  # Python ints: no overflow; bounded by the file size below
                if n_el >= 1 << 63:
                    self.fail(f"tensor {name} has too many elements (dims {list(dims)})")
            block, type_size = sizes[gtype]
            if dims and dims[0] % block:
                self.fail(f"tensor {name}: row length {dims[0]} is not a multiple of the type's block size {block}")
            if rel % alignment:
                self.fail(f"tensor {name}: data offset {rel} is not a multiple of the alignment {alignment}")
            infos.append((name, dims, gtype, rel, n_el // block * type_size))

        data_offset = -(-self.off // alignment) * alignment
        tensors = []
        for name, dims, gtype, rel, n_bytes in infos:
            start = data_offset + rel
            if start + n_bytes > self.size:
                self.fail(f"tensor {name}: data [{start}, {start + n_bytes}) runs past the end of the file "
                          f"({self.size} bytes)")
            tensors.append(TensorInfo(name, dims, gtype, start, n_bytes))
        # Tensor data ranges must not overlap (nor share an offset): each byte belongs to one tensor.
        by_start = sorted(tensors, key=lambda t: t.offset)
        for a, b in zip(by_start, by_start[1:]):
            if a.offset + a.n_bytes > b.offset:
                self.fail(f"tensors {a.name} and {b.name} overlap (data [{a.offset}, {a.offset + a.n_bytes}) "
                          f"and [{b.offset}, {b.offset + b.n_bytes}))")
        return GGUFLayout(self.path, self.size, version, self.bo, alignment, data_offset, kv, tensors)


def open_gguf_reader(path: str | os.PathLike):
    """A `gguf.GGUFReader` of a file that passed check_gguf; FormatError for what the package
    still refuses, a MemoryError naming the file when memory runs out."""
    import gguf

    path = os.fspath(path)
    check_gguf(path)
    oom = False
    try:
        return gguf.GGUFReader(path, "r")
    except MemoryError:
        oom = True  # raised below, once this frame has let go of the half-built reader
    except (ValueError, IndexError, KeyError, OSError, EOFError, TypeError) as exc:
        raise FormatError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from exc
    if oom:
        raise MemoryError(f"{path}: out of memory while reading the GGUF metadata")


def name_memory_errors(fn):
    """Decorator for loaders `fn(cls, path, ...)`: a MemoryError anywhere inside becomes one
    MemoryError naming the file. The frames of the failed load are cleared first, so what they
    held is freed before the new exception is built."""

    @functools.wraps(fn)
    def wrapper(cls, path, *args, **kwargs):
        msg = None
        try:
            return fn(cls, path, *args, **kwargs)
        except MemoryError as e:
            traceback.clear_frames(e.__traceback__)
            msg = str(e)
        where = os.fspath(path) if isinstance(path, (str, os.PathLike)) else repr(path)
        if msg.startswith(where):
            raise MemoryError(msg)
        raise MemoryError(f"{where}: out of memory while loading" + (f" ({msg})" if msg else ""))

    return wrapper
