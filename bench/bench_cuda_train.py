#!/usr/bin/env python
"""QLoRA training on one GPU (issue 11): tokens/s and peak device memory of a training step.

Llama-3-8B shape (hidden 4096, 32 layers, 32/8 heads, intermediate 14336, vocab 128256) with random
NF4 weights (bitsandbytes layout, blocksize 64, double quant; built in memory, nothing downloaded or
written to disk), seq 2048, batch 1 and 2, LoRA r=16 alpha 32 on all seven projections, gradient
checkpointing, AdamW, clip 1.0; labels = input ids (every token counted). Side by side in the same
run, each engine in its own process:

  qlora_cuda    qlora_native, backend="cuda", compute_dtype bfloat16 (tensor cores; --compute-dtype float32
                for the parity mode)
  peft_bnb      PEFT + bitsandbytes NF4 (double quant, bf16 compute, torch.autocast bf16,
                prepare_model_for_kbit_training, gradient checkpointing, torch AdamW) when peft and a
                CUDA-enabled bitsandbytes import
  torch_bf16    else: PEFT LoRA on the same shape with the base in plain bf16 (torch's own matmuls,
                no quantization) as the speed reference; the table says which reference ran

Peak device memory per engine: the engine allocator's high-water mark (qlora_native:
_core.device_stats peak_reserved_bytes when the caching allocator is built in; torch:
max_memory_reserved) and, for all engines alike, the device's used memory sampled every 50 ms
from nvidia-smi during the timed steps (includes the CUDA context; the larger of the two is the
figure compared with the targets).

Also: a SmolLM2-135M-shaped training step (batch 4 x 256, as bench/bench_train.py) on CUDA against
the 2-core CPU number (README: 227.9 tok/s, qlora_native NF4 fp32 compute on the Zen 4 2-core VM,
2026-12-06), target >= 20x.

Targets (issue 11): peak device memory < 7 GiB at seq 2048 batch 1 (< 8 GiB at batch 2);
tokens/s >= 2x PEFT + bitsandbytes on the same GPU; SmolLM2 step >= 20x the 2-core CPU path.

    python bench/bench_cuda_train.py                       # full run (GPU machine, minutes)
    python bench/bench_cuda_train.py --steps 1 --timeout 150   # the device check's short run
    python bench/bench_cuda_train.py --quick --device cpu  # smoke test of the script on a CPU (tiny shapes)

Writes bench/results/bench_cuda_train.json (or --out DIR) and prints a table. See bench/README.md.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False, rms_norm_eps=1e-5)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True, rms_norm_eps=1e-5)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rope_theta=10000.0, max_position_embeddings=512,
            tie_word_embeddings=False, rms_norm_eps=1e-5)
PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CPU_2CORE_SMOLLM2_TOK_S = 227.9  # README "On the Zen 4": SmolLM2-135M, 4 x 256, r=16, fp32 compute, 2 threads
TARGET_MEM_B1_GIB, TARGET_MEM_B2_GIB, TARGET_VS_BNB, TARGET_VS_CPU = 7.0, 8.0, 2.0, 20.0
GIB = 2 ** 30


def hf_config(shape: dict) -> dict:
    return dict(shape, architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                bos_token_id=1, eos_token_id=2, pad_token_id=0)


# ---------------------------------------------------------------- device memory sampler
class MemSampler:
    """Peak used memory of GPU 0 from nvidia-smi every `period` s while running (None without nvidia-smi)."""

    def __init__(self, period=0.05):
        self.period, self.peak_mib, self._stop = period, None, threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self):
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                                 capture_output=True, text=True, timeout=5)
            return float(out.stdout.strip().splitlines()[0])
        except (OSError, ValueError, IndexError, subprocess.SubprocessError):
            return None

    def _run(self):
        while not self._stop.is_set():
            v = self._sample()
            if v is None:
                return
            self.peak_mib = v if self.peak_mib is None else max(self.peak_mib, v)
            self._stop.wait(self.period)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(timeout=10)


def timed(step, spec, res, sync=lambda: None, reset_peak=lambda: None):
    """One warm-up step, then spec['steps'] timed steps under the memory sampler."""
    t = time.perf_counter()
    res["warmup_loss"] = float(step())
    sync()
    res["warmup_s"] = time.perf_counter() - t
    reset_peak()
    losses = []
    with MemSampler() as ms:
        t = time.perf_counter()
        for _ in range(spec["steps"]):
            losses.append(float(step()))
        sync()
        dt = time.perf_counter() - t
    res["losses"] = losses
    res["step_s"] = dt / spec["steps"]
    res["tok_s"] = spec["batch"] * spec["seq"] * spec["steps"] / dt
    res["device_used_peak_mib"] = ms.peak_mib


# ---------------------------------------------------------------- child: qlora_native
def random_nf4(rng, rows, cols, scale, blocksize=64):
    """An NF4 weight (bitsandbytes layout, double quant) with random codes: |w| <~ scale."""
    import numpy as np
    from types import SimpleNamespace

    n = rows * cols
    nb = (n + blocksize - 1) // blocksize
    return SimpleNamespace(packed=rng.integers(0, 256, (n + 1) // 2, dtype=np.uint8),
                           absmax=rng.integers(0, 256, nb, dtype=np.uint8),
                           nested_absmax=np.full((nb + 255) // 256, scale, np.float32), nested_map=None,
                           offset=0.0, shape=(rows, cols), blocksize=blocksize, double_quant=True, dtype="float32")


def build_qlora(shape, backend, rng, head_format="float32"):
    """A qlora_native.Model with random NF4 projections (one random weight per projection shape,
    shared by every layer: speed and memory do not depend on the values), ones for the norms and a
    tiled random block for the embedding / lm_head, loaded row chunk by row chunk."""
    import numpy as np
    import qlora_native
    from qlora_native import _core
    from qlora_native.config import ModelConfig

    mc = ModelConfig.from_dict(hf_config(shape))
    core = _core.model.LlamaModel(mc.to_core(), backend, True, 64, True)
    if head_format == "q8_0":  # embedding / lm_head quantized slab by slab as they load (no fp32 copy)
        core.set_head_q8_0()
    elif head_format in ("bf16", "f16"):  # 16-bit rows, likewise converted as they load
        core.set_head_half(head_format == "bf16")
    nf4_by_shape = {}
    block = (0.02 * rng.standard_normal(1 << 20)).astype(np.float32)
    for name, shp in core.expected_tensors():
        shp = tuple(int(s) for s in shp)
        if any(p in name for p in PROJ):
            if shp not in nf4_by_shape:
                nf4_by_shape[shp] = random_nf4(rng, shp[0], shp[1], 0.04)
            core.load_nf4(name, nf4_by_shape[shp])
        elif name.endswith("norm.weight"):
            core.load_tensor(name, np.ones(shp, np.float32), "F32", list(shp))
        elif len(shp) == 2:  # embed_tokens / lm_head: rows in chunks of a tiled random block
            rows, cols = shp
            chunk = max(1, (1 << 24) // cols)
            for r0 in range(0, rows, chunk):
                n = min(chunk, rows - r0)
                data = np.resize(block, n * cols).reshape(n, cols)
                core.load_tensor_rows(name, r0, np.ascontiguousarray(data))
        else:
            raise RuntimeError(f"unexpected tensor {name} {shp}")
    core.check_complete()
    return qlora_native.Model(mc, core, None)


def child_qlora(spec):
    import numpy as np
    from qlora_native import LoraConfig, _core

    rng = np.random.default_rng(0)
    backend = spec["backend"]
    res = {"engine": "qlora_cuda", "backend": backend}
    t = time.perf_counter()
    m = build_qlora(spec["shape"], backend, rng, spec.get("head_format", "float32"))
    res["head_format"] = m.head_format
    res["load_s"] = time.perf_counter() - t
    if spec.get("compute_dtype", "float32") != "float32":
        m.compute_dtype = spec["compute_dtype"]
    m.add_adapter("a", LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                  target_modules="all-linear"), seed=0)
    m.set_adapter("a")
    m.configure_optimizer(lr=1e-4)
    m.gradient_checkpointing = True
    if spec.get("offload"):
        m.offload_checkpoints = True
    res["offload_checkpoints"] = bool(spec.get("offload"))
    V = spec["shape"]["vocab_size"]
    ids = rng.integers(3, V, size=(spec["batch"], spec["seq"])).astype(np.int32)
    stats = getattr(_core, "device_stats", None)

    def step():
        r = m.train_step([(ids, ids, None)], lr=1e-4, max_grad_norm=1.0)
        return r["loss"]

    def reset_peak():
        if stats is not None and hasattr(_core, "reset_peak_memory"):
            _core.reset_peak_memory(backend)

    timed(step, spec, res, reset_peak=reset_peak)
    res["train_peak_bytes"] = int(m.last_train_peak_bytes)  # activation/scratch buffers of the pass
    if stats is not None and backend.startswith("cuda"):
        s = stats(backend)
        res["allocator_peak_reserved_mib"] = s.get("peak_reserved_bytes", 0) / 2 ** 20
        res["allocator_peak_live_mib"] = s.get("peak_live_bytes", 0) / 2 ** 20
    res["footprint"] = {k: int(v) for k, v in m.memory_footprint().items()} if hasattr(m, "memory_footprint") else {}
    try:  # the memory model's estimate for this run (weights + adapter + the pass's peak; no CUDA context)
        est = memory_model().train_step_bytes(spec["shape"], spec["batch"], spec["seq"], spec["r"],
                                              head_format=res["head_format"], checkpointing=True,
                                              offload=bool(spec.get("offload")))
        res["estimate_mib"] = est["total"] / 2 ** 20
    except (ValueError, TypeError, KeyError, AttributeError) as e:
        res["estimate_error"] = f"{type(e).__name__}: {e}"
    return res


def memory_model():
    """python/qlora_native/memory_model.py (no engine import needed: the parent may run without one)."""
    try:
        from qlora_native import memory_model as mm
    except ImportError:
        import importlib.util

        path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python", "qlora_native",
                            "memory_model.py")
        spec = importlib.util.spec_from_file_location("_qlora_memory_model", path)
        mm = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mm)
    return mm


def head_formats() -> tuple:
    """The engine's head formats (Model.head_format accepts memory_model.HEAD_FORMATS)."""
    try:
        return tuple(getattr(memory_model(), "HEAD_FORMATS", ("float32", "q8_0")))
    except Exception:  # noqa: BLE001 (argument parsing must not fail on a broken checkout)
        return ("float32", "q8_0")


