"""Merging a LoRA adapter into the base weights (the methods of Model; math in C++, merge.cpp).

    model.merge_adapter()                 # W = deq(W_nf4) + scaling * B @ A, fp32; adapter kept, inactive
    model.unmerge_adapter()               # W -= scaling * B @ A (only while unquantized)
    report = model.merge_and_unload(quantize="nf4")   # merged, re-quantized, adapters removed
    print(format_drift(report))

The merge is done onto the base the adapter was trained on: an NF4 projection is dequantized with
the engine's own codec, never replaced by a different-precision original. Unquantized results are
kept in fp32 (dtype="bfloat16" / "float16" rounds each merged weight to that dtype; it is held in
fp32 and save_pretrained writes it in that dtype); quantize="nf4" re-quantizes with the base's
blocksize and double quantization, which changes the model: merge_and_unload measures how much
(logits and loss of "base + adapter" vs "merged" on a text) instead of assuming.
"""
from __future__ import annotations

import math

import numpy as np

__all__ = ["DEFAULT_EVAL_TEXT", "MERGE_DTYPES", "format_drift"]

MERGE_DTYPES = ("float32", "bfloat16", "float16")

# The default drift sample (a few hundred tokens with the usual BPE tokenizers): plain prose,
# some numbers and code so the report is not about one register only.
DEFAULT_EVAL_TEXT = (
    "The history of computing is a story of layers. At the bottom, transistors switch on and off "
    "billions of times per second; above them, logic gates combine those switches into adders, "
    "multiplexers and memory cells. Processors fetch instructions, decode them and execute them, "
    "while caches try to keep the data they need close at hand. Operating systems share the machine "
    "between programs, and compilers translate the languages people write into the instructions the "
    "processor understands.\n\n"
    "A language model is one more layer on top. It reads a sequence of tokens and predicts the next "
    "one, again and again. Training adjusts millions of weights so that the predictions match the text "
    "it has seen; fine-tuning with a low-rank adapter changes only a small fraction of them. When the "
    "adapter is merged, its update is added to the original weights, and the model can be shipped as a "
    "single file.\n\n"
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n\n"
    "In 1969, the first message was sent over the ARPANET between two computers about 350 miles apart. "
    "Only the first two letters arrived before the system crashed. Today, more than five billion people "
    "use the internet, and a typical web page loads dozens of resources from servers on several "
    "continents within a second or two. Questions: What is 17 times 23? The answer is 391. How many "
    "days are there in a leap year? There are 366."
)
_DEFAULT_TOKENS = 256  # random-id sample length when the model has no tokenizer


def check_dtype(dtype) -> str:
    if dtype not in MERGE_DTYPES:
        raise ValueError(f"merge dtype must be one of {', '.join(MERGE_DTYPES)}, got {dtype!r}")
    return dtype


def check_quantize(quantize):
    if quantize not in (None, "nf4"):
        raise ValueError(f"quantize must be None (keep the merged weights unquantized) or 'nf4', got {quantize!r}")
    return quantize


def _merged(model) -> dict | None:
    return model.__dict__.get("_merged")


def _progress_cb(progress):
    if progress is None:
        return None
    if not callable(progress):
        raise ValueError(f"progress must be a callable (layer_done -> None) or None, got {type(progress).__name__}")
    return lambda layer: progress(int(layer))


def _guarded(model, fn):
    """Runs fn(); the engine refuses (ValueError) while a generation context is open on the model or a
    pass reads its weights (generate runs each call in its own context)."""
    return fn()


def merge_adapter(model, name=None, *, quantize=None, dtype="float32", progress=None) -> None:
    name = model._check_adapter(name)
    check_quantize(quantize)
    check_dtype(dtype)
    cb = _progress_cb(progress)
    m = _merged(model)
    if m is not None:
        raise ValueError(f"adapter {m['name']!r} is already merged into the weights; unmerge_adapter() first "
                         f"(one merged adapter at a time)")
    _guarded(model, lambda: model._core.lora_merge(name, False, quantize == "nf4", dtype, cb))
    model.__dict__["_merged"] = {"name": name, "quantize": quantize, "dtype": dtype}
    model.__dict__["_merged_dtype"] = dtype if quantize is None else None


def unmerge_adapter(model) -> None:
    m = _merged(model)
    if m is None:
        raise ValueError("no adapter is merged (merge_adapter first)")
    if m["quantize"] is not None:
        raise ValueError(f"adapter {m['name']!r} was merged and re-quantized to {m['quantize'].upper()}: the "
                         f"rounding cannot be undone, so it cannot be unmerged; reload the base model and the "
                         f"adapter instead")
    _guarded(model, lambda: model._core.lora_merge(m["name"], True, False, "float32", None))
    del model.__dict__["_merged"]
    if model.active_adapter is None:
        model._core.lora_set_active(m["name"])


