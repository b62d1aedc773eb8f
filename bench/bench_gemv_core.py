"""Per-core NF4 decode GEMV rate in CPU time (1 thread): GB/s of packed weight (+ scales) per CPU
second, from cache (one weight called repeatedly: L2- and L3-sized) and from DRAM (copies > 2x L3,
read round-robin). CPU time (time.process_time) so a shared machine's other load does not count;
interleaved A/B over environment settings (--ab 'NAME=a/b': each run alternates the values).

  PYTHONPATH=python:build/dev python bench/bench_gemv_core.py --dtype float32 --ab QLORA_NF4_GEMV_M1=0/1
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
ARGS = p.parse_args()

import qlora_native  # noqa: E402
from qlora_native import nf4, ops  # noqa: E402

import _common  # noqa: E402


def main():
    qlora_native.set_num_threads(ARGS.threads)
    rng = np.random.default_rng(0)
    shapes = {"l2": (1024, 1024), "l3": (4096, 4096), "dram": (4096, 4096)}
    variants = [("", None)]
    if ARGS.ab:
        name, vals = ARGS.ab.split("=", 1)
        variants = [(name, v) for v in vals.split("/")]
    print(f"{qlora_native.simd_level()} threads {ARGS.threads} dtype {ARGS.dtype} M {ARGS.M} "
          f"load {os.getloadavg()[0]:.2f}")
    for where in ARGS.where.split(","):
        n_out, n_in = shapes[where]
        w = (rng.standard_normal((n_out, n_in)) * 0.02).astype(np.float32)
        q = nf4.quantize(w, blocksize=ARGS.blocksize, double_quant=True)
        qb = _common.nf4_bytes(q)
        # "dram": copies totalling > 2x the L3 (300 MiB on the Emerald Rapids VM: 64 MiB was L3 there).
        l3 = ((_common.machine_info().get("caches") or {}).get("L3") or {}).get("bytes") or (32 << 20)
        copies = [q] + ([_common.copy_nf4(q) for _ in range(-(-max(64 << 20, 2 * l3) // qb) - 1)]
                        if where == "dram" else [])
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
        t0 = time.process_time()
        sweep(1)
        reps = max(1, int(ARGS.target_s / max(1e-6, time.process_time() - t0)))
        for _ in range(ARGS.runs):
            for name, v in variants:
                if name:
                    os.environ[name] = v
                t0 = time.process_time()
                sweep(reps)
                dt = time.process_time() - t0
                res[v].append(qb * len(copies) * reps / dt / 1e9)
        for name, v in variants:
            r = res[v]
            print(f"  {where:4} {n_out}x{n_in} {qb / 2**20:5.1f} MiB x{len(copies):<3} {name}={v}: "
                  f"max {max(r):6.2f}  median {statistics.median(r):6.2f} GB/s per CPU-second")


if __name__ == "__main__":
    main()