# ---------------------------------------------------------------- child: torch references
def _meta_llama(shape, torch, transformers):
    cfg = transformers.LlamaConfig(**shape)
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    return cfg, model


def _materialize_rest(model, cfg, dev, torch, transformers):
    """Everything but the projections on `dev` in bf16: embedding, lm_head, norms, rotary."""
    D, V = cfg.hidden_size, cfg.vocab_size
    model.model.embed_tokens = torch.nn.Embedding(V, D, device=dev, dtype=torch.bfloat16)
    torch.nn.init.normal_(model.model.embed_tokens.weight, std=0.02)
    if cfg.tie_word_embeddings:
        model.lm_head = torch.nn.Linear(D, V, bias=False, device="meta")
        model.lm_head.weight = model.model.embed_tokens.weight
    else:
        model.lm_head = torch.nn.Linear(D, V, bias=False, device=dev, dtype=torch.bfloat16)
        torch.nn.init.normal_(model.lm_head.weight, std=0.02)
    from transformers.models.llama import modeling_llama as ml

    model.model.norm = ml.LlamaRMSNorm(D, eps=cfg.rms_norm_eps).to(dev, torch.bfloat16)
    model.model.rotary_emb = _rotary(ml, cfg, dev)
    for layer in model.model.layers:
        layer.input_layernorm = ml.LlamaRMSNorm(D, eps=cfg.rms_norm_eps).to(dev, torch.bfloat16)
        layer.post_attention_layernorm = ml.LlamaRMSNorm(D, eps=cfg.rms_norm_eps).to(dev, torch.bfloat16)
        if hasattr(layer.self_attn, "rotary_emb"):  # older transformers keep one per layer
            layer.self_attn.rotary_emb = _rotary(ml, cfg, dev)


