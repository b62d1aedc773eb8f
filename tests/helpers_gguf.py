"""A tiny llama-architecture GGUF (2 layers, random weights, a 300-token sentencepiece-style
vocabulary) written with the `gguf` package, a map of where its structures lie, and mutations
of it for the hardening tests."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from helpers_tokenizer import _finish_gguf

VOCAB, HIDDEN, INTER, LAYERS, HEADS, KV_HEADS = 300, 64, 128, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS


def _vocab():
    """<unk> <s> </s>, the 256 byte tokens, then letters and a few merged pieces."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3] + [6] * 256
    pieces = ["\u2581"] + [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces += ["\u2581t", "he", "\u2581the", "in", "\u2581a", "er", "on", "\u2581s", "at", "en", "\u2581w", "or",
               "es", "\u2581o"]
    tokens += pieces
    types += [1] * len(pieces)
    assert len(tokens) == VOCAB, len(tokens)
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    return tokens, scores, types


def write_tiny_gguf(path, seed: int = 0, *, kv_overrides: dict | None = None, drop_keys=(), tensor_overrides=None,
                    drop_tensors=(), quantized: bool = True) -> Path:
    """Writes the tiny model. kv_overrides: {key: (value, GGUFValueType)} replace or add metadata
    (written instead of the standard value); drop_keys: metadata left out; tensor_overrides:
    {gguf name: float32 array} (stored as F32); drop_tensors: tensors left out."""
    import gguf

    T = gguf.GGUFValueType
    rng = np.random.default_rng(seed)
    out = Path(path)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), arch="llama")
    tokens, scores, types = _vocab()
    kv = {
        "llama.context_length": (256, T.UINT32),
        "llama.embedding_length": (HIDDEN, T.UINT32),
        "llama.block_count": (LAYERS, T.UINT32),
        "llama.feed_forward_length": (INTER, T.UINT32),
        "llama.attention.head_count": (HEADS, T.UINT32),
        "llama.attention.head_count_kv": (KV_HEADS, T.UINT32),
        "llama.rope.freq_base": (10000.0, T.FLOAT32),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, T.FLOAT32),
        "llama.rope.dimension_count": (HEAD_DIM, T.UINT32),
        "tokenizer.ggml.model": ("llama", T.STRING),
        "tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING),
        "tokenizer.ggml.scores": (scores, T.ARRAY, T.FLOAT32),
        "tokenizer.ggml.token_type": (types, T.ARRAY, T.INT32),
        "tokenizer.ggml.bos_token_id": (1, T.UINT32),
        "tokenizer.ggml.eos_token_id": (2, T.UINT32),
        "tokenizer.ggml.unknown_token_id": (0, T.UINT32),
        "tokenizer.ggml.add_bos_token": (True, T.BOOL),
    }
    for k, v in (kv_overrides or {}).items():
        kv[k] = v
    for k in drop_keys:
        kv.pop(k, None)
    for k, v in kv.items():
        w.add_key_value(k, v[0], v[1], v[2] if len(v) > 2 else None)

    Q = gguf.GGMLQuantizationType

    def mat(out_dim, in_dim):
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    tensors = [("token_embd.weight", rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32), Q.Q8_0)]
    for i in range(LAYERS):
        p = f"blk.{i}."
        tensors += [
            (p + "attn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), Q.F32),
            (p + "attn_q.weight", mat(HEADS * HEAD_DIM, HIDDEN), Q.F16),
            (p + "attn_k.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN), Q.Q4_0),
            (p + "attn_v.weight", mat(KV_HEADS * HEAD_DIM, HIDDEN), Q.Q8_0),
            (p + "attn_output.weight", mat(HIDDEN, HEADS * HEAD_DIM), Q.Q4_1),
            (p + "ffn_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), Q.F32),
            (p + "ffn_gate.weight", mat(INTER, HIDDEN), Q.Q8_0),
            (p + "ffn_up.weight", mat(INTER, HIDDEN), Q.F32),
            (p + "ffn_down.weight", mat(HIDDEN, INTER), Q.Q5_0),
        ]
    tensors += [("output_norm.weight", (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32), Q.F32),
                ("output.weight", mat(VOCAB, HIDDEN), Q.Q4_0)]
    for name, a, qt in tensors:
        if name in drop_tensors:
            continue
        if tensor_overrides and name in tensor_overrides:
            a, qt = np.asarray(tensor_overrides[name], np.float32), Q.F32
        if not quantized or qt == Q.F32:
            w.add_tensor(name, a)
        elif qt == Q.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(a, qt), raw_dtype=qt)
    return _finish_gguf(w, tmp, out)


# ------------------------------------------------------------------ structure map
@dataclass
class Field:
    """Where one number of the file lies: offset, struct code, and what it is."""

    offset: int
    code: str  # "Q" (uint64) or "I" (uint32)
    what: str  # "count", "length", "type", "dims", "offset", ...
    label: str


@dataclass
class GGUFMap:
    size: int
    fields: list = field(default_factory=list)
    boundaries: list = field(default_factory=list)  # offsets where a structure starts
    tensor_offsets: list = field(default_factory=list)  # (name, offset-field file position, rel offset, n_bytes)
    data_offset: int = 0
    data_end: int = 0  # end of the last tensor's bytes


def map_gguf(data: bytes) -> GGUFMap:
    """An independent walk of a well-formed little-endian GGUF (not the code under test)."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    m = GGUFMap(len(data))
    off = 8
    m.fields.append(Field(off, "Q", "count", "tensor_count"))
    m.fields.append(Field(off + 8, "Q", "count", "kv_count"))
    n_t, n_kv = struct.unpack_from("<QQ", data, off)
    off += 16
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    align = 32

    def string(off, label):
        m.fields.append(Field(off, "Q", "length", label))
        (n,) = struct.unpack_from("<Q", data, off)
        return off + 8 + n, data[off + 8: off + 8 + n].decode()

    for _ in range(n_kv):
        m.boundaries.append(off)
        off, key = string(off, "key")
        m.fields.append(Field(off, "I", "type", f"type of {key}"))
        (t,) = struct.unpack_from("<I", data, off)
        off += 4
        if t == 8:
            off, _ = string(off, f"value of {key}")
        elif t == 9:
            m.fields.append(Field(off, "I", "type", f"element type of {key}"))
            m.fields.append(Field(off + 4, "Q", "count", f"count of {key}"))
            it, n = struct.unpack_from("<IQ", data, off)
            off += 12
            if it == 8:
                for i in range(n):
                    off, _ = string(off, f"{key}[{i}]") if i < 3 or i == n - 1 else (
                        off + 8 + struct.unpack_from("<Q", data, off)[0], None)
            else:
                off += n * sizes[it]
        else:
            if key == "general.alignment":
                align = struct.unpack_from("<I", data, off)[0]
            off += sizes[t]
    infos = []
    for _ in range(n_t):
        m.boundaries.append(off)
        off, name = string(off, "tensor name")
        m.fields.append(Field(off, "I", "n_dims", f"n_dims of {name}"))
        (nd,) = struct.unpack_from("<I", data, off)
        off += 4
        dims = struct.unpack_from(f"<{nd}Q", data, off)
        for d in range(nd):
            m.fields.append(Field(off + 8 * d, "Q", "dim", f"dim {d} of {name}"))
        off += 8 * nd
        m.fields.append(Field(off, "I", "ggml_type", f"type of {name}"))
        (gt,) = struct.unpack_from("<I", data, off)
        m.fields.append(Field(off + 4, "Q", "offset", f"offset of {name}"))
        (rel,) = struct.unpack_from("<Q", data, off + 4)
        off += 12
        block, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(gt)]
        infos.append((name, off - 8, rel, int(np.prod(dims)) // block * tsize))
    m.data_offset = -(-off // align) * align
    m.boundaries.append(m.data_offset)
    m.tensor_offsets = infos
    m.data_end = max(m.data_offset + rel + n for _, _, rel, n in infos)
    return m


def put(data: bytearray, f: Field, value: int) -> bytearray:
    out = bytearray(data)
    struct.pack_into("<" + f.code, out, f.offset, value)
    return out
