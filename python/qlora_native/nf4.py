"""NF4 weights with double quantization, byte-for-byte in the bitsandbytes format.

    t = qlora_native.nf4.quantize(w, blocksize=64, double_quant=True)   # w: float32/float16/bfloat16
    w2 = t.dequantize()                 # float32, shape of w (dtype=np.float16 / ml_dtypes.bfloat16 too)
    t.packed, t.absmax, t.nested_absmax, t.nested_map, t.offset   # the stored arrays

bfloat16 input: an array of dtype ``ml_dtypes.bfloat16``, or raw bf16 bits as uint16 with
``quantize(bits, src_dtype="bfloat16")``.

Rules (see cpp/src/nf4/nf4_codec.hpp and shared/reference/nf4-format.md): the flat row-major
tensor is cut into blocks of ``blocksize``; a value maps to the nearest NF4 code by the float32
midpoints, a tie going to the LOWER code; an all-zero block gives nibble 7. Double quantization
stores absmax as uint8 codes of the 256-entry dynamic map (nearest entry, ties to the lower code)
in nested blocks of 256, plus the float32 mean ``offset`` and float32 ``nested_absmax``.
Storage: 4.127 bits per weight with block 64 and double quant, 4.5 without.
"""
from __future__ import annotations

import json
import math

import numpy as np

from . import _core

try:
    import ml_dtypes

    _BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # a declared dependency; tolerated so float32/float16 still work
    _BF16 = None

__all__ = [
    "NF4Tensor",
    "quantize",
    "dynamic_map",
    "nf4_codes",
    "pack_quant_state",
    "unpack_quant_state",
    "NESTED_BLOCKSIZE",
    "BLOCKSIZES",
]

NESTED_BLOCKSIZE = 256
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
_DTYPES = ("float32", "float16", "bfloat16")


def _readonly(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


_DYNAMIC_MAP = _readonly(_core.nf4.dynamic_map())
_NF4_CODES = _readonly(_core.nf4.nf4_codes())


def dynamic_map() -> np.ndarray:
    """bitsandbytes' signed dynamic 8-bit map, float32 [256] (read-only)."""
    return _DYNAMIC_MAP


def nf4_codes() -> np.ndarray:
    """The 16 NF4 code values, float32 [16] (read-only; bitsandbytes' ``quant_map``)."""
    return _NF4_CODES


def _dtype_name(dtype) -> str:
    """'float32' / 'float16' / 'bfloat16' from a name, numpy dtype or ml_dtypes type."""
    if isinstance(dtype, str):
        name = dtype
    else:
        try:
            dt = np.dtype(dtype)
        except TypeError:
            raise ValueError(f"unsupported dtype {dtype!r}") from None
        name = "bfloat16" if _BF16 is not None and dt == _BF16 else dt.name
    if name not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}: expected one of {', '.join(_DTYPES)}")
    return name


def _check_blocksize(blocksize) -> int:
    if isinstance(blocksize, bool) or int(blocksize) != blocksize or int(blocksize) not in BLOCKSIZES:
        raise ValueError(f"blocksize must be one of {BLOCKSIZES}, got {blocksize!r}")
    return int(blocksize)


def quantize(w, blocksize: int = 64, double_quant: bool = True, *, src_dtype: str | None = None,
             level: str | None = None) -> "NF4Tensor":
    """Quantize ``w`` (any shape, float32 / float16 / ml_dtypes.bfloat16) to NF4.

    ``src_dtype="bfloat16"`` reads a uint16 array as raw bf16 bits (``"float16"`` likewise).
    ``level`` forces a SIMD level ("scalar", "generic", "avx2", "avx512"); default: the active one.
    NaN or infinity in ``w`` raises ValueError.
    """
    blocksize = _check_blocksize(blocksize)
    w = np.asarray(w)
    if src_dtype is not None:
        src = _dtype_name(src_dtype)
        if w.dtype == np.uint16 and src in ("bfloat16", "float16"):
            raw = w if src == "bfloat16" else w.view(np.float16)
        elif w.dtype != np.uint16 and _dtype_name_or_none(w.dtype) == src:
            raw = w.view(np.uint16) if src == "bfloat16" else w
        else:
            raise ValueError(f"src_dtype={src!r} does not match an array of dtype {w.dtype} "
                             f"(raw bits must be uint16)")
    else:
        src = _dtype_name_or_none(w.dtype)
        if src is None:
            hint = " (pass src_dtype='bfloat16' for raw bf16 bits)" if w.dtype == np.uint16 else ""
            raise ValueError(f"cannot quantize dtype {w.dtype}: expected float32, float16 or "
                             f"ml_dtypes.bfloat16{hint}")
        raw = w.view(np.uint16) if src == "bfloat16" else w
    if w.size == 0:
        raise ValueError("cannot quantize an empty array")
    raw = np.ascontiguousarray(raw).reshape(-1)
    packed, absmax, nested, offset = _core.nf4.quantize(raw, src, blocksize, bool(double_quant), level)
    return NF4Tensor(packed, absmax, tuple(int(d) for d in w.shape), src, blocksize, bool(double_quant),
                     nested, _DYNAMIC_MAP if double_quant else None, 0.0 if offset is None else offset)


