"""safetensors and JSON I/O backed by the C++ engine (no torch, no safetensors package needed).

    f = qlora_native.io.safe_open("model.safetensors")
    f.keys(); f.metadata(); f.dtype("w"); f.shape("w")
    w = f["w"]            # read-only numpy array viewing the memory map (no copy)
    qlora_native.io.save_safetensors("out.safetensors", {"w": w}, metadata={"format": "np"})

Corrupt or truncated files raise qlora_native.FormatError (a ValueError); OS errors raise
OSError subclasses (FileNotFoundError, ...).
"""
from __future__ import annotations

import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

from . import _core

_io = _core.io

# safetensors dtype name -> numpy dtype
_NP_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U64": np.dtype(np.uint64),
    "U32": np.dtype(np.uint32),
    "U16": np.dtype(np.uint16),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_ST_NAMES = {dt: name for name, dt in _NP_DTYPES.items()}

__all__ = ["SafetensorsFile", "safe_open", "load_safetensors", "save_safetensors", "json_load", "json_loads", "json_dumps",
           "read_json"]

_MAX_JSON_BYTES = 64 << 20  # config, index and adapter files are kilobytes to a few MB


class SafetensorsFile(Mapping):
    """A validated, memory-mapped safetensors file; a read-only Mapping name -> numpy array.

    Arrays are zero-copy views of the mapping (``flags.writeable`` is False); each keeps the
    mapping alive through its ``base``, so they stay valid after the file object is dropped.
    """

    def __init__(self, path):
        self._path = os.fspath(path)
        self._f = _io.SafetensorsFile(self._path)

    # -- Mapping protocol (keys sorted by name, like safetensors.safe_open)
    def __getitem__(self, name):
        if not isinstance(name, str) or name not in self._f:
            raise KeyError(name)
        return self._view(name)

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self._f)

    def __contains__(self, name):
        return isinstance(name, str) and name in self._f

    def keys(self):
        return sorted(self._f.names())

    def get_tensor(self, name):
        """Like safetensors' safe_open().get_tensor: KeyError when absent."""
        return self[name]

    def metadata(self):
        """The ``__metadata__`` dict (str -> str); {} when the file has none."""
        return self._f.metadata()

    def dtype(self, name):
        """numpy dtype of a tensor (ml_dtypes.bfloat16 for BF16)."""
        return _NP_DTYPES[self.dtype_name(name)]

    def dtype_name(self, name):
        """safetensors spelling of a tensor's dtype ("F32", "BF16", ...)."""
        self._check(name)
        return self._f.dtype_name(name)

    def shape(self, name):
        self._check(name)
        return self._f.shape(name)

    @property
    def path(self):
        return self._path

    # -- context manager for parity with safetensors.safe_open; the mapping is released when
    # the last array taken from it is gone.
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def __repr__(self):
        return f"<qlora_native.io.SafetensorsFile {self._path!r}: {len(self)} tensors>"

    def _check(self, name):
        if name not in self:
            raise KeyError(name)

    def _view(self, name):
        a = self._f.get(name)
        if self._f.dtype_name(name) == "BF16":
            a = a.view(ml_dtypes.bfloat16)
        return a


def safe_open(path):
    """Open a safetensors file (memory-mapped, validated). See SafetensorsFile."""
    return SafetensorsFile(path)


def load_safetensors(path):
    """Same as safe_open(path): a lazy read-only mapping of zero-copy arrays."""
    return SafetensorsFile(path)


def _check_utf8(s: str, what: str) -> None:
    """The header is JSON text: a lone surrogate (e.g. a name read from a non-UTF-8 file name)
    has no UTF-8 form (the binding's bare 'Unable to cast' RuntimeError before)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"save_safetensors: {what} {s!r} is not valid UTF-8 ({exc.reason})") from None


def save_safetensors(path, tensors, metadata=None):
    """Atomically write ``{name: array}`` (any of the dtypes in _NP_DTYPES) to ``path``.

    Arrays are stored little-endian in C order (non-contiguous or big-endian input is
    converted); tensors are ordered like the safetensors package does (dtype, then name).
    """
    if not isinstance(tensors, Mapping):
        raise ValueError("save_safetensors: tensors must be a dict {name: numpy array}")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise ValueError("save_safetensors: metadata must be a dict of str -> str")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise ValueError(f"save_safetensors: metadata must map str to str, got {k!r}: {type(v).__name__}")
        _check_utf8(k, "metadata key")
        _check_utf8(v, f"metadata value of {k!r}")
    items = []
    for name, arr in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"save_safetensors: tensor names must be str, got {name!r}")
        _check_utf8(name, "tensor name")
        arr = np.asarray(arr)
        dt = arr.dtype
        if dt.byteorder == ">":
            dt = dt.newbyteorder("<")
            arr = arr.astype(dt)
        st = _ST_NAMES.get(np.dtype(dt))
        if st is None:
            raise ValueError(f"save_safetensors: tensor {name!r} has unsupported dtype {arr.dtype}")
        if not arr.flags.c_contiguous:
            arr = arr.copy(order="C")  # not ascontiguousarray: it turns 0-d into 1-d
        raw = arr.reshape(-1).view(np.uint8)  # bytes, C order
        items.append((name, st, tuple(int(d) for d in arr.shape), raw))
    _io.save_safetensors(path, items, dict(metadata))


def json_loads(text, *, allow_duplicate_keys=False, max_depth=512):
    """Parse JSON (str or UTF-8 bytes) with the engine's strict parser (FormatError on bad input).

    Differences from Python's json: duplicate keys, NaN/Infinity, lone surrogates and a BOM
    are rejected; integers beyond int64 become floats.
    """
    return _io.json_loads(text, max_depth, allow_duplicate_keys)


def json_load(path):
    """Read and parse a JSON file (config.json, adapter_config.json) with json_loads' rules."""
    return _io.json_load_file(path)


def json_dumps(obj, indent=None):
    """Serialize None/bool/int/float/str/list/tuple/dict with the engine's writer.

    Output equals ``json.dumps(obj, ensure_ascii=False, separators=(",", ":"))`` (indent=None)
    or ``json.dumps(obj, ensure_ascii=False, indent=indent)``; NaN/inf raise ValueError.
    """
    return _io.json_dumps(obj, indent)


def read_json(path: str | os.PathLike, *, allow_duplicate_keys: bool = False):
    """A JSON file parsed by the engine's parser, as the C API loader reads it: nesting depth is
    bounded (Python's json raises RecursionError), and a UTF-8 BOM, NaN/Infinity, lone surrogates
    and invalid UTF-8 are refused the same way in Python and C (one rule). FormatError names the file."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read(_MAX_JSON_BYTES + 1)  # bounded: a symlink to /dev/zero must not read forever
    if len(data) > _MAX_JSON_BYTES:
        raise _core.FormatError(f"{path}: larger than {_MAX_JSON_BYTES >> 20} MiB, not a config or index file")
    try:
        return _io.json_loads(data, 512, allow_duplicate_keys)
    except ValueError as e:
        raise _core.FormatError(f"{path}: not valid JSON ({e})") from None
