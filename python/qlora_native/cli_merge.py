"""`qlora-native merge`: merge one LoRA adapter (or a weighted combination of several) into its base
and save the merged model: a plain HF checkpoint (unquantized), the bitsandbytes NF4 format
(--quantize nf4), optionally a llama.cpp GGUF too (--gguf); prints the measured drift table."""
from __future__ import annotations

import argparse
import os
import sys
import time

_COMBINATIONS_HELP = ("how several adapters combine (PEFT's add_weighted_adapter): svd, linear, cat, ties, ties_svd, "
                      "dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd")


def add_parser(sub) -> None:
    from .cli_common import MODEL_HELP, HelpFormatter

    p = sub.add_parser(
        "merge", help="merge LoRA adapter(s) into the base model and save it (HF checkpoint, NF4, GGUF)",
        formatter_class=HelpFormatter,
        description="Merges onto the base the adapter was trained on (NF4 by default: W = dequant(W_nf4) + "
                    "scaling * B @ A), saves the result in --output and prints how much the merged model differs "
                    "from base + adapter (logits, loss, perplexity) on --eval-text or a built-in sample.")
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--adapter", action="append", required=True, metavar="DIR",
                   help="PEFT LoRA adapter directory; repeat for a weighted combination (with --weights)")
    p.add_argument("--weights", default=None, help="comma-separated weight per adapter, e.g. 0.7,0.3 "
                                                    "(default: 1 for a single adapter)")
    p.add_argument("--combination", default="svd", help=_COMBINATIONS_HELP)
    p.add_argument("--density", type=float, default=None, help="density for ties / dare / magnitude_prune")
    p.add_argument("--svd-rank", type=int, default=None, help="rank of the *_svd combinations (default: the largest)")
    p.add_argument("--output", required=True, metavar="OUT", help="directory to write the merged model into")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="precision of the merged weights (and of the saved tensors)")
    p.add_argument("--quantize", choices=["nf4", "none"], default="none",
                   help="re-quantize the merged projections to NF4 (bitsandbytes format; drifts, see the table)")
    p.add_argument("--base-quantize", choices=["nf4", "none"], default="nf4",
                   help="the base the adapter was trained on: NF4 (qlora-native train's default) or fp32")
    p.add_argument("--gguf", default=None, metavar="TYPE",
                   help="also write OUT/model.TYPE.gguf for llama.cpp (f32, f16, bf16 or q8_0)")
    p.add_argument("--eval-text", default=None, metavar="FILE",
                   help="UTF-8 text file the drift is measured on (default: a built-in sample)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.set_defaults(func=run)


def _weights(args) -> list[float] | None:
    from .cli_common import UsageError

    n = len(args.adapter)
    if args.weights is None:
        if n > 1:
            raise UsageError(f"--weights: {n} adapters need one weight each, e.g. --weights "
                             f"{','.join(['0.5'] * n)}")
        return None
    try:
        w = [float(x) for x in args.weights.split(",")]
    except ValueError:
        raise UsageError(f"--weights must be comma-separated numbers, got {args.weights!r}") from None
    if len(w) != n:
        raise UsageError(f"--weights has {len(w)} value(s) for {n} adapter(s)")
    return w


def _check_args(args) -> list[float] | None:
    from .cli_common import UsageError

    w = _weights(args)
    if w is None and (args.density is not None or args.svd_rank is not None):
        raise UsageError("--density / --svd-rank apply to a combination of adapters (--weights)")
    if os.path.exists(args.output) and not os.path.isdir(args.output):
        raise NotADirectoryError(f"--output {args.output}: exists and is not a directory")
    if args.gguf is not None and args.gguf.lower() not in ("f32", "f16", "bf16", "q8_0"):
        raise UsageError(f"--gguf must be f32, f16, bf16 or q8_0, got {args.gguf!r}")
    return w


def _read_text(path: str) -> str:
    if os.path.isdir(path):
        raise IsADirectoryError(f"--eval-text {path}: is a directory, not a text file")
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"--eval-text {path}: not UTF-8 text (byte {e.start})") from None


def run(args: argparse.Namespace) -> int:
    from . import Model, set_num_threads
    from .cli_common import UsageError, resolve_model
    from .merge import format_drift

    weights = _check_args(args)
    eval_text = _read_text(args.eval_text) if args.eval_text is not None else None
    path = resolve_model(args.model)
    if args.threads is not None:
        set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = Model.from_pretrained(path, quantize=None if args.base_quantize == "none" else "nf4")
    if args.gguf is not None and not hasattr(model, "export_gguf"):
        raise UsageError("--gguf: this version of qlora_native has no GGUF export")
    names = [f"adapter{i}" for i in range(len(args.adapter))]
    for name, d in zip(names, args.adapter):
        model.load_adapter(d, name)
    if weights is not None:
        if not hasattr(model, "add_weighted_adapter"):
            raise UsageError("--weights: this version of qlora_native cannot combine adapters (one --adapter only)")
        kw = {"density": args.density} if args.density is not None else {}
        if args.svd_rank is not None:
            kw["svd_rank"] = args.svd_rank
        model.add_weighted_adapter(names, weights, "combined", combination_type=args.combination, **kw)
        for name in names:
            model.delete_adapter(name)
        model.set_active_adapter("combined")
    print(f"[loaded {path} and {len(names)} adapter(s) in {time.perf_counter() - t0:.1f}s]", file=sys.stderr)

    bar = None
    if not args.no_progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=model.config.num_hidden_layers, desc="merge", unit="layer", dynamic_ncols=True)
    try:
        report = model.merge_and_unload(quantize=None if args.quantize == "none" else "nf4", dtype=args.dtype,
                                        eval_text=eval_text, progress=None if bar is None else
                                        (lambda done: bar.update(done - bar.n)))
    finally:
        if bar is not None:
            bar.close()
    model.save_pretrained(args.output, dtype=args.dtype)
    what = "NF4 (bitsandbytes)" if args.quantize == "nf4" else f"HF checkpoint, {args.dtype}"
    print(f"[saved {args.output} ({what})]", file=sys.stderr)
    if args.gguf is not None:
        gpath = os.path.join(args.output, f"model.{args.gguf.lower()}.gguf")
        model.export_gguf(gpath, args.gguf.lower())
        print(f"[saved {gpath}]", file=sys.stderr)
    report["adapter"] = " + ".join(args.adapter) if weights is None else \
        f"{args.combination}({', '.join(f'{w:g}*{d}' for w, d in zip(weights, args.adapter))})"
    print(format_drift(report))
    return 0
