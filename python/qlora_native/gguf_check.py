"""The structure of a GGUF file, as the C++ reader validated it (cpp/src/io/gguf_read.cpp).

The reader walks the header, the metadata key/values and the tensor infos over a read-only
memory map, checking every string length, array count, tensor count, dimension and offset
against the bytes that remain (and against sane limits) before it reads or allocates anything
sized by them; strings must be UTF-8, tensor types known, data ranges inside the file, aligned
and non-overlapping. A violation is a FormatError "<path>: not a readable GGUF file: <what>".
`check_gguf` returns the layout it found: the scalar metadata values with their GGUF types and,
for each tensor, its type, dims and absolute data range.

Spec: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""
from __future__ import annotations

import functools
import os
import traceback
from dataclasses import dataclass, field

from . import _core
from ._core import FormatError

# GGUF value types (gguf.GGUFValueType)
UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
TYPE_NAMES = ("UINT8", "INT8", "UINT16", "INT16", "UINT32", "INT32", "FLOAT32", "BOOL", "STRING", "ARRAY",
              "UINT64", "INT64", "FLOAT64")
INT_TYPES = frozenset({UINT8, INT8, UINT16, INT16, UINT32, INT32, UINT64, INT64})
FLOAT_TYPES = frozenset({FLOAT32, FLOAT64})

# The reader's limits (far above any real model), which bound what a parser of a file may allocate.
MAX_TENSORS = _core.gguf.MAX_TENSORS
MAX_ARRAY_ELEMENTS = _core.gguf.MAX_ARRAY_ELEMENTS
MAX_DIMS = _core.gguf.MAX_DIMS
MAX_TENSOR_NAME = _core.gguf.MAX_TENSOR_NAME
MAX_ALIGNMENT = _core.gguf.MAX_ALIGNMENT


@dataclass
class Value:
    """One metadata value: its GGUF type and, for scalars and strings, the value (arrays: the
    element type and count; their contents come from GGUFFile.array)."""

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
    file: object = field(default=None, repr=False)  # the open _core.gguf.GGUFFile


def open_gguf(path: str | os.PathLike) -> "_core.gguf.GGUFFile":
    """The validated, memory-mapped C++ GGUFFile of `path`. FileNotFoundError / IsADirectoryError
    (an OSError naming the path), FormatError naming the file and the field, or MemoryError."""
    return _core.gguf.GGUFFile(path)


def check_gguf(path: str | os.PathLike) -> GGUFLayout:
    """Validates the structure of a GGUF file without trusting any of its numbers; returns its
    layout. Raises FileNotFoundError, FormatError (naming the file and the field) or MemoryError."""
    f = open_gguf(path)
    kv = {k: Value(t, v, it, n) for k, t, v, it, n in f.kv()}
    tensors = [TensorInfo(*t) for t in f.tensors()]
    return GGUFLayout(f.path, f.size, f.version, f.byte_order, f.alignment, f.data_offset, kv, tensors, f)


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
