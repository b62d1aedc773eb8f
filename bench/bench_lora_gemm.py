#!/usr/bin/env python
"""The rank-r LoRA GEMMs of one SmolLM2-135M training step (4 x 256 tokens, r = 16, all seven
projections, q/k/v and gate/up grouped, the backward keeping t), timed one shape at a time through
qlora_native.ops at a fixed thread count: process CPU time per call (it includes ~14 us of Python
call overhead on a 2.1 GHz Xeon), min / median over --samples samples, or over interleaved A/B pairs
of an env switch read per call (--switch VAR: 0 vs 1).

    PYTHONPATH=python:build/dev python bench/bench_lora_gemm.py [--threads 1] [--samples 7] [--switch VAR]
        [--compute-dtype bfloat16]   # the bf16-compute GEMMs QLORA_LORA_BF16 would route them to

Prints the machine line and one row per shape; writes bench/results/bench_lora_gemm.json (--out).
Per shape: ms per call, GFLOP/s, and GB/s of the least traffic (operands read once, C read and
written when beta != 0): these GEMMs do 2 * r FLOPs per element of the big operand, so on one core
they stream it at about the L3 bandwidth. Weights: forward shapes run twice per layer but the last
(checkpoint recompute, 2L - 1 = 59 times), backward ones once (30); step = weight x median.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

M, R = 1024, 16
H, I, KV = 576, 1536, 192
# (name, layout, M, N, K, beta, per-step count); layouts as ops.gemm_nt / gemm_nn / gemm_tn
FWD, BWD = 59, 30
SHAPES = [
    ("shrink qkv", "nt", M, 3 * R, H, 0.0, FWD), ("shrink o", "nt", M, R, H, 0.0, FWD),
    ("shrink gate/up", "nt", M, 2 * R, H, 0.0, FWD), ("shrink down", "nt", M, R, I, 0.0, FWD),
    ("expand q,o,down", "nt", M, H, R, 1.0, 3 * FWD), ("expand k,v", "nt", M, KV, R, 1.0, 2 * FWD),
    ("expand gate,up", "nt", M, I, R, 1.0, 2 * FWD),
    ("dt q,o,down", "nn", M, R, H, 0.0, 3 * BWD), ("dt k,v", "nn", M, R, KV, 0.0, 2 * BWD),
    ("dt gate,up", "nn", M, R, I, 0.0, 2 * BWD),
    ("dB q,o,down", "tn", H, R, M, 1.0, 3 * BWD), ("dB k,v", "tn", KV, R, M, 1.0, 2 * BWD),
    ("dB gate,up", "tn", I, R, M, 1.0, 2 * BWD),
    ("dA qkv", "tn", 3 * R, H, M, 1.0, BWD), ("dA o", "tn", R, H, M, 1.0, BWD),
    ("dA gate/up", "tn", 2 * R, H, M, 1.0, BWD), ("dA down", "tn", R, I, M, 1.0, BWD),
    ("dx qkv", "nn", M, H, 3 * R, 1.0, BWD), ("dx o", "nn", M, H, R, 1.0, BWD),
    ("dx gate/up", "nn", M, H, 2 * R, 1.0, BWD), ("dx down", "nn", M, I, R, 1.0, BWD),
]


def operands(rng, layout, m, n, k):
    a = rng.standard_normal((k, m) if layout == "tn" else (m, k)).astype(np.float32)
    b = rng.standard_normal((n, k) if layout == "nt" else (k, n)).astype(np.float32)
    return a, b, rng.standard_normal((m, n)).astype(np.float32)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--samples", type=int, default=7, help="samples (A/B pairs with --switch)")
    p.add_argument("--calls", type=int, default=0, help="calls per sample (default: ~20 ms of work)")
    p.add_argument("--switch", default=None, help="env var set to 0 and 1 in turn (read per call by the engine)")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--only", default="", help="comma list of name prefixes")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                  "bench_lora_gemm.json"))
    args = p.parse_args()
    import qlora_native
    from qlora_native import ops

    qlora_native.set_num_threads(args.threads)
    fn = {"nt": ops.gemm_nt, "nn": ops.gemm_nn, "tn": ops.gemm_tn}
    rng = np.random.default_rng(0)
    variants = (0, 1) if args.switch else (None,)
    info = _common.machine_info()
    print(_common.machine_line(info) + f"; load average {info.get('loadavg')}")
    rows = []
    what = f"{args.switch} 0 vs 1, " if args.switch else ""
    print(f"# {what}{args.threads} thread(s), {args.compute_dtype}, process CPU ms per call, min/median of {args.samples}")
    tot = {v: 0.0 for v in variants}
    for name, lay, m, n, k, beta, count in SHAPES:
        if args.only and not any(name.startswith(s) for s in args.only.split(",")):
            continue
        a, b, c = operands(rng, lay, m, n, k)
        calls = args.calls or max(3, int(20e-3 / (2.0 * m * n * k / 60e9)))
        t = {v: [] for v in variants}
        for _ in range(args.samples):
            for v in variants:
                if v is not None:
                    os.environ[args.switch] = str(v)
                kw = dict(alpha=0.5, beta=beta, backend=args.backend, compute_dtype=args.compute_dtype)
                fn[lay](a, b, c, **kw)  # warm
                t0 = time.process_time()
                for _ in range(calls):
                    fn[lay](a, b, c, **kw)
                t[v].append((time.process_time() - t0) / calls * 1e3)
        gf = 2.0 * m * n * k / 1e6
        gb = 4.0 * (m * k + n * k + m * n * (2 if beta else 1)) / 1e6
        cells = []
        for v in variants:
            med = statistics.median(t[v])
            tot[v] += med * count
            cells.append(f"{'' if v is None else f'{v}: '}{min(t[v]):7.3f}/{med:7.3f} ms {gf / med:6.1f} GFLOP/s "
                         f"{gb / med:5.1f} GB/s x{count} {med * count:6.1f} ms")
        print(f"{name:16s} {lay} {m:5d}x{n:5d}x{k:5d}  " + "  |  ".join(cells))
        rows.append({"name": name, "layout": lay, "M": m, "N": n, "K": k, "beta": beta, "per_step": count,
                     "ms": {str(v): t[v] for v in variants}, "gflop": gf / 1e3, "least_mb": gb})
    print("step total (weighted medians): " + ", ".join(f"{'' if v is None else f'{v}: '}{tot[v]:.1f} ms" for v in variants))
    if args.switch:
        os.environ.pop(args.switch, None)
    _common.write_json(args.out, {"benchmark": "bench_lora_gemm", "machine": info, "threads": args.threads,
                                  "compute_dtype": args.compute_dtype, "switch": args.switch, "shapes": rows,
                                  "step_ms": {str(v): tot[v] for v in variants}})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
