"""CUDA benchmark of issue 10, side by side in one run (tools/device-check runs it on a GPU):

  1. NF4 GEMM TFLOP/s at M = 2048 and 4096 tokens on 4096x4096, 14336x4096 and 4096x14336 weights
     ([out, in]) vs torch.matmul in bf16 on the dequantized weight (cuBLAS). Ours: nf4_gemm_nt_bf16
     where the backend has bf16 compute (tensor cores), else the fp32 kernel.
  2. NF4 GEMV GB/s of packed bytes at batch 1 vs the device-to-device copy bandwidth measured in the
     same run (torch: 2 x bytes / time, the read + write traffic of a copy).
  3. Prefill and decode tokens/s of a Llama-3-8B-shaped model with random NF4 weights, built in
     memory layer by layer (random packed bytes and absmax codes through LlamaModel.load_nf4; bf16
     random embedding / lm_head through load_tensor; nothing written to disk) vs transformers bf16
     on the same shape (random init on the GPU) and transformers + bitsandbytes NF4 when importable.

Targets (issue 10): GEMM >= 0.6x bf16 cuBLAS; GEMV >= 0.7x copy bandwidth; 8B decode at batch 1
>= 2x transformers+bitsandbytes NF4 and >= 0.7x the weight-streaming limit (every byte one decode
step reads: NF4 packed + quantization constants + the fp32 lm_head, at the copy bandwidth).

  python bench/bench_cuda.py [--out DIR]        # GPU: backend cuda, full shapes
  python bench/bench_cuda.py --dry-run          # CPU: tiny shapes, same code paths (CI / tests)

Writes bench_cuda.json and bench_cuda.txt (a table) to --out (default $QLORA_BENCH_OUT or
bench/results). A --budget-s wall-clock budget skips the parts that would start after it (named in
the output); iterations are few so a device check stays short.
"""
import argparse
import gc
import os
import sys
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import RESULTS, machine_info, machine_line, write_json  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 max_position_embeddings=8192, tie_word_embeddings=False)
TINY = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
            tie_word_embeddings=False)
COMMON = dict(hidden_act="silu", model_type="llama", architectures=["LlamaForCausalLM"], bos_token_id=1,
              eos_token_id=2, pad_token_id=0)

FULL = dict(shapes=[(4096, 4096), (14336, 4096), (4096, 14336)], ms=[2048, 4096], model=LLAMA3_8B, prefill=512,
            decode=16, gemm_iters=5, gemv_iters=100, copy_mib=1024)
DRY = dict(shapes=[(256, 128), (384, 128), (128, 384)], ms=[16, 32], model=TINY, prefill=32, decode=4,
           gemm_iters=2, gemv_iters=3, copy_mib=16)

TARGETS = {"gemm_vs_cublas": 0.6, "gemv_vs_copy": 0.7, "decode_vs_bnb": 2.0, "decode_vs_stream_limit": 0.7}


