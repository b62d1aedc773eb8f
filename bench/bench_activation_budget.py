"""Step time and memory of activation_memory_budget (README "Training memory"): SmolLM2-135M NF4,
batch x seq tokens, r=16 all-linear, gradient checkpointing, 1 thread by default.

Time: one process per SIMD level, the budgets interleaved step by step (round i runs every budget
once, rotating the order), CPU time of zero_grad + forward_backward + optimizer_step. Memory: one
fresh process per budget runs one step and reports its VmHWM (peak RSS) and the engine's counter.

    PYTHONPATH=python:build/h python bench/bench_activation_budget.py --rounds 5 --simd avx512,avx2
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def _hwm_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _model(gguf, threads):
    import qlora_native

    qlora_native.set_num_threads(threads)
    m = qlora_native.Model.from_pretrained(gguf, quantize="nf4", tokenizer=None)
    m.add_adapter("bench", qlora_native.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                   target_modules="all-linear"), seed=0)
    m.set_active_adapter("bench")
    m.configure_optimizer(lr=1e-4)
    m.gradient_checkpointing = True
    return m


def _step(m, ids, mask, budget):
    m.activation_memory_budget = budget
    t0, w0 = time.process_time(), time.perf_counter()
    m.zero_grad()
    loss = m.forward_backward(ids, ids, mask)
    m.optimizer_step()
    return time.process_time() - t0, time.perf_counter() - w0, float(loss)


def child(a):
    import numpy as np

    from qlora_native import memory_model as mm

    m = _model(a.gguf, a.threads)
    ids = np.random.default_rng(0).integers(0, 49152, (a.batch, a.seq)).astype(np.int32)
    mask = np.ones_like(ids)
    budgets = [float(b) for b in a.budgets.split(",")]
    if a.mode == "memory":  # one step at one budget: this process's peak
        before = _hwm_mib()
        _, _, loss = _step(m, ids, mask, budgets[0])
        plan = mm.activation_bytes(m, a.batch, a.seq, 16, device=False, activation_memory_budget=budgets[0])
        from qlora_native import _core

        d = mm._dims(m)  # what the plan keeps: whole layer sets and attention halves
        parts = _core.train.memory_plan(hidden_size=d["D"], intermediate_size=d["I"], vocab_size=d["V"],
                                        num_hidden_layers=d["L"], num_attention_heads=d["Hq"],
                                        num_key_value_heads=d["Hkv"], head_dim=d["hd"], batch=a.batch, seq=a.seq,
                                        r=16, activation_memory_budget=budgets[0])
        print(json.dumps(dict(budget=budgets[0], hwm_mib=_hwm_mib(), hwm_before_mib=before, loss=loss,
                              counter_mib=m.last_train_peak_bytes / 2 ** 20, plan_mib=plan["peak"] / 2 ** 20,
                              layers_kept=parts["layers_kept"], attention_kept=parts["attention_kept"])))
        return
    _step(m, ids, mask, 0.0)  # warm-up (packing, first-touch of the weights)
    out = {b: {"cpu": [], "wall": [], "loss": []} for b in budgets}
    for r in range(a.rounds):
        order = budgets[r % len(budgets):] + budgets[:r % len(budgets)]
        for b in order:
            cpu, wall, loss = _step(m, ids, mask, b)
            out[b]["cpu"].append(cpu), out[b]["wall"].append(wall), out[b]["loss"].append(loss)
    print(json.dumps({str(b): v for b, v in out.items()}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--budgets", default="0,0.1,0.25,0.5,1")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--simd", default="avx512,avx2", help="QLORA_SIMD levels (one timing process each)")
    p.add_argument("--mode", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.gguf is None:
        import _common

        a.gguf = _common.default_gguf()
    if a.mode:
        return child(a)
    import _common

    print(_common.machine_line(_common.machine_info()), flush=True)
    base = [sys.executable, os.path.abspath(__file__), "--gguf", a.gguf, "--threads", str(a.threads),
            "--batch", str(a.batch), "--seq", str(a.seq), "--rounds", str(a.rounds)]
    env = dict(os.environ, QLORA_NUM_THREADS=str(a.threads))
    budgets = a.budgets.split(",")
    mem = {}
    for b in budgets:
        r = subprocess.run(base + ["--mode", "memory", "--budgets", b], env=env, capture_output=True, text=True,
                           check=True)
        mem[b] = json.loads(r.stdout.strip().splitlines()[-1])
    for simd in a.simd.split(","):
        r = subprocess.run(base + ["--mode", "time", "--budgets", a.budgets], env=dict(env, QLORA_SIMD=simd),
                           capture_output=True, text=True, check=True)
        t = json.loads(r.stdout.strip().splitlines()[-1])
        ref = t[str(float(budgets[0]))]["cpu"]
        print(f"\nSIMD {simd}, {a.threads} thread(s), batch {a.batch} x {a.seq}, {a.rounds} interleaved rounds")
        print("| budget | layers / attention halves kept | plan MiB | VmHWM MiB | CPU s/step min / median | saved ms/step (median of rounds) "
              "| ms saved per MiB of VmHWM |")
        print("|---|---|---|---|---|---|---|")
        for b in budgets:
            cpu = t[str(float(b))]["cpu"]
            extra = (mem[b]["hwm_mib"] - mem[budgets[0]]["hwm_mib"])
            saved = statistics.median(r0 - c for r0, c in zip(ref, cpu)) * 1000  # per interleaved round
            per = f"{saved / extra:.2f}" if extra > 1 else "-"
            print(f"| {b} | {mem[b]['layers_kept']} / {mem[b]['attention_kept']} | {mem[b]['plan_mib']:.0f} | {mem[b]['hwm_mib']:.0f} | "
                  f"{min(cpu):.2f} / {statistics.median(cpu):.2f} | {saved:.0f} | {per} |")
        print("raw:", json.dumps(t))
    print("memory raw:", json.dumps(mem))


if __name__ == "__main__":
    main()
