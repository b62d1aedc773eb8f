"""Device-memory model of a LoRA training step (an estimate from the shapes, not a measurement).

Counts every buffer the engine allocates for a Llama-family training step the way
cpp/src/model/llama_train.cpp (LlamaModel::train_pass), model/lm_loss.cpp (lm_cross_entropy),
model/lora.cpp and train/lora_optimizer.cpp allocate them:

- weights: NF4 projections (packed nibbles + absmax codes + nested absmax + 256-entry map per
  projection, bitsandbytes' double quant) or fp32, norms, the RoPE table, the embedding and the
  lm_head (fp32, 16-bit rows: head_format "bf16" / "f16", or Q8_0 rows: head_format "q8_0"; tied:
  one table);
- the adapter: A/B (one fp32 arena), their gradients (one arena), AdamW's m and v;
- the pass's activations (what peak_train_bytes reports): the engine's own allocation plan
  (cpp/src/model/train_memory.cpp through _core.train.memory_plan; train_pass allocates its
  buffers from the same plan, so this part is not a copy): the checkpointed layer inputs (all
  num_layers + 1 without offload, two with offload_checkpoints, all per-layer intermediates
  without checkpointing), one layer's intermediates for the recompute (and the attention halves
  and last layers activation_memory_budget keeps), the LoRA scratch, dropout
  buffers, the final-norm output and the backward scratch, with the chunked cross-entropy's
  [chunk, vocab] logits (+ the Q8_0 / 16-bit lm_head backward's widening chunk) at its own moment.

Not counted: the CUDA context and kernel images (a few hundred MiB outside the allocator),
the caching allocator's size-class rounding and fragmentation, small per-op scratch (attention
backward's [B, Hq, T] delta, grad-norm partials), host memory (offloaded checkpoints).
"""
from __future__ import annotations

import numbers

from . import _core
from ._core import gguf as _gguf
from ._core import grad_ops as _grad_ops
from .lora_model import check_activation_memory_budget

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_F = 4  # fp32 bytes
CE_CHUNK_ROWS = _grad_ops.default_chunk_rows  # the engine's kCrossEntropyChunkRows
HEAD_FORMATS = tuple(_core.train.HEAD_FORMATS)  # the engine's names (model/train_memory.cpp head_format_names)


def _check_head_format(head_format) -> None:
    if not isinstance(head_format, str) or head_format not in HEAD_FORMATS:
        raise ValueError(f"head_format must be one of {', '.join(map(repr, HEAD_FORMATS))}, got {head_format!r}")


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def _config(cfg):
    """The config of a Model or a GGUFSource (their .config), else cfg itself."""
    return cfg.config if hasattr(cfg, "_core") or isinstance(getattr(cfg, "file", None), _gguf.GGUFFile) else cfg


def _reads_q8_0_rows(cfg, head_format: str) -> bool:
    """TrainShape::f32_from_q8_0 from what cfg knows: a Model whose tied Q8_0 token_embd has no fp32
    table (LlamaWeights::tied_q8_0_unwidened), a GGUFSource whose tied token_embd is Q8_0; a config
    alone describes an HF checkpoint (an fp32 table: False)."""
    if head_format != "float32":
        return False
    if hasattr(cfg, "_core"):
        return bool(cfg._core.tied_q8_0_unwidened())
    if isinstance(getattr(cfg, "file", None), _gguf.GGUFFile):
        types = {t[0]: t[2] for t in cfg.file.tensors()}
        return (bool(cfg.config.get("tie_word_embeddings")) and "token_embd.weight" in types
                and _gguf.type_name(types["token_embd.weight"]) == "Q8_0" and cfg.config["hidden_size"] % 32 == 0)
    return False