def random_nf4(rows: int, cols: int, rng, blocksize: int = 64):
    """An NF4 weight [rows, cols] with random codes (bitsandbytes layout, double quantization): the
    attribute protocol LlamaModel.load_nf4 and the ops read (python/bindings/nf4_ref_from_py.hpp).
    absmax = dynamic_map[code] * nested_absmax + offset stays in [0.01, 0.03]: finite activations."""
    n = rows * cols
    nb = (n + blocksize - 1) // blocksize
    return types.SimpleNamespace(
        packed=rng.integers(0, 256, size=(n + 1) // 2, dtype=np.uint8),
        absmax=rng.integers(0, 256, size=nb, dtype=np.uint8),
        nested_absmax=np.full((nb + 255) // 256, 0.01, np.float32), nested_map=None, offset=0.02,
        shape=(rows, cols), blocksize=blocksize, double_quant=True)


def nf4_bytes(w) -> int:
    return w.packed.nbytes + w.absmax.nbytes + w.nested_absmax.nbytes


def random_bf16(shape, rng) -> np.ndarray:
    """bf16 bits (uint16) of N(0, 0.02) values, a 1 Mi tile repeated (fast for 1 GB tensors)."""
    tile = ((rng.standard_normal(1 << 20).astype(np.float32) * 0.02).view(np.uint32) >> 16).astype(np.uint16)
    return np.resize(tile, shape)


class Clock:
    """Wall clock with a budget: `ok(part)` is False (and the part recorded as skipped) once spent."""

    def __init__(self, budget: float):
        self.t0, self.budget, self.skipped = time.perf_counter(), budget, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def ok(self, part: str) -> bool:
        if self.elapsed() < self.budget:
            return True
        self.skipped.append(part)
        return False


def torch_or_none(device: str):
    try:
        import torch
    except ImportError:
        return None
    if device == "cuda" and not torch.cuda.is_available():
        return None
    return torch


def time_torch(torch, fn, iters: int, device: str) -> float:
    """Seconds per call of fn (CUDA events on a GPU, wall clock on the CPU), after one warm-up."""
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b) / 1e3 / iters
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


# ------------------------------------------------------------------ 1 + 2: kernels


def copy_bandwidth(torch, device: str, mib: int, iters: int) -> dict:
    n = mib << 20
    if torch is not None:
        a = torch.empty(n, dtype=torch.uint8, device=device)
        b = torch.empty_like(a)
        t = time_torch(torch, lambda: b.copy_(a), iters, device)
        src = "torch copy_"
    else:  # CPU without torch
        a = np.ones(n, np.uint8)
        b = np.empty_like(a)
        t0 = time.perf_counter()
        for _ in range(iters):
            np.copyto(b, a)
        t = (time.perf_counter() - t0) / iters
        src = "numpy copyto"
    return {"bytes": n, "gbps": 2 * n / t / 1e9, "how": f"{src}, 2 x bytes / time (read + write)"}


def bench_kernels(cfg, backend, device, torch, rng, clock, res) -> None:
    from qlora_native import _core, ops

    bf16 = ops.bf16_compute_available(backend)
    res["ours_gemm_compute"] = "bf16 (nf4_gemm_nt_bf16)" if bf16 else "fp32 (nf4_gemm_nt)"
    res["copy"] = copy_bandwidth(torch, device, cfg["copy_mib"], max(3, cfg["gemv_iters"] // 10))
    gemm, gemv = [], []
    for (N, K) in cfg["shapes"]:
        if not clock.ok(f"kernels {N}x{K}"):
            break
        w = random_nf4(N, K, rng)
        wd = None  # the dequantized weight for the baseline (bf16 on the device)
        if torch is not None:
            deq = ops.nf4_dequantize(w)  # float32 [N, K] on the host
            wd = torch.from_numpy(deq).to(device=device, dtype=torch.bfloat16 if device == "cuda" else torch.float32)
            del deq
        for M in cfg["ms"]:
            t = _core.bench_nf4_gemm(backend, M, w, cfg["gemm_iters"], bf16)
            row = {"M": M, "N": N, "K": K, "ours_tflops": 2 * M * N * K / t / 1e12, "ours_ms": t * 1e3}
            if wd is not None:
                x = torch.randn(M, K, device=device, dtype=wd.dtype)
                tb = time_torch(torch, lambda: torch.matmul(x, wd.t()), cfg["gemm_iters"], device)
                row.update(base_tflops=2 * M * N * K / tb / 1e12, base=f"torch.matmul {str(wd.dtype)[6:]}",
                           ratio=tb / t)
                del x
            gemm.append(row)
        t = _core.bench_nf4_gemm(backend, 1, w, cfg["gemv_iters"], False)
        gemv.append({"N": N, "K": K, "packed_bytes": w.packed.nbytes, "ours_us": t * 1e6,
                     "ours_gbps": w.packed.nbytes / t / 1e9, "ratio": w.packed.nbytes / t / 1e9 / res["copy"]["gbps"]})
        wd = None
    if clock.ok("GEMV stacked"):
        # One launch over 8 stacked 14336x4096 weights: host launch costs (a few us a call, timed
        # here by the wall clock) amortized, so this row shows the kernel's streaming rate.
        N, K = cfg["shapes"][1][0] * 8, cfg["shapes"][1][1]
        w = random_nf4(N, K, rng)
        t = _core.bench_nf4_gemm(backend, 1, w, max(3, cfg["gemv_iters"] // 10), False)
        gemv.append({"N": N, "K": K, "packed_bytes": w.packed.nbytes, "ours_us": t * 1e6, "stacked": True,
                     "ours_gbps": w.packed.nbytes / t / 1e9, "ratio": w.packed.nbytes / t / 1e9 / res["copy"]["gbps"]})
    res["gemm"], res["gemv"] = gemm, gemv


# ------------------------------------------------------------------ 3: the 8B shape


def build_ours(shape: dict, backend: str, rng):
    """The model built in memory: random NF4 projections (load_nf4), bf16 random embedding and
    lm_head, unit norms. Returns (Model, bytes one decode step reads besides activations / KV)."""
    import qlora_native
    from qlora_native import _core
    from qlora_native.config import ModelConfig

    config = ModelConfig.from_dict({**shape, **COMMON})
    core = _core.model.LlamaModel(config.to_core(), backend, True, 64, True)
    step_bytes = 0
    # One random NF4 weight per projection shape, uploaded into every layer (speed does not depend on
    # the values; each layer still has its own device copy): 7 draws instead of 224 at 8B, ~2 GB of
    # random bytes fewer, which keeps the device check's bench_cuda step short.
    by_shape = {}
    for name, shp in core.expected_tensors():
        if name.endswith("_proj.weight"):
            key = (int(shp[0]), int(shp[1]))
            if key not in by_shape:
                by_shape[key] = random_nf4(key[0], key[1], rng)
            w = by_shape[key]
            core.load_nf4(name, w)
            step_bytes += nf4_bytes(w)
        elif "norm" in name:
            core.load_tensor(name, np.ones(shp, np.float32), "F32", list(shp))
            step_bytes += 4 * int(np.prod(shp))
        else:  # embed_tokens (one row a token) and lm_head (all of it, held fp32 by the engine)
            core.load_tensor(name, random_bf16(shp, rng), "BF16", list(shp))
            if name == "lm_head.weight":
                step_bytes += 4 * int(np.prod(shp))
        gc.collect()
    core.check_complete()
    return qlora_native.Model(config, core, tokenizer=None), step_bytes


def bench_ours_model(cfg, backend, rng, clock, res) -> None:
    from qlora_native import _core

    t = time.perf_counter()
    model, step_bytes = build_ours(cfg["model"], backend, rng)
    out = {"build_s": time.perf_counter() - t, "decode_step_bytes": step_bytes}
    V, P, n = cfg["model"]["vocab_size"], cfg["prefill"], cfg["decode"]
    prompt = rng.integers(3, V, size=P).tolist()
    model.generate([prompt[:8]], 2, eos_token_id=None)  # warm-up (first launches, pools)
    # prefill: the prompt through a context, only the last slot's token comes back
    best = None
    for _ in range(2):
        ctx = model._core.new_context(1, P + 1, None, None)
        s = _core.model.Sampler(0)
        t = time.perf_counter()
        ctx.feed_sample(np.asarray([prompt], np.int32), None, s, np.zeros(1, np.int32), [np.zeros(0, np.int32)])
        dt = time.perf_counter() - t
        ctx.close()
        best = dt if best is None else min(best, dt)
    out["prefill_tokens"] = P
    out["prefill_tok_s"] = P / best
    if clock.ok("ours decode"):
        # decode: (prefill + n + 1 tokens) - (prefill + 1 token), greedy, batch 1
        t1 = _timed(lambda: model.generate([prompt[:16]], 1, eos_token_id=None))
        tn = _timed(lambda: model.generate([prompt[:16]], n + 1, eos_token_id=None))
        out["decode_tokens"] = n
        out["decode_tok_s"] = n / max(tn - t1, 1e-9)
    res["ours_model"] = out
    model = None
    gc.collect()


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def bench_hf(cfg, device, torch, rng, clock, res, dry_run: bool) -> None:
    try:
        import transformers
    except ImportError as e:
        res["hf_skipped"] = f"transformers not importable: {e}"
        return
    shape = cfg["model"]
    conf = transformers.LlamaConfig(**{k: v for k, v in {**shape, **COMMON}.items()
                                       if k not in ("model_type", "architectures")})
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            hf = transformers.LlamaForCausalLM(conf)  # random init on the device, in `dtype`
    finally:
        torch.set_default_dtype(prev)
    hf.eval()
    V, P, n = shape["vocab_size"], cfg["prefill"], cfg["decode"]
    prompt = torch.as_tensor(rng.integers(3, V, size=(1, P)), device=device)

    def decode_rate(m) -> float:
        kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
        with torch.no_grad():
            m.generate(prompt[:, :8], max_new_tokens=2, min_new_tokens=2, **kw)  # warm-up
            t1 = _timed(lambda: m.generate(prompt[:, :16], max_new_tokens=1, min_new_tokens=1, **kw))
            tn = _timed(lambda: m.generate(prompt[:, :16], max_new_tokens=n + 1, min_new_tokens=n + 1, **kw))
        return n / max(tn - t1, 1e-9)

    with torch.no_grad():
        tp = time_torch(torch, lambda: hf(prompt, use_cache=False), 2, device)
    res["hf_bf16"] = {"dtype": str(dtype)[6:], "prefill_tok_s": P / tp, "decode_tok_s": decode_rate(hf),
                      "transformers": transformers.__version__, "torch": torch.__version__}
    if dry_run or device != "cuda":
        res["bnb_skipped"] = "bitsandbytes NF4 runs on a GPU only (dry run)"
        return
    if not clock.ok("transformers + bitsandbytes NF4"):
        return
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        res["bnb_skipped"] = f"bitsandbytes not importable: {e}"
        return
    # Params4bit quantizes in .to(cuda): bitsandbytes >= 0.43 (bnb_quantized) from any device, older
    # releases only from a CPU tensor.
    import inspect

    from_gpu = "bnb_quantized" in inspect.signature(bnb.nn.Params4bit.__new__).parameters
    for layer in hf.model.layers:  # every projection to bnb's NF4 (double quant, bf16 compute)
        for parent in (layer.self_attn, layer.mlp):
            for name, lin in list(parent.named_children()):
                if isinstance(lin, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          compress_statistics=True, quant_type="nf4")
                    data = lin.weight.data if from_gpu else lin.weight.data.cpu()
                    q.weight = bnb.nn.Params4bit(data, requires_grad=False, compress_statistics=True,
                                                 quant_type="nf4").to(device)
                    setattr(parent, name, q)
    gc.collect()
    torch.cuda.empty_cache()
    with torch.no_grad():
        tp = time_torch(torch, lambda: hf(prompt, use_cache=False), 2, device)
    res["hf_bnb_nf4"] = {"prefill_tok_s": P / tp, "decode_tok_s": decode_rate(hf), "bitsandbytes": bnb.__version__}
    hf = None
    gc.collect()
    torch.cuda.empty_cache()


# ------------------------------------------------------------------ report


def ratios(res) -> list:
    """(name, value, target, met) per target of the issue; value None when a side is missing."""
    out = []
    g = [r["ratio"] for r in res.get("gemm", []) if "ratio" in r]
    out.append(("NF4 GEMM / bf16 cuBLAS (min over shapes)", min(g) if g else None, TARGETS["gemm_vs_cublas"]))
    v = [r["ratio"] for r in res.get("gemv", []) if not r.get("stacked")]
    st = [r["ratio"] for r in res.get("gemv", []) if r.get("stacked")]
    out.append(("NF4 GEMV / copy bandwidth (8 stacked 14336x4096, launch cost amortized)", st[0] if st else None,
                TARGETS["gemv_vs_copy"]))
    out.append(("NF4 GEMV / copy bandwidth (min over the three shapes, launch cost included)", min(v) if v else None,
                TARGETS["gemv_vs_copy"]))
    ours = res.get("ours_model", {}).get("decode_tok_s")
    bnb = res.get("hf_bnb_nf4", {}).get("decode_tok_s")
    out.append(("8B decode b1 / transformers+bnb NF4", ours / bnb if ours and bnb else None, TARGETS["decode_vs_bnb"]))
    lim = None
    if ours and "copy" in res and res.get("ours_model", {}).get("decode_step_bytes"):
        lim = res["copy"]["gbps"] * 1e9 / res["ours_model"]["decode_step_bytes"]
        res["ours_model"]["stream_limit_tok_s"] = lim
    out.append(("8B decode b1 / weight-streaming limit", ours / lim if ours and lim else None,
                TARGETS["decode_vs_stream_limit"]))
    return [{"name": n, "value": val, "target": t, "met": None if val is None else val >= t} for n, val, t in out]


def table(res) -> str:
    f = lambda v, spec=".2f": "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"bench_cuda ({'dry run, ' if res['dry_run'] else ''}backend {res['backend']}): {res['device']}",
             f"host: {res['machine_line']}", ""]
    lines += ["| NF4 GEMM M x N x K | ours TFLOP/s | torch TFLOP/s | ratio |", "|---|---|---|---|"]
    for r in res.get("gemm", []):
        lines.append(f"| {r['M']} x {r['N']} x {r['K']} | {f(r['ours_tflops'])} | {f(r.get('base_tflops'))} | "
                     f"{f(r.get('ratio'))} |")
    c = res.get("copy", {})
    lines += ["", f"copy bandwidth: {f(c.get('gbps'), '.0f')} GB/s ({c.get('how')})",
              "| NF4 GEMV N x K, batch 1 | us | GB/s packed | / copy |", "|---|---|---|---|"]
    for r in res.get("gemv", []):
        lines.append(f"| {r['N']} x {r['K']}{' (8 stacked)' if r.get('stacked') else ''} | {f(r['ours_us'], '.1f')} | {f(r['ours_gbps'], '.0f')} | "
                     f"{f(r['ratio'])} |")
    o, h, b = res.get("ours_model", {}), res.get("hf_bf16", {}), res.get("hf_bnb_nf4", {})
    lines += ["", f"model: {res['model_shape']}",
              "| engine | prefill tok/s | decode tok/s (batch 1) |", "|---|---|---|",
              f"| qlora_native NF4 ({res['backend']}) | {f(o.get('prefill_tok_s'), '.0f')} | "
              f"{f(o.get('decode_tok_s'), '.1f')} |",
              f"| transformers {h.get('dtype', 'bf16')} | {f(h.get('prefill_tok_s'), '.0f')} | "
              f"{f(h.get('decode_tok_s'), '.1f')} |",
              f"| transformers + bitsandbytes NF4 | {f(b.get('prefill_tok_s'), '.0f')} | "
              f"{f(b.get('decode_tok_s'), '.1f')} |"]
    if o.get("stream_limit_tok_s"):
        lines.append(f"weight-streaming limit: {f(o['stream_limit_tok_s'], '.1f')} tok/s "
                     f"({o['decode_step_bytes'] / 1e9:.2f} GB a step at the copy bandwidth)")
    lines += ["", "| target | value | goal | met |", "|---|---|---|---|"]
    for r in res["targets"]:
        met = "n/a" if r["met"] is None else ("**met**" if r["met"] else "**not met**")
        lines.append(f"| {r['name']} | {f(r['value'])} | >= {r['target']} | {met} |")
    for k in ("hf_skipped", "bnb_skipped"):
        if k in res:
            lines.append(f"{k.replace('_', ' ')}: {res[k]}")
    if res.get("not_finished"):
        lines.append("not finished (the run was stopped before): " + ", ".join(res["not_finished"]))
    if res.get("skipped_for_budget"):
        lines.append("skipped (budget): " + ", ".join(res["skipped_for_budget"]))
    if res.get("errors"):
        lines += [f"ERROR {k}: {v}" for k, v in res["errors"].items()]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU (exercises every code path)")
    ap.add_argument("--backend", default=None, help="engine backend (default: cuda, dry run: cpu)")
    ap.add_argument("--out", default=os.environ.get("QLORA_BENCH_OUT") or RESULTS)
    ap.add_argument("--budget-s", type=float, default=200.0, help="skip parts that would start after this")
    ap.add_argument("--no-hf", action="store_true", help="skip the transformers / bitsandbytes baselines")
    ap.add_argument("--ms", default=None,
                    help="comma-separated token counts M of the NF4 GEMM rows (default: 2048,4096; dry run: 16,32)")
    args = ap.parse_args(argv)
    cfg = dict(DRY if args.dry_run else FULL)
    if args.ms is not None:
        try:
            cfg["ms"] = [int(x) for x in args.ms.split(",") if x.strip()]
        except ValueError:
            ap.error(f"--ms must be comma-separated positive integers, got {args.ms!r}")
        if not cfg["ms"] or min(cfg["ms"]) < 1:
            ap.error(f"--ms must be comma-separated positive integers, got {args.ms!r}")
    backend = args.backend or ("cpu" if args.dry_run else "cuda")
    device = "cuda" if backend.startswith("cuda") else "cpu"
    from qlora_native import _core

    torch = torch_or_none(device)
    info = machine_info()
    res = {"dry_run": args.dry_run, "backend": backend, "machine": info, "machine_line": machine_line(info),
           "device": _core.cuda_device_summary() if device == "cuda" else f"CPU ({_core.simd_level()})",
           "model_shape": {k: v for k, v in cfg["model"].items() if k != "rope_scaling"},
           "torch": getattr(torch, "__version__", None), "errors": {}}
    if device == "cuda" and torch is not None:
        res["torch_device"] = torch.cuda.get_device_name(0)
    rng = np.random.default_rng(0)
    clock = Clock(args.budget_s)
    parts = [("kernels", lambda: bench_kernels(cfg, backend, device, torch, rng, clock, res)),
             ("ours_model", lambda: bench_ours_model(cfg, backend, rng, clock, res))]
    if not args.no_hf and torch is not None:
        parts.append(("hf", lambda: bench_hf(cfg, device, torch, rng, clock, res, args.dry_run)))
    elif torch is None:
        res["hf_skipped"] = "torch not importable (or no CUDA in torch)"
    os.makedirs(args.out, exist_ok=True)

    def write(pending):
        """JSON + table of what has run so far: written after every part, so a run killed at the
        device check's limit still leaves the numbers of the parts that finished."""
        res["skipped_for_budget"] = clock.skipped
        res["not_finished"] = pending
        res["targets"] = ratios(res)
        res["seconds"] = clock.elapsed()
        write_json(os.path.join(args.out, "bench_cuda.json"), res)
        txt = table(res)
        tmp = os.path.join(args.out, "bench_cuda.txt.tmp")
        with open(tmp, "w") as fh:
            fh.write(txt)
        os.replace(tmp, os.path.join(args.out, "bench_cuda.txt"))
        return txt

    for i, (name, fn) in enumerate(parts):
        if not clock.ok(name):
            continue
        try:
            fn()
        except Exception as e:  # one failing part must not lose the others' numbers
            res["errors"][name] = f"{type(e).__name__}: {e}"
        gc.collect()
        write([n for n, _ in parts[i + 1:]])
    print(write([]))
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
