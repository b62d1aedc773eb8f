"""Per-core NF4 decode GEMV rate in CPU time (1 thread): GB/s of packed weight (+ scales) per CPU
second, from cache (one weight called repeatedly: L2- and L3-sized) and from DRAM (copies > 2x L3,
read round-robin). CPU time (time.process_time) so a shared machine's other load does not count;
interleaved A/B over environment settings (--ab 'NAME=a/b': each run alternates the values).

  PYTHONPATH=python:build/dev python bench/bench_gemv_core.py --dtype float32 --ab QLORA_NF4_GEMV_M1=0/1

--shapes NxK,... times those [out, in] weights from DRAM instead of --where; --clock wall times
wall-clock (for --threads 2); the read bandwidth is probed before and after (machine line), and
each A/B prints the min and median of the per-run ratios (variant / first variant).
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
p.add_argument("--M", type=int, default=1)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--runs", type=int, default=7)
p.add_argument("--where", default="l2,l3,dram", help="comma list of l2, l3, dram")
p.add_argument("--ab", default="", help="NAME=v1/v2[/..]: alternate the environment variable over these values")
p.add_argument("--blocksize", type=int, default=64)
p.add_argument("--target-s", type=float, default=0.25, help="CPU seconds per measurement")
p.add_argument("--shapes", default="", help="NxK[,..]: [out, in] weights read from DRAM (replaces --where)")
p.add_argument("--clock", default="cpu", choices=["cpu", "wall"], help="cpu: time.process_time; wall: perf_counter")
p.add_argument("--bw-gib", type=float, default=0.5, help="GiB of the read-bandwidth probe (0: none)")
ARGS = p.parse_args()

import qlora_native  # noqa: E402
from qlora_native import nf4, ops  # noqa: E402

import _common  # noqa: E402


def main():
    qlora_native.set_num_threads(ARGS.threads)
    clock = time.process_time if ARGS.clock == "cpu" else time.perf_counter
    rng = np.random.default_rng(0)
    shapes = {"l2": (1024, 1024), "l3": (4096, 4096), "dram": (4096, 4096)}
    wheres = ARGS.where.split(",")
    if ARGS.shapes:
        wheres = [f"dram:{s}" for s in ARGS.shapes.split(",")]
        shapes.update({w: tuple(int(v) for v in w[5:].lower().split("x")) for w in wheres})
    minfo = _common.machine_info()
    bws = [_common.read_bandwidth(ARGS.bw_gib, ARGS.threads)] if ARGS.bw_gib > 0 else []
    print(_common.machine_line(minfo, {"read_bandwidth_gbps": bws[0] if bws else None, "threads": ARGS.threads}))
    variants = [("", None)]
    if ARGS.ab:
        name, vals = ARGS.ab.split("=", 1)
        variants = [(name, v) for v in vals.split("/")]
    print(f"{qlora_native.simd_level()} threads {ARGS.threads} dtype {ARGS.dtype} M {ARGS.M} "
          f"clock {ARGS.clock} load {os.getloadavg()[0]:.2f}")
    for where in wheres:
        n_out, n_in = shapes[where]
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        q = nf4.quantize(w, blocksize=ARGS.blocksize, double_quant=True)
        qb = _common.nf4_bytes(q)
        # "dram": copies totalling > 2x the L3 (300 MiB on the Emerald Rapids VM: 64 MiB was L3 there).
        l3 = ((_common.machine_info().get("caches") or {}).get("L3") or {}).get("bytes") or (32 << 20)
        copies = [q] + ([_common.copy_nf4(q) for _ in range(-(-max(64 << 20, 2 * l3) // qb) - 1)]
                        if where.startswith("dram") else [])
        x = rng.standard_normal((ARGS.M, n_in)).astype(np.float32)
        out = np.empty((ARGS.M, n_out), dtype=np.float32)

        def sweep(k):
            for _ in range(k):
                for c in copies:
                    ops.nf4_gemm_nt(x, c, out, compute_dtype=ARGS.dtype)
        res = {v: [] for _, v in variants}
        ref = None
        for name, v in variants:  # warm-up + reps per sweep
            if name:
                os.environ[name] = v
            sweep(1)
            if ref is None:
                ref = out.copy()
            elif not np.array_equal(out, ref):
                print(f"  note: {name}={v} changes bits: max rel diff "
                      f"{np.max(np.abs(out - ref)) / np.max(np.abs(ref)):.2e}")
        t0 = clock()
        sweep(1)
        reps = max(1, int(ARGS.target_s / max(1e-6, clock() - t0)))
        for i in range(ARGS.runs):  # ABBA: each run reverses the previous run's order (drift cancels)
            for name, v in (variants if i % 2 == 0 else variants[::-1]):
                if name:
                    os.environ[name] = v
                t0 = clock()
                sweep(reps)
                dt = clock() - t0
                res[v].append(qb * len(copies) * reps / dt / 1e9)
        for name, v in variants:
            r = res[v]
            print(f"  {where:4} {n_out}x{n_in} {qb / 2**20:5.1f} MiB x{len(copies):<3} {name}={v}: "
                  f"max {max(r):6.2f}  median {statistics.median(r):6.2f} GB/s per {ARGS.clock}-second"
                  + (f"  (x{max(r) / bws[0]:.2f} / x{statistics.median(r) / bws[0]:.2f} of the first probe's bandwidth)"
                     if bws and ARGS.clock == "wall" else ""))
        base = res[variants[0][1]]
        for name, v in variants[1:]:
            q = [b / a for a, b in zip(base, res[v])]
            print(f"    {name}={v} / {variants[0][1]} per run: min {min(q):.3f}  median {statistics.median(q):.3f}"
                  f"  max {max(q):.3f}  ({len(q)} pairs)")
    if bws:
        bws.append(_common.read_bandwidth(ARGS.bw_gib, ARGS.threads))
        print(f"read bandwidth ({ARGS.bw_gib:g} GiB, {ARGS.threads} threads) before/after: "
              + " / ".join(f"{b:.1f}" for b in bws) + " GB/s")


if __name__ == "__main__":
    main()
