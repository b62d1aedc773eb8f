"""Issue 15: the opt-in per-op timers behind `bench/bench_train.py --breakdown`, the cache sizes the
engine derives its blocking from, and the machine line every bench records."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "bench"))
from helpers_tiny import CFG, build_tiny  # noqa: E402

IDS = np.array([[5, 6, 7, 8, 9, 10, 11, 12], [3, 4, 5, 6, 7, 8, 9, 10]], dtype=np.int32)


@pytest.fixture()
def profiling():
    _core.profile_reset()
    yield
    _core.profile_enable(False)
    _core.profile_reset()


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = build_tiny(str(tmp_path_factory.mktemp("tiny")))
    m = qlora_native.Model.from_pretrained(d, quantize="nf4", tokenizer=None)
    m.add_adapter("a", qlora_native.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), seed=0)
    m.set_active_adapter("a")
    m.configure_optimizer(lr=1e-3)
    m.gradient_checkpointing = True
    m.train()
    return m


def _parts(rows):
    out = {}
    for r in rows:
        p = out.setdefault(r["part"], {"calls": 0, "flops": 0.0, "seconds": 0.0})
        p["calls"] += r["calls"]
        p["flops"] += r["flops"]
        p["seconds"] += r["seconds"]
    return out


def test_off_by_default_records_nothing(model, profiling):
    if os.environ.get("QLORA_PROFILE"):
        pytest.skip("QLORA_PROFILE is set")
    assert not _core.profile_enabled()
    model.forward_backward(IDS, IDS, np.ones_like(IDS))
    assert _core.profile_report() == []


def test_training_step_parts(model, profiling):
    _core.profile_enable(True)
    loss_on = float(model.forward_backward(IDS, IDS, np.ones_like(IDS)))
    _core.profile_enable(False)
    parts = _parts(_core.profile_report())
    for p in ("nf4_gemm_fwd", "nf4_gemm_bwd", "lora_fwd", "lora_bwd", "attention_fwd", "attention_bwd",
              "lm_head_gemm", "cross_entropy", "rmsnorm", "rope", "swiglu", "elementwise"):
        assert p in parts, p
        assert parts[p]["seconds"] >= 0
    # The LoRA and lm_head GEMMs are booked to their context, not to "other fp32 GEMMs".
    assert "gemm_other" not in parts
    # FLOPs of the NF4 GEMMs: 7 projections per layer forward; the checkpoint recompute skips the down
    # projection (its output is the next layer's input, already held) and the last layer (its forward's
    # intermediates are still in place); input gradients once.
    L, D, I = CFG["num_hidden_layers"], CFG["hidden_size"], CFG["intermediate_size"]
    hd = D // CFG["num_attention_heads"]
    q, kv = D, CFG["num_key_value_heads"] * hd
    n_mm = L * (D * q + 2 * D * kv + q * D + 3 * D * I)
    M = IDS.size
    n_re = (L - 1) * (n_mm // L - I * D)  # the recompute: layers L-2 .. 0 without the down projection
    assert parts["nf4_gemm_fwd"]["flops"] == pytest.approx(2 * M * n_mm + 2 * M * n_re)
    assert parts["nf4_gemm_bwd"]["flops"] == pytest.approx(2 * M * n_mm)
    # the lm_head runs on the labelled rows only: each row's last position has no next token
    labelled = M - IDS.shape[0]
    assert parts["lm_head_gemm"]["flops"] == pytest.approx(2 * 2 * labelled * D * CFG["vocab_size"])
    # Profiling changes no result.
    loss_off = float(model.forward_backward(IDS, IDS, np.ones_like(IDS)))
    assert loss_on == loss_off
    model.zero_grad()


@pytest.mark.parametrize("offload", [False, True])
def test_recompute_skips_down_projection_bit_identical(tmp_path, profiling, offload):
    """The checkpointed backward recomputes each layer up to the SwiGLU only (the down projection
    and its LoRA would rewrite the next layer's input): loss and gradients equal those of the pass
    that keeps every activation, bit for bit, with and without offloaded checkpoints. With LoRA
    dropout (a fresh model each, so both passes draw the same masks)."""
    d = build_tiny(str(tmp_path))
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]] * 2, dtype=np.int32)
    out = {}
    for ckpt in (False, True):
        m = qlora_native.Model.from_pretrained(d, quantize="nf4", tokenizer=None)
        m.add_adapter("a", qlora_native.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules="all-linear"),
                      seed=0)
        m.set_active_adapter("a")
        m.train()
        m.gradient_checkpointing = ckpt
        m.offload_checkpoints = offload and ckpt
        m.zero_grad()
        _core.profile_reset()
        _core.profile_enable(True)
        loss = float(m.forward_backward(ids, ids, np.ones_like(ids)))
        _core.profile_enable(False)
        calls = sum(r["calls"] for r in _core.profile_report() if r["part"] == "nf4_gemm_fwd")
        out[ckpt] = (loss, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}, calls)
    L = CFG["num_hidden_layers"]
    assert out[False][2] == 7 * L and out[True][2] == 7 * L + 6 * (L - 1)  # no recompute of the last layer
    assert out[True][0] == out[False][0]
    for k, g in out[False][1].items():
        np.testing.assert_array_equal(out[True][1][k], g, err_msg=k)


def test_reset_clears(model, profiling):
    _core.profile_enable(True)
    model.forward_backward(IDS, IDS, np.ones_like(IDS))
    assert _core.profile_report()
    _core.profile_reset()
    assert _core.profile_report() == []
    model.zero_grad()


def test_env_var_turns_it_on():
    code = "from qlora_native import _core; print(_core.profile_enabled())"
    env = dict(os.environ, QLORA_PROFILE="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "True", out.stderr
    env["QLORA_PROFILE"] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stderr


def _sysfs(level):
    root = "/sys/devices/system/cpu/cpu0/cache"
    for n in sorted(os.listdir(root)):
        try:
            with open(os.path.join(root, n, "level")) as f:
                lv = f.read().strip()
            with open(os.path.join(root, n, "type")) as f:
                ty = f.read().strip()
            with open(os.path.join(root, n, "size")) as f:
                sz = f.read().strip()
        except OSError:
            continue
        if lv == str(level) and ty != "Instruction":
            return int(sz.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(sz[-1], 1)
    return None


@pytest.mark.skipif(not os.path.isdir("/sys/devices/system/cpu/cpu0/cache"), reason="no sysfs cache info")
def test_cache_sizes_from_sysfs():
    if os.environ.get("QLORA_CACHE_SIZES"):
        pytest.skip("QLORA_CACHE_SIZES is set")
    c = _core.cache_sizes()
    assert c["source"] == "sysfs"
    assert c["l1d"] == _sysfs(1)
    if _sysfs(3):
        assert c["l3"] == _sysfs(3)


def test_cache_sizes_env_override():
    code = "from qlora_native import _core; c = _core.cache_sizes(); print(c['l1d'], c['l2'], c['l3'], c['source'])"
    env = dict(os.environ, QLORA_CACHE_SIZES="l1d=48K,l2=2M,l3=96M")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    l1, l2, l3, src = out.stdout.split()
    assert (int(l1), int(l2), int(l3)) == (48 << 10, 2 << 20, 96 << 20)
    assert src.endswith("+env")
    # A malformed override is ignored (import must not fail); the detected sizes stay.
    env["QLORA_CACHE_SIZES"] = "l2=lots"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and not out.stdout.split()[3].endswith("+env")


def test_cli_info_prints_caches():
    out = subprocess.run([sys.executable, "-m", "qlora_native", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    c = _core.cache_sizes()
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("CPU caches"))
    assert f"L1d {c['l1d'] >> 10} KiB" in line and f"L2 {c['l2'] >> 10} KiB" in line


def test_machine_line_fields():
    import _common

    info = _common.machine_info()
    cpu = info["cpu"]
    if os.path.exists("/proc/cpuinfo") and sys.platform.startswith("linux"):
        assert cpu["model_name"] and cpu["flags"] is not None
        if "avx2" in open("/proc/cpuinfo").read():
            assert "avx2" in cpu["flags"]
    assert info["engine_cache_sizes"]["l1d"] > 0
    line = _common.machine_line(info, {"numpy_sgemm_gflops": 123.4, "read_bandwidth_gbps": 45.6, "threads": 2})
    assert "123 GFLOP/s" in line and "45.6 GB/s" in line and "L1d/L2/L3" in line


def test_blocking_follows_cache_sizes():
    """GEMM blocking and GEMV chunking come from the cache sizes: other sizes (QLORA_CACHE_SIZES)
    give other blocks, and results stay correct (vs float64) with tiny caches (many blocks)."""
    code = r"""
import json, numpy as np, qlora_native
from qlora_native import _core, ops, nf4
rng = np.random.default_rng(0)
out = {"blocking": {lv: _core.gemm_blocking(lv) for lv in ("generic", "avx2", "avx512") if lv in _core.supported_simd_levels()}}
errs = []
for lv in [l for l in ("generic", "avx2", "avx512") if l in _core.supported_simd_levels()]:
    x = rng.standard_normal((300, 700)).astype(np.float32); w = rng.standard_normal((90, 700)).astype(np.float32)
    y = np.asarray(ops.gemm_nt(x, w, backend="cpu:" + lv))
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    errs.append(float(np.max(np.abs(y - ref) / (np.abs(x) @ np.abs(w).T))))
    q = nf4.quantize((0.02 * rng.standard_normal((64, 1536))).astype(np.float32), blocksize=64, double_quant=True)
    xm = rng.standard_normal((8, 1536)).astype(np.float32)
    wd = np.asarray(q.dequantize(), np.float64).reshape(64, 1536)
    yq = np.asarray(ops.nf4_gemm_nt(xm, q, backend="cpu:" + lv))
    errs.append(float(np.max(np.abs(yq - xm.astype(np.float64) @ wd.T) / (np.abs(xm) @ np.abs(wd).T))))
out["errs"] = errs
print(json.dumps(out))
"""
    def run(spec):
        env = dict(os.environ)
        env.pop("QLORA_CACHE_SIZES", None)
        if spec:
            env["QLORA_CACHE_SIZES"] = spec
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        import json

        return json.loads(r.stdout.strip().splitlines()[-1])

    small, big = run("l1d=8K,l2=128K,l3=1M"), run("l1d=48K,l2=2M,l3=96M")
    for lv, b in small["blocking"].items():
        assert b != big["blocking"][lv], lv
        assert b["kc"] <= big["blocking"][lv]["kc"] and b["mc"] * b["kc"] * 4 <= 128 << 10, (lv, b)
    for e in small["errs"] + big["errs"]:
        assert e < 1e-5