def _dtype_name_or_none(dt: np.dtype) -> str | None:
    if dt == np.float32:
        return "float32"
    if dt == np.float16:
        return "float16"
    if _BF16 is not None and dt == _BF16:
        return "bfloat16"
    return None


def _array(a, name: str, dtype, count: int) -> np.ndarray:
    """``a`` as a flat C-contiguous array of ``dtype`` with exactly ``count`` elements."""
    if not isinstance(a, np.ndarray):
        raise ValueError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != dtype:
        raise ValueError(f"{name} has dtype {a.dtype}, expected {np.dtype(dtype)}")
    if a.size != count:
        raise ValueError(f"{name} has {a.size} elements, expected {count}")
    return np.ascontiguousarray(a).reshape(-1)


class NF4Tensor:
    """An NF4-quantized tensor in bitsandbytes layout (attribute protocol of
    python/bindings/nf4_ref_from_py.hpp: packed, absmax, nested_absmax, nested_map, offset,
    shape, blocksize, double_quant)."""

    def __init__(self, packed, absmax, shape, dtype, blocksize, double_quant, nested_absmax, nested_map, offset):
        # Internal: use quantize() or from_arrays(), which validate.
        self.packed = packed                  # uint8 [(n+1)//2], first element in the high nibble
        self.absmax = absmax                  # uint8 [n_blocks] codes (double quant) or float32 [n_blocks]
        self.shape = tuple(shape)             # the original shape
        self.dtype = dtype                    # the original dtype name: float32 / float16 / bfloat16
        self.blocksize = int(blocksize)
        self.double_quant = bool(double_quant)
        self.nested_absmax = nested_absmax    # float32 [ceil(n_blocks/256)] or None
        self.nested_map = nested_map          # float32 [256] or None
        self.offset = float(offset)           # mean of absmax (double quant), else 0.0

    # ---- sizes
    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    @property
    def nbytes(self) -> int:
        """Bytes of all stored arrays (packed, absmax, nested_absmax, nested_map)."""
        return sum(a.nbytes for a in (self.packed, self.absmax, self.nested_absmax, self.nested_map) if a is not None)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.numel

    # ---- decode
    def dequantize(self, dtype=np.float32, *, level: str | None = None) -> np.ndarray:
        """The decoded tensor in its original shape: float32 (computed), float16 or
        ml_dtypes.bfloat16 (rounded from float32 to nearest even)."""
        name = _dtype_name(dtype)
        if name == "bfloat16" and _BF16 is None:
            raise ValueError("bfloat16 output needs the ml_dtypes package")
        out = _core.nf4.dequantize(self.packed, self.absmax, self.nested_absmax, self.nested_map, self.offset,
                                   self.numel, self.blocksize, self.double_quant, level).reshape(self.shape)
        if name == "float16":
            return out.astype(np.float16)
        if name == "bfloat16":
            return out.astype(_BF16)
        return out

    # ---- build from stored arrays (checkpoints)
    @classmethod
    def from_engine(cls, w: dict) -> "NF4Tensor":
        """From the dict the engine gives for an NF4 projection (Model.nf4_weight / core.linear_nf4)."""
        return cls.from_arrays(w["packed"], w["absmax"], w["shape"], blocksize=w["blocksize"],
                               nested_absmax=w["nested_absmax"], nested_map=w["nested_map"],
                               offset=w["offset"] if w["double_quant"] else None)

    @classmethod
    def from_arrays(cls, packed, absmax, shape, *, blocksize: int = 64, nested_absmax=None, nested_map=None,
                    offset=None, dtype="float32") -> "NF4Tensor":
        """Rebuild from stored arrays, e.g. a bitsandbytes checkpoint. Double quantization is
        inferred from absmax: uint8 codes need nested_absmax and offset (nested_map None: the
        dynamic map); float32 absmax means none. Packed may have any shape of (n+1)//2 bytes
        (bitsandbytes stores [(n+1)//2, 1]). Raises ValueError on any mismatch."""
        try:
            if isinstance(shape, (str, bytes)):
                raise TypeError
            shape = tuple(int(d) for d in shape)
        except (TypeError, ValueError):
            raise ValueError(f"shape must be a sequence of ints, got {shape!r}") from None
        if not shape or any(d < 1 for d in shape):
            raise ValueError(f"shape must be non-empty with positive sizes, got {shape}")
        blocksize = _check_blocksize(blocksize)
        dtype = _dtype_name(dtype)
        n = math.prod(shape)
        packed_bytes, n_blocks, n_nested = _core.nf4.sizes(n, blocksize, True)
        packed = _array(packed, "packed", np.uint8, packed_bytes)
        if not isinstance(absmax, np.ndarray):
            raise ValueError(f"absmax must be a numpy array, got {type(absmax).__name__}")
        double_quant = absmax.dtype == np.uint8
        if double_quant:
            absmax = _array(absmax, "absmax", np.uint8, n_blocks)
            if nested_absmax is None or offset is None:
                raise ValueError("uint8 absmax (double quant) needs nested_absmax and offset")
            nested_absmax = _array(nested_absmax, "nested_absmax", np.float32, n_nested)
            if not np.all(np.isfinite(nested_absmax)) or np.any(nested_absmax < 0):
                raise ValueError("nested_absmax must be finite and non-negative")
            nested_map = _DYNAMIC_MAP if nested_map is None else _array(nested_map, "nested_map", np.float32, 256)
            offset = float(np.float32(np.asarray(offset, dtype=np.float64).reshape(())))
            if not math.isfinite(offset):
                raise ValueError(f"offset must be finite, got {offset}")
        else:
            absmax = _array(absmax, "absmax (float32 without double quant; uint8 codes with it)", np.float32,
                            n_blocks)
            if not np.all(np.isfinite(absmax)) or np.any(absmax < 0):
                raise ValueError("absmax must be finite and non-negative")
            if nested_absmax is not None or nested_map is not None or offset is not None:
                raise ValueError("nested_absmax/nested_map/offset given, but absmax is float32 (no double quant)")
            offset = 0.0
        return cls(packed, absmax, shape, dtype, blocksize, double_quant, nested_absmax, nested_map, offset)

    # ---- bitsandbytes quant state
    def quant_state(self) -> dict:
        """The JSON dict bitsandbytes stores under ``<P>.weight.quant_state.bitsandbytes__nf4``."""
        d = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": self.dtype, "shape": list(self.shape)}
        if self.double_quant:
            d.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                      "nested_offset": float(np.float32(self.offset))})
        return d

    @classmethod
    def from_quant_state(cls, state, packed, absmax, nested_absmax=None, nested_map=None) -> "NF4Tensor":
        """Rebuild from a bitsandbytes quant-state (dict, JSON str/bytes or its uint8 array) plus
        the stored arrays. Raises ValueError for anything but a 256-nested float32 NF4 state."""
        d = unpack_quant_state(state) if not isinstance(state, dict) else state
        if d.get("quant_type") != "nf4":
            raise ValueError(f"quant_type must be 'nf4', got {d.get('quant_type')!r}")
        for key in ("blocksize", "dtype", "shape"):
            if key not in d:
                raise ValueError(f"quant state lacks {key!r}")
        nested = "nested_offset" in d
        if nested:
            if d.get("nested_blocksize", NESTED_BLOCKSIZE) != NESTED_BLOCKSIZE:
                raise ValueError(f"nested_blocksize must be {NESTED_BLOCKSIZE}, got {d.get('nested_blocksize')!r}")
            if d.get("nested_dtype", "float32") != "float32":
                raise ValueError(f"nested_dtype must be 'float32', got {d.get('nested_dtype')!r}")
        if nested != (isinstance(absmax, np.ndarray) and absmax.dtype == np.uint8):
            raise ValueError("quant state and absmax disagree on double quantization")
        return cls.from_arrays(packed, absmax, d["shape"], blocksize=d["blocksize"], dtype=d["dtype"],
                               nested_absmax=nested_absmax, nested_map=nested_map,
                               offset=d["nested_offset"] if nested else None)

    def __repr__(self) -> str:
        dq = "double_quant" if self.double_quant else "no double_quant"
        return (f"NF4Tensor(shape={self.shape}, dtype={self.dtype}, blocksize={self.blocksize}, {dq}, "
                f"{self.bits_per_weight:.3f} bits/weight)")


def pack_quant_state(state: dict) -> np.ndarray:
    """The quant-state dict as bitsandbytes stores it: UTF-8 JSON in a uint8 array."""
    return np.frombuffer(json.dumps(state).encode("utf-8"), dtype=np.uint8).copy()


def unpack_quant_state(data) -> dict:
    """Inverse of pack_quant_state; accepts a uint8 array, bytes or str. ValueError if malformed."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.uint8:
            raise ValueError(f"quant state array must be uint8, got {data.dtype}")
        data = data.tobytes()
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    if not isinstance(data, (bytes, bytearray)):
        raise ValueError(f"malformed bitsandbytes quant state: expected bytes, got {type(data).__name__}")
    try:
        d = _core.io.json_loads(bytes(data), 64, False)  # the engine's parser: bounded nesting
    except ValueError as e:
        raise ValueError(f"malformed bitsandbytes quant state: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("malformed bitsandbytes quant state: not a JSON object")
    return d
