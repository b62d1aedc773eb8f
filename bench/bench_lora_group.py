#!/usr/bin/env python
"""A/B of the grouped LoRA calls of the training pass (QLORA_LORA_GROUP=0 turns them off) on the CPU.

1. The training step: SmolLM2-135M NF4, batch x seq (default 4 x 256), LoRA r 16 / alpha 32 on all
   seven projections, dropout 0, gradient checkpointing, fp32 compute, AdamW; CPU time of
   zero_grad + forward_backward + optimizer_step, grouping off and on interleaved (ABBA) in one process.
2. The GEMMs that grouping replaces, at the same shapes (M = batch x seq tokens, D = 576, r): per layer
   the q/k/v (3 modules) and gate/up (2) shrinks x·Aᵀ (3 per step: forward, checkpoint recompute,
   backward), dA += dtᵀ·x and dX += dt·A, one GEMM per module vs one with the ranks stacked.

One thread by default (--threads), so CPU time is the work done and a loaded machine adds little noise.

    PYTHONPATH=python:build/dev python bench/bench_lora_group.py [--rounds 6] [--micro-rounds 7] [--no-step]
"""
import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402


def step_ab(args):
    import qlora_native

    m = qlora_native.Model.from_pretrained(args.gguf or _common.default_gguf(), quantize="nf4", tokenizer=None)
    m.compute_dtype = "float32"
    m.add_adapter("b", qlora_native.LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                                               target_modules="all-linear"), seed=0)
    m.set_active_adapter("b")
    m.configure_optimizer(lr=1e-4)
    m.gradient_checkpointing = True
    m.train()
    ids = np.random.default_rng(0).integers(0, m.config.vocab_size, size=(args.batch, args.seq)).astype(np.int32)
    mask = np.ones_like(ids)

    def step(on):
        os.environ["QLORA_LORA_GROUP"] = "1" if on else "0"
        t0 = time.process_time()
        m.zero_grad()
        m.forward_backward(ids, ids, mask)
        m.optimizer_step()
        return time.process_time() - t0

    step(False), step(True)  # warm-up
    res = {False: [], True: []}
    for i in range(args.rounds):
        for on in ((False, True) if i % 2 == 0 else (True, False)):
            res[on].append(step(on))
    os.environ.pop("QLORA_LORA_GROUP")
    return res


def micro_ab(args):
    from qlora_native import ops

    M, D, r = args.batch * args.seq, 576, args.r
    rng = np.random.default_rng(0)
    X = rng.standard_normal((M, D), dtype=np.float32)

    def run(n, grouped, reps):
        A = rng.standard_normal((n * r, D), dtype=np.float32) * 0.05
        dt = rng.standard_normal((M, n * r), dtype=np.float32)
        As = [np.ascontiguousarray(A[i * r:(i + 1) * r]) for i in range(n)]
        dts = [np.ascontiguousarray(dt[:, i * r:(i + 1) * r]) for i in range(n)]
        t, ts = np.zeros((M, n * r), np.float32), [np.zeros((M, r), np.float32) for _ in range(n)]
        dA, dAs = np.zeros((n * r, D), np.float32), [np.zeros((r, D), np.float32) for _ in range(n)]
        dX = np.zeros((M, D), np.float32)
        t0 = time.thread_time()
        for _ in range(reps):
            if grouped:
                for _ in range(3):
                    ops.gemm_nt(X, A, t)
                ops.gemm_tn(dt, X, dA, beta=1.0)
                ops.gemm_nn(dt, A, dX, beta=1.0)
            else:
                for _ in range(3):
                    for i in range(n):
                        ops.gemm_nt(X, As[i], ts[i])
                for i in range(n):
                    ops.gemm_tn(dts[i], X, dAs[i], beta=1.0)
                for i in range(n):
                    ops.gemm_nn(dts[i], As[i], dX, beta=1.0)
        return (time.thread_time() - t0) / reps

    res = {}
    for n in (3, 2):
        run(n, False, 2), run(n, True, 2)
    for i in range(args.micro_rounds):
        for n in (3, 2):
            for g in ((False, True) if i % 2 == 0 else (True, False)):
                res.setdefault((n, g), []).append(run(n, g, 20))
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gguf", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--rounds", type=int, default=6, help="ABBA rounds of the training step")
    p.add_argument("--micro-rounds", type=int, default=7)
    p.add_argument("--no-step", action="store_true", help="only the GEMM micro-benchmark")
    args = p.parse_args(argv)
    import qlora_native

    qlora_native.set_num_threads(args.threads)
    print(_common.machine_line(_common.machine_info()), f"| {args.threads} thread(s), CPU time")
    med = lambda v: float(np.median(v))
    if not args.no_step:
        s = step_ab(args)
        for on in (False, True):
            print(f"step grouping {'on ' if on else 'off'}: min {min(s[on]):.3f} s  median {med(s[on]):.3f} s  "
                  f"({', '.join(f'{x:.3f}' for x in s[on])})")
        print(f"step on/off: median {med(s[True]) / med(s[False]):.4f}  min {min(s[True]) / min(s[False]):.4f}")
    r = micro_ab(args)
    for n, name in ((3, "q/k/v"), (2, "gate/up")):
        u, g = np.array(r[(n, False)]) * 1e3, np.array(r[(n, True)]) * 1e3
        print(f"{name} LoRA GEMMs per layer and step: ungrouped median {med(u):.3f} ms (min {u.min():.3f}), "
              f"grouped median {med(g):.3f} ms (min {g.min():.3f}); grouped/ungrouped {med(g) / med(u):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