def _rotary(ml, cfg, dev):
    try:
        return ml.LlamaRotaryEmbedding(config=cfg, device=dev)
    except TypeError:  # transformers 5: no device argument
        return ml.LlamaRotaryEmbedding(config=cfg).to(dev)


def _projections(model):
    for layer in model.model.layers:
        for p in PROJ:
            parent = layer.self_attn if p in ("q_proj", "k_proj", "v_proj", "o_proj") else layer.mlp
            yield parent, p


def child_torch(spec, engine):
    import numpy as np
    import torch
    import transformers
    import peft

    dev = torch.device(spec["device"])
    res = {"engine": engine, "torch": torch.__version__, "transformers": transformers.__version__,
           "peft": peft.__version__}
    t = time.perf_counter()
    cfg, model = _meta_llama(spec["shape"], torch, transformers)
    _materialize_rest(model, cfg, dev, torch, transformers)
    weights = {}  # one random bf16 weight per shape (host copy for bitsandbytes' quantize-on-move)
    if engine == "peft_bnb":
        import bitsandbytes as bnb

        res["bitsandbytes"] = bnb.__version__
    for parent, p in _projections(model):
        lin = getattr(parent, p)
        key = (lin.out_features, lin.in_features)
        if key not in weights:
            weights[key] = (0.02 * torch.randn(*key, device=dev, dtype=torch.float32)).to(torch.bfloat16)
            if engine == "peft_bnb":
                weights[key] = weights[key].cpu()
        if engine == "peft_bnb":
            q = bnb.nn.Linear4bit(key[1], key[0], bias=False, compute_dtype=torch.bfloat16, quant_type="nf4",
                                  compress_statistics=True, device="cpu")
            q.weight = bnb.nn.Params4bit(weights[key].clone(), requires_grad=False, quant_type="nf4",
                                         compress_statistics=True, blocksize=64).to(dev)  # quantized on the move
            setattr(parent, p, q)
        else:
            new = torch.nn.Linear(key[1], key[0], bias=False, device=dev, dtype=torch.bfloat16)
            with torch.no_grad():
                new.weight.copy_(weights[key])
            setattr(parent, p, new)
    del weights
    model.config.use_cache = False
    if engine == "peft_bnb":
        model.is_loaded_in_4bit = True  # what from_pretrained(quantization_config=...) sets
        model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                     gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=spec["r"], lora_alpha=2 * spec["r"], lora_dropout=0.0,
                                                       target_modules=list(PROJ), task_type="CAUSAL_LM"))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    res["trainable"] = int(sum(p.numel() for p in params))
    opt = torch.optim.AdamW(params, lr=1e-4)
    res["load_s"] = time.perf_counter() - t
    rng = np.random.default_rng(0)
    ids = torch.from_numpy(rng.integers(3, cfg.vocab_size, size=(spec["batch"], spec["seq"]))).to(dev)
    cuda = dev.type == "cuda"

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=cuda):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def reset_peak():
        if cuda:
            torch.cuda.reset_peak_memory_stats()

    timed(step, spec, res, sync=sync, reset_peak=reset_peak)
    if cuda:
        res["allocator_peak_reserved_mib"] = torch.cuda.max_memory_reserved() / 2 ** 20
        res["allocator_peak_live_mib"] = torch.cuda.max_memory_allocated() / 2 ** 20
    return res