def eval_sample(model, eval_text=None, eval_ids=None) -> tuple[np.ndarray, str]:
    """([1, T] int32 ids, description) of the drift sample."""
    if eval_text is not None and eval_ids is not None:
        raise ValueError("give eval_text or eval_ids, not both")
    limit = model.config.max_position_embeddings
    if eval_ids is not None:
        ids, what = model._check_ids(eval_ids), "eval_ids"
        if ids.shape[0] != 1:
            raise ValueError(f"eval_ids must be one sequence [T] or [1, T], got shape {ids.shape}")
    else:
        tok = getattr(model, "tokenizer", None)
        if eval_text is None and tok is None:
            rng = np.random.default_rng(0)  # fixed: the same sample every time
            n = min(_DEFAULT_TOKENS, limit)
            return rng.integers(0, model.config.vocab_size, (1, n)).astype(np.int32), f"{n} random token ids (seed 0; no tokenizer)"
        if not isinstance(eval_text if eval_text is not None else "", str):
            raise ValueError(f"eval_text must be a str, got {type(eval_text).__name__}")
        if tok is None:
            raise ValueError("eval_text needs the model's tokenizer (none loaded); pass eval_ids instead")
        what = "eval_text" if eval_text is not None else "built-in sample text"
        ids = model._check_ids(tok.encode(eval_text if eval_text is not None else DEFAULT_EVAL_TEXT))
    if ids.shape[1] < 2:
        raise ValueError(f"{what} must have at least 2 tokens (loss needs a next token), got {ids.shape[1]}")
    if ids.shape[1] > limit:
        ids = ids[:, :limit]
        what += f" (truncated to max_position_embeddings {limit})"
    return np.ascontiguousarray(ids, np.int32), what


def _loss(logits: np.ndarray, ids: np.ndarray) -> float:
    """Mean next-token cross-entropy (float64) of logits [1, T, V] on ids [1, T]."""
    z = logits[0, :-1].astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(z.shape[0]), ids[0, 1:]]))


def drift_report(ids: np.ndarray, before: np.ndarray, after: np.ndarray, base: np.ndarray | None = None) -> dict:
    """before: logits of base + adapter, after: of the merged model, base: of the base model alone
    (optional) — all [1, T, V] on ids [1, T]."""
    before64, after64 = before.astype(np.float64), after.astype(np.float64)
    d = np.abs(before64 - after64)
    la, lm = _loss(before, ids), _loss(after, ids)
    r = {
        "tokens": int(ids.shape[1]),
        "max_abs_logit_diff": float(d.max()),
        "mean_abs_logit_diff": float(d.mean()),
        "top1_agreement": float(np.mean(before[0].argmax(-1) == after[0].argmax(-1))),
        "loss_adapter": la, "loss_merged": lm, "loss_diff": lm - la,
        "ppl_adapter": math.exp(la), "ppl_merged": math.exp(lm),
    }
    if base is not None:
        # How much of the adapter's change of the logits the merged model keeps: the projection of
        # (merged - base) on (adapter - base), 1 = all of it, 0 = none (merged behaves as the base).
        effect = before64 - base
        denom = float(np.sum(effect * effect))
        r.update({"loss_base": _loss(base, ids), "mean_abs_adapter_effect": float(np.abs(effect).mean()),
                  "adapter_effect_kept": float(np.sum((after64 - base) * effect) / denom) if denom > 0 else
                  float("nan")})
    return r


def merge_and_unload(model, quantize=None, dtype="float32", eval_text=None, eval_ids=None, progress=None) -> dict:
    if _merged(model) is not None:
        raise ValueError(f"adapter {_merged(model)['name']!r} is already merged (merge_adapter); unmerge_adapter() "
                         f"first, or delete its adapters to keep the merged weights")
    name = model._check_adapter(None)
    check_quantize(quantize)
    check_dtype(dtype)
    cb = _progress_cb(progress)
    ids, source = eval_sample(model, eval_text, eval_ids)

    def run():
        before = model._core.forward(ids, None)  # base + adapter
        model._core.lora_set_active("")
        try:
            base = model._core.forward(ids, None)  # the base model alone
        finally:
            model._core.lora_set_active(name)
        model._core.lora_merge(name, False, quantize == "nf4", dtype, cb)
        return before, model._core.forward(ids, None), base  # merged (the adapter is inactive now)

    before, after, base = _guarded(model, run)
    for n in list(model.adapters):  # unload: the model is a plain (merged) base model now
        model._core.lora_delete(n)
        model._lora_state().pop(n)
        model._lora_lr.pop(n, None)
    model.__dict__["_merged_dtype"] = dtype if quantize is None else None
    report = {"adapter": name, "quantize": quantize, "dtype": dtype, "eval": source}
    report.update(drift_report(ids, before, after, base))
    return report


def format_drift(report: dict) -> str:
    """The drift report as a small text table."""
    base = "loss_base" in report
    rows = [("", "base + adapter", "merged", "difference") + (("base alone",) if base else ()),
            ("loss", f"{report['loss_adapter']:.5f}", f"{report['loss_merged']:.5f}", f"{report['loss_diff']:+.5f}")
            + ((f"{report['loss_base']:.5f}",) if base else ()),
            ("perplexity", f"{report['ppl_adapter']:.4f}", f"{report['ppl_merged']:.4f}",
             f"{report['ppl_merged'] - report['ppl_adapter']:+.4f}")
            + ((f"{math.exp(report['loss_base']):.4f}",) if base else ())]
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"merged adapter {report['adapter']!r} -> "
             f"{'NF4 (re-quantized)' if report['quantize'] else report['dtype']}; "
             f"drift on {report['tokens']} tokens of {report['eval']}:"]
    lines += ["  " + "  ".join(c.rjust(w[i]) if i else c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"  logits: max |diff| {report['max_abs_logit_diff']:.4g}, mean |diff| "
                 f"{report['mean_abs_logit_diff']:.4g}; top-1 agreement {100 * report['top1_agreement']:.2f}%")
    if base:
        lines.append(f"  adapter effect kept by the merge: {100 * report['adapter_effect_kept']:.1f}% "
                     f"(mean |logit change| of the adapter {report['mean_abs_adapter_effect']:.4g})")
    return "\n".join(lines)