def _dims(cfg) -> dict:
    cfg = _config(cfg)

    def field(key, default=None):
        v = _get(cfg, key, None)
        v = default if v is None else v
        if v is None:
            raise ValueError(f"config: missing field {key!r}")
        return _count(f"config field {key!r}", v)

    D = field("hidden_size")
    Hq = field("num_attention_heads")
    Hkv = field("num_key_value_heads", Hq)
    hd = _get(cfg, "head_dim", None)
    hd = _count("config field 'head_dim'", hd) if hd else D // Hq
    return dict(D=D, I=field("intermediate_size"), V=field("vocab_size"),
                L=field("num_hidden_layers"), Hq=Hq, Hkv=Hkv, hd=hd, QD=Hq * hd, KD=Hkv * hd,
                tied=bool(_get(cfg, "tie_word_embeddings", False)))


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """[out, in] of each projection of one layer."""
    d = _dims(cfg)
    return {"q_proj": (d["QD"], d["D"]), "k_proj": (d["KD"], d["D"]), "v_proj": (d["KD"], d["D"]),
            "o_proj": (d["D"], d["QD"]), "gate_proj": (d["I"], d["D"]), "up_proj": (d["I"], d["D"]),
            "down_proj": (d["D"], d["I"])}


def nf4_bytes(rows: int, cols: int, blocksize: int = 64, double_quant: bool = True) -> tuple[int, int]:
    """(packed weight bytes, quantization-constant bytes) of one NF4 matrix (Linear::weight_bytes /
    quant_bytes)."""
    n = rows * cols
    nb = -(-n // blocksize)
    packed = (n + 1) // 2
    if double_quant:
        return packed, nb + _F * (-(-nb // 256)) + _F * 256
    return packed, _F * nb


def q8_0_bytes(rows: int, cols: int) -> int:
    return rows * (cols // 32) * 34


def weight_bytes(cfg, *, nf4: bool = True, blocksize: int = 64, double_quant: bool = True,
                 head_format: str = "float32") -> dict[str, int]:
    """Device bytes of the frozen weights by category (LlamaModel::memory_footprint's names, with
    the embedding / lm_head split out of other_weights). head_format "float32" counts the fp32 table;
    a GGUF's Q8_0 token_embd is held as its Q8_0 rows, widened to that table only by a pass whose loss
    cannot read them as a tied lm_head (a device backend, the scalar level, QLORA_F32_HEAD_Q8=0 /
    QLORA_BF16_HEAD_Q8=0; README "bf16 compute"; the gather always reads the rows)."""
    d = _dims(cfg)
    w = q = other = 0
    for rows, cols in projection_shapes(cfg).values():
        if nf4:
            a, b = nf4_bytes(rows, cols, blocksize, double_quant)
            w += a
            q += b
        else:
            other += _F * rows * cols
    w *= d["L"]
    q *= d["L"]
    other *= d["L"]
    other += _F * (2 * d["L"] * d["D"] + d["D"]) + _F * (d["hd"] // 2)  # norms + RoPE inv_freq
    _check_head_format(head_format)
    if head_format == "q8_0":
        table = q8_0_bytes(d["V"], d["D"])
    elif head_format in ("bf16", "f16"):
        table = 2 * d["V"] * d["D"]
    else:
        table = _F * d["V"] * d["D"]
    return {"nf4_weights": w, "quant_constants": q, "other_weights": other, "embedding": table,
            "lm_head": 0 if d["tied"] else table}


def lora_numel(cfg, r: int, targets=PROJECTIONS) -> int:
    d = _dims(cfg)
    shapes = projection_shapes(cfg)
    return d["L"] * sum(r * (shapes[p][0] + shapes[p][1]) for p in targets)


def adapter_bytes(cfg, r: int, targets=PROJECTIONS, *, optimizer: bool = True) -> dict[str, int]:
    """A/B arena, gradient arena, AdamW m and v (fp32 each)."""
    n = lora_numel(cfg, r, targets) * _F
    return {"lora_params": n, "lora_grads": n, "adamw_state": 2 * n if optimizer else 0}


def _count(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def activation_bytes(cfg, batch: int, seq: int, r: int, *, checkpointing: bool = True, offload: bool = False,
                     dropout: bool = False, head_format: str = "float32", device: bool = True,
                     compute_dtype: str = "float32", f32_from_q8_0: bool | None = None,
                     activation_memory_budget: float = 0.0) -> dict[str, int]:
    """The training pass's buffers (forward_backward): each category and "peak", the bytes
    LlamaModel::LossResult::peak_train_bytes reports (its MemCounter's high-water mark).
    cfg: a config (dict or object), a Model, or a GGUFSource.
    f32_from_q8_0: head_format "float32" over a GGUF's tied Q8_0 token_embd without its fp32 table
    (the loss reads the rows: bf16 packs the lm_head's panels even for one loss chunk, fp32 decodes
    them into its GEMMs' B panels, no scratch); None derives it from cfg (a Model or a GGUFSource knows; a config
    alone is an HF checkpoint's fp32 table).
    activation_memory_budget: Model.activation_memory_budget (with checkpointing: the attention halves
    and whole layer sets it keeps, counted in layer_activations; _core.train.memory_plan's layers_kept and
    attention_kept say which).

    The engine's own allocation plan (cpp/src/model/train_memory.cpp, the sizes train_pass allocates),
    not a copy of it: _core.train.memory_plan."""
    d = _dims(cfg)
    _check_head_format(head_format)
    if f32_from_q8_0 is None:
        f32_from_q8_0 = _reads_q8_0_rows(cfg, head_format)
    p = _core.train.memory_plan(hidden_size=d["D"], intermediate_size=d["I"], vocab_size=d["V"],
                                num_hidden_layers=d["L"], num_attention_heads=d["Hq"], num_key_value_heads=d["Hkv"],
                                head_dim=d["hd"], batch=_count("batch", batch), seq=_count("seq", seq),
                                r=max(_count("r", r, 0), 1), backward=True,
                                checkpointing=bool(checkpointing), offload=bool(offload), dropout=bool(dropout),
                                compute_dtype=compute_dtype, head_format=head_format, device=bool(device),
                                f32_from_q8_0=bool(f32_from_q8_0),
                                activation_memory_budget=check_activation_memory_budget(activation_memory_budget))
    return {k: int(p[k]) for k in ("checkpoints", "layer_activations", "lora_scratch", "dropout", "final_norm",
                                   "backward_scratch", "cross_entropy", "peak")}


def train_step_bytes(cfg, batch: int, seq: int, r: int = 16, targets=PROJECTIONS, *, nf4: bool = True,
                     blocksize: int = 64, double_quant: bool = True, head_format: str = "float32",
                     checkpointing: bool = True, offload: bool = False, dropout: bool = False,
                     compute_dtype: str = "float32", activation_memory_budget: float = 0.0) -> dict[str, int]:
    """Everything above for one training step: weights + adapter + the pass's peak, and "total"."""
    out = weight_bytes(cfg, nf4=nf4, blocksize=blocksize, double_quant=double_quant, head_format=head_format)
    out.update(adapter_bytes(cfg, r, targets))
    act = activation_bytes(cfg, batch, seq, r, checkpointing=checkpointing, offload=offload, dropout=dropout,
                           head_format=head_format, compute_dtype=compute_dtype,
                           activation_memory_budget=activation_memory_budget)
    out["activations_peak"] = act["peak"]
    out["total"] = sum(out.values())
    return out


LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False)


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="Estimated device memory of a Llama-3-8B-shaped QLoRA step "
                                "(r=16, all seven projections; an estimate, not a measurement)")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--r", type=int, default=16)
    a = p.parse_args(argv)
    G = 2 ** 30
    print("config                          batch  weights  adapter  activations  total (GiB, estimated)")
    for head in ("float32", "bf16", "q8_0"):
        for offload in (False, True):
            for batch in (1, 2):
                t = train_step_bytes(LLAMA3_8B, batch, a.seq, a.r, head_format=head, offload=offload)
                w = sum(t[k] for k in ("nf4_weights", "quant_constants", "other_weights", "embedding", "lm_head"))
                ad = t["lora_params"] + t["lora_grads"] + t["adamw_state"]
                name = f"head {head}{', offload' if offload else ''}"
                print(f"{name:32s}{batch:5d}  {w / G:7.2f}  {ad / G:7.2f}  {t['activations_peak'] / G:11.2f}  "
                      f"{t['total'] / G:5.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