def bnb_usable(device, timeout=120.0):
    """(True, '') when peft and bitsandbytes import and bitsandbytes can run on `device`, else (False, why)."""
    code = ("import peft, bitsandbytes as bnb, torch\n"
            f"d = torch.device({device!r})\n"
            "w = bnb.nn.Params4bit(torch.randn(64, 64, dtype=torch.bfloat16), requires_grad=False,"
            " quant_type='nf4').to(d)\n"
            "print('ok', bnb.__version__)\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return False, "bitsandbytes probe timed out"
    if r.returncode == 0 and "ok" in r.stdout:
        return True, ""
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["?"]
    return False, tail[0][:200]


# ---------------------------------------------------------------- parent
def run_engine(engine, spec, timeout):
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(spec, f)
        path = f.name
    try:
        t = time.perf_counter()
        r = _common.run_child(__file__, engine, path, spec.get("threads", os.cpu_count() or 1), timeout)
        r["wall_s"] = time.perf_counter() - t
        return r
    finally:
        os.unlink(path)


def peak_mib(r):
    vals = [r.get(k) for k in ("allocator_peak_reserved_mib", "device_used_peak_mib")]
    vals = [v for v in vals if v is not None]
    return max(vals) if vals else None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: smoke test of the script only")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (smoke test)")
    ap.add_argument("--batches", default="1,2", help="batch sizes of the 8B-shape runs")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--compute-dtype", default=None, choices=["float32", "bfloat16"],
                    help="qlora_native's compute dtype (default: bfloat16 on cuda, as the bf16 reference; "
                         "float32 on cpu)")
    ap.add_argument("--offload", nargs="?", const="on", default="off", choices=["off", "on", "both"],
                    help="qlora_native's checkpointed layer inputs in pinned host memory (offload_checkpoints): "
                         "off, on (bare --offload: every qlora run offloads) or both (the offloaded runs, then the "
                         "same runs without offload, lowest priority, to measure what offload costs)")
    ap.add_argument("--head-format", default="q8_0", choices=head_formats(),
                    help="qlora_native: embedding / lm_head on the device (Model.head_format): q8_0 (default; 1.0 GiB "
                         "at 8B), 16-bit rows where the engine has them (2.0 GiB) or float32 (3.9 GiB)")
    ap.add_argument("--reference", default="auto", choices=["auto", "peft_bnb", "torch_bf16", "none"])
    ap.add_argument("--no-smollm2", action="store_true", help="skip the SmolLM2-135M step")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per engine run")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting engine runs after this many seconds (each run's timeout is cut to what is "
                         "left); runs in priority order: qlora batch 1, SmolLM2, reference batch 1, batch 2 runs")
    ap.add_argument("--out", default=os.environ.get("QLORA_BENCH_OUT", _common.RESULTS))
    a = ap.parse_args()
    if a.child:
        spec = json.load(open(a.spec))
        try:
            res = child_qlora(spec) if a.child == "qlora_cuda" else child_torch(spec, a.child)
        except Exception as e:  # reported in the table, not a traceback wall
            import traceback

            traceback.print_exc()
            res = {"engine": a.child, "error": f"{type(e).__name__}: {str(e)[:300]}"}
        print("RESULT " + json.dumps(res))
        return 0

    t_start = time.perf_counter()  # --budget-s counts from here (the bitsandbytes probe included)
    backend = "cuda" if a.device == "cuda" else "cpu"
    if a.compute_dtype is None:
        a.compute_dtype = "bfloat16" if a.device == "cuda" else "float32"
    big = TINY if a.quick else LLAMA3_8B
    small = TINY if a.quick else SMOLLM2_135M
    seq = 64 if a.quick else a.seq
    batches = [int(b) for b in a.batches.split(",") if b.strip()]
    ref = a.reference
    why_not_bnb = ""
    if ref == "auto":
        ok, why_not_bnb = bnb_usable(a.device, 60 if a.budget_s is None else max(5.0, min(60.0, a.budget_s / 4)))
        ref = "peft_bnb" if ok else "torch_bf16"
    if ref == "peft_bnb":
        note = "PEFT + bitsandbytes NF4 (double quant), bf16 autocast"
    elif ref == "torch_bf16":
        why = f"PEFT+bitsandbytes unusable: {why_not_bnb}" if why_not_bnb else "chosen with --reference"
        note = f"torch bf16 LoRA (PEFT on a plain bf16 base; {why})"
    else:
        note = "none"
    out = {"machine": _common.machine_info(), "device": a.device, "reference": ref, "reference_note": note,
           "shape_8b": big, "seq": seq, "r": a.r, "steps": a.steps, "compute_dtype": a.compute_dtype, "runs": []}
    if a.device == "cuda":
        try:
            out["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                         "--format=csv,noheader"], capture_output=True, text=True,
                                        timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            out["gpu"] = "?"
    base = dict(shape=big, seq=seq, steps=a.steps, r=a.r, backend=backend, device=a.device,
                compute_dtype=a.compute_dtype, head_format=a.head_format)
    out["head_format"] = a.head_format
    tag = "tiny" if a.quick else "llama3_8b"
    out["offload"] = a.offload
    offload = a.offload != "off"  # the qlora runs the targets are judged on
    plan = []  # (engine, spec, where): in priority order, so a budget cut drops the least important:
    # qlora b1, reference b1 (the speed ratio), qlora b2, SmolLM2 (vs the CPU), reference b2, then
    # with --offload both the qlora runs without offload
    for i, B in enumerate(batches):
        plan.append(("qlora_cuda", dict(base, batch=B, offload=offload), "runs"))
        if i == 0 and ref != "none":
            plan.append((ref, dict(base, batch=B), "runs"))
        if i == min(1, len(batches) - 1) and not a.no_smollm2:
            # the speed target vs the CPU path (which keeps its checkpoints): no offload
            plan.append(("qlora_cuda", dict(base, shape=small, batch=4, seq=64 if a.quick else 256), "smollm2"))
    if ref != "none":
        plan += [(ref, dict(base, batch=B), "runs") for B in batches[1:]]
    if a.offload == "both":
        plan += [("qlora_cuda", dict(base, batch=B, offload=False), "runs") for B in batches]
    for eng, spec, where in plan:
        timeout = a.timeout
        if a.budget_s is not None:
            left = a.budget_s - (time.perf_counter() - t_start)
            if left < 20:
                out.setdefault("skipped", []).append(f"{eng} batch {spec['batch']} ({where}): --budget-s spent")
                continue
            timeout = min(timeout, left)
        r = run_engine(eng, spec, timeout)
        r.update(batch=spec["batch"], seq=spec["seq"], shape=tag if where == "runs" else
                 ("tiny" if a.quick else "smollm2_135m"))
        if where == "smollm2":
            out["smollm2"] = r
        else:
            out["runs"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k not in ("footprint", "losses")}), flush=True)
        write(out, a, quiet=True)  # after every run: a run stopped later keeps these numbers
    write(out, a)
    return 0


