#!/usr/bin/env python
"""Loss of quality from NF4: perplexity of SmolLM2-135M on a fixed text, NF4 vs unquantized.

Engines: qlora_native with quantize="nf4" and with quantize=None (the GGUF's weights dequantized
to fp32); transformers fp32 on the same GGUF (should match our fp32 closely); bitsandbytes NF4
(transformers with its projections NF4-quantized by bitsandbytes: should match our NF4 closely);
llama.cpp on the GGUF (Q4_1 weights, its own quantized activations). Engines whose package is
missing are skipped. Perplexity is
computed from each engine's logits with numpy in float64, over sliding windows (HF's method:
window --window tokens, stride --stride; each token is scored once, with up to window-1 tokens
of context). Also reported against our fp32 logits: mean KL(fp32 || engine) per token, top-1
agreement, and the largest logit difference.

    PYTHONPATH=python:build/dev python bench/perplexity.py [--window 512 --stride 256]

Writes bench/results/perplexity.json. The text is bench/_common.py TEXT (about 1,700 tokens), or
--text-file (e.g. the public-domain botchan.txt from the sentencepiece sdist, with --max-tokens).
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ROWS = 128  # log-softmax in row chunks: bounds the float64 temporaries


def log_softmax64(logits):
    """float64 log-softmax of float32 logits [T, V]."""
    x = logits.astype(np.float64)
    x -= x.max(axis=1, keepdims=True)
    x -= np.log(np.exp(x).sum(axis=1, keepdims=True))
    return x


def windows(n, window, stride):
    """(begin, end, first scored position) per window: every target position 1..n-1 scored once."""
    out, prev_end, begin = [], 1, 0
    while True:
        end = min(begin + window, n)
        out.append((begin, end, prev_end))
        prev_end = end
        if end == n:
            return out
        begin += stride


def load_engines(gguf, names, threads, window):
    import qlora_native

    qlora_native.set_num_threads(threads)
    fns = {}
    for name in names:
        t0 = time.perf_counter()
        if name in ("qlora_nf4", "qlora_fp32"):
            m = qlora_native.Model.from_pretrained(gguf, quantize="nf4" if name == "qlora_nf4" else None, tokenizer=None)
            fns[name] = lambda ids, m=m: m(np.asarray([ids], np.int32))[0]  # [T, V]
        elif name in ("transformers_fp32", "bnb_nf4"):
            try:
                import torch
                from transformers import AutoModelForCausalLM
                if name == "bnb_nf4":
                    import bitsandbytes.functional as bnbf
            except ImportError as e:
                print(f"  {name}: skipped ({e})")
                continue
            torch.set_num_threads(threads)
            d, f = os.path.split(gguf)
            tm = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
            if name == "bnb_nf4":  # the independent NF4 reference: bitsandbytes' codec, same settings
                with torch.no_grad():
                    for mod in tm.model.layers.modules():
                        if isinstance(mod, torch.nn.Linear):
                            q, st = bnbf.quantize_4bit(mod.weight.data, blocksize=64, compress_statistics=True,
                                                       quant_type="nf4")
                            mod.weight.data = bnbf.dequantize_4bit(q, st).float()

            def fn(ids, tm=tm):
                with torch.inference_mode():
                    return tm(input_ids=torch.tensor([ids])).logits[0].float().numpy()
            fns[name] = fn
        elif name == "llama_cpp":
            try:
                from llama_cpp import Llama
            except ImportError as e:
                print(f"  llama.cpp: skipped ({e})")
                continue
            llm = Llama(model_path=gguf, n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                        n_threads_batch=threads, logits_all=True, verbose=False)

            def fn(ids, llm=llm):
                llm.reset()
                llm.eval(ids)
                return np.array(llm.scores[:len(ids)], np.float32)
            fns[name] = fn
        else:
            raise SystemExit(f"unknown engine {name!r}")
        print(f"  loaded {name} ({time.perf_counter() - t0:.1f} s)", flush=True)
    return fns


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=256)
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    p.add_argument("--text-file", default=None, help="a UTF-8 text to score instead of the built-in one")
    p.add_argument("--engines", default="qlora_nf4,qlora_fp32,transformers_fp32,bnb_nf4,llama_cpp",
                   help="bnb_nf4: transformers with every projection NF4-quantized and dequantized by "
                        "bitsandbytes (blocksize 64, double quant); llama_cpp: the GGUF in llama.cpp (Q4_1)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "perplexity.json"))
    args = p.parse_args()
    if not 0 < args.stride <= args.window:
        raise SystemExit("need 0 < --stride <= --window")
    gguf = args.gguf or _common.default_gguf()
    import qlora_native

    threads = args.threads or qlora_native.num_threads()
    text = None
    if args.text_file:
        with open(args.text_file, encoding="utf-8") as f:
            text = f.read()
    ids = _common.tokenize_text(gguf, text)[:args.max_tokens]
    names = [e.strip() for e in args.engines.split(",") if e.strip()]
    fns = load_engines(gguf, names, threads, args.window)
    ref = "qlora_fp32" if "qlora_fp32" in fns else None
    stats = {n: {"nll": 0.0, "kl": 0.0, "top1": 0, "max_dlogit": 0.0} for n in fns}
    scored = 0
    for begin, end, first in windows(len(ids), args.window, args.stride):
        win = ids[begin:end]
        tgt = np.asarray(ids[first:end])  # targets of logits rows first-1-begin .. end-2-begin
        r0 = first - 1 - begin
        logits = {n: fn(win)[r0:end - 1 - begin] for n, fn in fns.items()}  # [t, V]
        scored += len(tgt)
        for c in range(0, len(tgt), ROWS):
            sl = slice(c, c + ROWS)
            lp = {n: log_softmax64(lg[sl]) for n, lg in logits.items()}
            for n, s in stats.items():
                s["nll"] -= lp[n][np.arange(len(tgt[sl])), tgt[sl]].sum()
                if ref:
                    pr = np.exp(lp[ref])
                    s["kl"] += (pr * (lp[ref] - lp[n])).sum()
                    s["top1"] += int((lp[n].argmax(1) == lp[ref].argmax(1)).sum())
                    s["max_dlogit"] = max(s["max_dlogit"], float(np.abs(logits[n][sl] - logits[ref][sl]).max()))
    info = _common.machine_info()
    info.update(gguf=gguf, threads=threads, tokens=len(ids), scored=scored, window=args.window, stride=args.stride)
    rows = {}
    print(f"\nperplexity of SmolLM2-135M ({os.path.basename(gguf)}) on a fixed text ({len(ids)} tokens, "
          f"{scored} scored; window {args.window}, stride {args.stride})")
    hdr = f"{'engine':<19} {'ppl':>8} {'nll/token':>10}" + (f" {'KL vs fp32':>11} {'top1=fp32':>10} {'max|dlogit|':>11}" if ref else "")
    print(hdr)
    print("-" * len(hdr))
    for n, s in stats.items():
        nll = s["nll"] / scored
        rows[n] = {"perplexity": float(np.exp(nll)), "nll_per_token": nll}
        line = f"{n:<19} {np.exp(nll):>8.3f} {nll:>10.4f}"
        if ref:
            rows[n].update(kl_vs_qlora_fp32=s["kl"] / scored, top1_agreement_vs_qlora_fp32=s["top1"] / scored,
                           max_abs_logit_diff_vs_qlora_fp32=s["max_dlogit"])
            line += f" {s['kl'] / scored:>11.5f} {s['top1'] / scored:>10.3f} {s['max_dlogit']:>11.4f}"
        print(line)
    if "qlora_nf4" in rows and "qlora_fp32" in rows:
        d = rows["qlora_nf4"]["perplexity"] / rows["qlora_fp32"]["perplexity"] - 1
        print(f"NF4 vs unquantized: perplexity {100 * d:+.2f}%")
    print("unquantized = the GGUF's (Q4_1) weights dequantized to fp32; NF4 re-quantizes those.")
    _common.write_json(args.out, {"benchmark": "perplexity", "info": info, "results": rows})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