def write(out, a, quiet=False):
    report(out, a, quiet)
    name = "bench_cuda_train" + ("-quick" if a.quick else "") + ("-cpu" if a.device == "cpu" else "")
    _common.write_json(os.path.join(a.out, name + ".json"), out)
    tmp = os.path.join(a.out, name + ".txt.tmp")
    with open(tmp, "w") as f:
        f.write("\n".join(out["table"]) + "\n")
    os.replace(tmp, os.path.join(a.out, name + ".txt"))


def report(out, a, quiet=False):
    lines = [f"QLoRA training step, {'tiny' if a.quick else 'Llama-3-8B'} shape, random NF4 (dq), seq {out['seq']}, "
             f"r={out['r']} all 7 projections, gradient checkpointing, qlora_native compute {out['compute_dtype']}, "
             f"head {out.get('head_format', 'float32')}; "
             f"device {out.get('gpu', out['device'])}",
             f"reference: {out['reference_note']}",
             "| engine | batch | tok/s | step s | peak device MiB (allocator / sampled) | memory model MiB | vs reference |",
             "|---|---|---|---|---|---|---|"]
    by = {}
    for r in out["runs"]:
        by[(r.get("engine"), r["batch"], bool(r.get("offload_checkpoints")))] = r
    for r in out["runs"]:
        if "error" in r:
            lines.append(f"| {r.get('engine')} | {r['batch']} | error: {r['error'][:120]} | | | | |")
            continue
        ref = by.get((out["reference"], r["batch"], False))
        vs = ""
        if r["engine"] == "qlora_cuda" and ref and "tok_s" in ref:
            vs = f"{r['tok_s'] / ref['tok_s']:.2f}x"
        alloc = r.get("allocator_peak_reserved_mib")
        samp = r.get("device_used_peak_mib")
        name = r["engine"] + (" +offload" if r.get("offload_checkpoints") else "")
        est = r.get("estimate_mib")
        lines.append(f"| {name} | {r['batch']} | {r['tok_s']:.0f} | {r['step_s']:.2f} | "
                     f"{'-' if alloc is None else f'{alloc:.0f}'} / {'-' if samp is None else f'{samp:.0f}'} | "
                     f"{'-' if est is None else f'{est:.0f}'} | {vs} |")
    verdict = []
    offload = out.get("offload", "off") != "off"
    for B, lim in ((1, TARGET_MEM_B1_GIB), (2, TARGET_MEM_B2_GIB)):
        r = by.get(("qlora_cuda", B, offload))
        if r and "error" not in r and peak_mib(r) is not None:
            pk = peak_mib(r) / 1024
            verdict.append(f"batch {B} peak {pk:.2f} GiB vs < {lim:.0f} GiB: {'met' if pk < lim else 'NOT met'}")
        ref = by.get((out["reference"], B, False))
        if r and ref and "tok_s" in r and "tok_s" in ref and out["reference"] == "peft_bnb":
            x = r["tok_s"] / ref["tok_s"]
            met = "met" if x >= TARGET_VS_BNB else "NOT met"
            verdict.append(f"batch {B} {x:.2f}x PEFT+bnb vs >= {TARGET_VS_BNB:.0f}x: {met}")
    s = out.get("smollm2")
    if s:
        if "error" in s:
            lines.append(f"SmolLM2-135M step: error: {s['error'][:200]}")
        else:
            x = s["tok_s"] / CPU_2CORE_SMOLLM2_TOK_S
            lines.append(f"SmolLM2-135M shape, batch 4 x {s.get('seq', 256)}: {s['tok_s']:.0f} tok/s = {x:.1f}x the "
                         f"2-core Zen 4 CPU path ({CPU_2CORE_SMOLLM2_TOK_S} tok/s, README)")
            if not a.quick and out["device"] == "cuda":
                met = "met" if x >= TARGET_VS_CPU else "NOT met"
                verdict.append(f"SmolLM2 {x:.1f}x vs >= {TARGET_VS_CPU:.0f}x: {met}")
    lines += ["targets: " + "; ".join(verdict)] if verdict else []
    lines.append("memory model: python/qlora_native/memory_model.py's estimate (weights + adapter + AdamW + the "
                 "pass's peak; the CUDA context and allocator rounding are not in it)")
    lines += [f"skipped: {x}" for x in out.get("skipped", [])]
    out["table"] = lines
    if not quiet:
        print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
