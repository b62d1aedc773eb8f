"""Training plumbing on device backends (issue 11): activation offload for gradient checkpointing,
the optimizer step on the adapter's contiguous buffers through the backend ops, training on
"cpu:devsim" (the CPU kernels behind CUDA's op table and a device face) equal to the CPU backend,
and a resume across backends. CUDA cases run only with a GPU (skipped with the reason otherwise).
"""
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig, _core

from helpers_tiny import build_tiny
from helpers_train import adapter_model, train_batch

HAVE_GPU = _core.cuda_device_count() > 0
NO_GPU = f"no CUDA GPU: {_core.cuda_device_summary()}"
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason=NO_GPU))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), num_hidden_layers=3)


def _grads(m):
    return {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}


@pytest.mark.parametrize("backend", ["cpu", "cpu:devsim", CUDA])
def test_offload_checkpoints_bit_identical(tiny, backend):
    """Offloading the checkpointed layer inputs gives the same loss and gradients bit for bit, and
    the pass keeps (layers - 1) fewer [tokens, hidden] buffers in backend memory."""
    m = adapter_model(tiny, backend)
    ids, labels, mask = train_batch(V=64)
    assert m.offload_checkpoints is False
    m.gradient_checkpointing = True
    m.zero_grad()
    loss0 = m.forward_backward(ids, labels, mask)
    peak0 = m.last_train_peak_bytes
    g0 = _grads(m)
    m.offload_checkpoints = True
    assert m.offload_checkpoints is True
    for _ in range(2):  # the second pass reuses the cached host staging
        m.zero_grad()
        loss1 = m.forward_backward(ids, labels, mask)
        assert loss1 == loss0
        g1 = _grads(m)
        assert g1.keys() == g0.keys()
        for k in g0:
            np.testing.assert_array_equal(g0[k], g1[k], err_msg=k)
    M, D, L = ids.size, m.config.hidden_size, m.config.num_hidden_layers
    assert peak0 - m.last_train_peak_bytes == (L - 1) * M * D * 4
    with pytest.raises(ValueError, match="bool"):
        m.offload_checkpoints = 1



def _state(m):
    return {k: np.array(v) for k, v in m.get_adapter_state_dict("a").items()}


def _train(m, steps, seed0=0, max_grad_norm=0.05, lr=5e-2):
    """Steps with a clip that bites (small max norm) and weight decay; returns (losses, norms)."""
    out = []
    for s in range(steps):
        ids, labels, mask = train_batch(seed0 + s, V=64)
        r = m.train_step([(ids, labels, mask), (ids[:1], labels[:1], None)], lr=lr, max_grad_norm=max_grad_norm)
        assert r["stepped"]
        out.append((r["loss"], r["grad_norm"]))
    return out


def _arena_order(names):
    """Indices into PEFT-ordered tensor names in the LoRA arena's order (model/lora.hpp arena_tensors)."""
    groups = [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]
    layer = lambda k: int(k.split(".layers.")[1].split(".")[0])
    proj = lambda k: k.split(".")[-3]
    key = lambda i: (layer(names[i]), next(j for j, g in enumerate(groups) if proj(names[i]) in g),
                     "lora_B" in names[i], [p for g in groups for p in g].index(proj(names[i])))
    return sorted(range(len(names)), key=key)


def test_step_bit_identical_to_host_optimizer(tiny):
    """On the CPU backend the optimizer step through the backend ops (one contiguous buffer) equals the
    host code it replaced: clip_grad_norm over the gradient tensors, then torch-style AdamW, bit for bit."""
    m = adapter_model(tiny, "cpu")
    m.configure_optimizer(lr=1e-2, weight_decay=0.1, betas=(0.9, 0.95), eps=1e-6)
    names = list(_state(m))
    host = _core.train.AdamW([_state(m)[k].copy() for k in names], (0.9, 0.95), 1e-6, 0.1)
    for s in range(3):
        ids, labels, mask = train_batch(s, V=64)
        m.zero_grad()
        m.forward_backward(ids, labels, mask)
        g = _grads(m)
        assert list(g) == names  # PEFT order: (layer, projection, A then B)
        gl = [g[k].copy() for k in names]
        # The norm sums the tensors in the gradient arena's order (per layer and input-sharing group
        # {q, k, v}, {o}, {gate, up}, {down}: the A factors, then the B factors); clipped in place.
        want_norm = _core.train.clip_grad_norm([gl[i] for i in _arena_order(names)], 0.05)
        assert m.clip_grad_norm(0.05) == want_norm
        host.step(gl, 1e-2)
        m.optimizer_step(1e-2)
        got = _state(m)
        hp = host.params
        assert len(hp) == len(names)
        for k, w in zip(names, hp):
            np.testing.assert_array_equal(got[k], w, err_msg=k)
        st = m.get_optimizer_state()
        hs = host.state_dict()
        assert st["step"] == hs["step"] == s + 1
        for a, b in zip(st["exp_avg"] + st["exp_avg_sq"], hs["exp_avg"] + hs["exp_avg_sq"]):
            np.testing.assert_array_equal(np.ravel(a), np.ravel(b))


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_devsim_training_equals_cpu(tiny, quantize):
    """Training on "cpu:devsim" (a device backend: the optimizer state and both arenas in backend
    memory, every step through the backend ops) gives the CPU backend's losses, norms and factors."""
    cpu, dev = adapter_model(tiny, "cpu", quantize=quantize), adapter_model(tiny, "cpu:devsim", quantize=quantize)
    for m in (cpu, dev):
        m.configure_optimizer(lr=5e-2, weight_decay=0.01)
    assert _train(dev, 3) == _train(cpu, 3)
    sc, sd = _state(cpu), _state(dev)
    for k in sc:
        np.testing.assert_array_equal(sc[k], sd[k], err_msg=k)
    assert dev.grad_norm() == cpu.grad_norm()


@pytest.mark.parametrize("src,dst", [("cpu", "cpu:devsim"), ("cpu:devsim", "cpu")])
def test_resume_across_backends_exact(tiny, src, dst):
    """2 steps on src, state saved (adapter + optimizer, the host format), restored on a fresh dst model:
    2 more steps there equal 4 uninterrupted steps on src, bit for bit."""
    ref = adapter_model(tiny, src)
    ref.configure_optimizer(lr=5e-2, weight_decay=0.01)
    _train(ref, 2)
    saved_w, saved_opt = _state(ref), ref.get_optimizer_state()
    want = _train(ref, 2, seed0=2)
    other = adapter_model(tiny, dst, seed=99)  # different init: everything must come from the state
    other.set_adapter_state_dict("a", saved_w)
    other.set_optimizer_state(saved_opt)
    assert other.get_optimizer_state()["step"] == 2
    assert _train(other, 2, seed0=2) == want
    for k, v in _state(ref).items():
        np.testing.assert_array_equal(_state(other)[k], v, err_msg=k)


@pytest.mark.parametrize("backend", ["cpu:devsim", CUDA])
def test_device_grad_checks(tiny, backend):
    """grad_norm / clip_grad_norm before configure_optimizer, and a non-finite loss stopping the step."""
    m = adapter_model(tiny, backend)
    ref = adapter_model(tiny, "cpu")
    ids, labels, mask = train_batch(5, V=64)
    for x in (m, ref):
        x.zero_grad()
        x.forward_backward(ids, labels, mask)
    n, nr = m.grad_norm(), ref.grad_norm()
    assert np.isfinite(n) and abs(n - nr) <= 1e-5 * nr
    assert abs(m.clip_grad_norm(nr / 4) - nr) <= 1e-5 * nr
    assert abs(m.grad_norm() - nr / 4) <= 1e-5 * nr
    with pytest.raises(ValueError, match="max_norm"):
        m.clip_grad_norm(0.0)


@pytest.mark.parametrize("quantize", ["nf4", None])
def test_cuda_training_tracks_cpu(tiny, quantize):
    """fp32 mode on a GPU: 5 AdamW steps follow the CPU loss curve within fp32 rounding growth."""
    if not HAVE_GPU:
        pytest.skip(f"no CUDA GPU: {_core.cuda_device_summary()}")
    cpu, gpu = adapter_model(tiny, "cpu", quantize=quantize), adapter_model(tiny, "cuda", quantize=quantize)
    for m in (cpu, gpu):
        m.configure_optimizer(lr=1e-2)
    lc = _train(cpu, 5, max_grad_norm=1.0, lr=1e-2)
    lg = _train(gpu, 5, max_grad_norm=1.0, lr=1e-2)
    for (a, na), (b, nb) in zip(lc, lg):
        assert abs(a - b) <= 1e-3 * abs(a) and abs(na - nb) <= 1e-3 * na


def test_capi_trains_on_device_backend(tiny, lib):
    """The C API trains on the backend the model was loaded on (qlora_model_params.backend): the
    configure refusal of non-CPU backends is gone; cpu:devsim equals cpu bit for bit."""
    import ctypes

    i32p = ctypes.POINTER(ctypes.c_int32)
    lib.qlora_adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    lib.qlora_train_configure.argtypes = [ctypes.c_void_p, ctypes.c_float, ctypes.c_float]
    lib.qlora_train_step.argtypes = [ctypes.c_void_p, i32p, i32p, ctypes.c_int64, ctypes.c_int64, ctypes.c_float,
                                     ctypes.c_float, ctypes.POINTER(ctypes.c_float)]

    def check(rc):
        assert rc == 0, lib.qlora_last_error().decode()

    losses = {}
    for be in ("cpu", "cpu:devsim"):
        p = lib.qlora_model_default_params()
        p.quantize, p.backend = 1, be.encode()
        h = lib.qlora_model_load(tiny.encode(), ctypes.byref(p))
        assert h, lib.qlora_last_error().decode()
        try:
            check(lib.qlora_adapter_add(h, b"ft", None))
            check(lib.qlora_train_configure(h, 1e-2, 0.0))
            ids, labels, _ = train_batch(1, V=64)
            out = []
            for _ in range(3):
                loss = ctypes.c_float(np.nan)
                check(lib.qlora_train_step(h, ids.ctypes.data_as(i32p), labels.ctypes.data_as(i32p), 2, 12, -1.0, 1.0,
                                           ctypes.byref(loss)))
                out.append(loss.value)
            losses[be] = out
        finally:
            lib.qlora_model_free(h)
    assert np.isfinite(losses["cpu"]).all() and losses["cpu"] == losses["cpu:devsim"]


def test_cli_train_backend(tmp_path, capsys):
    """`qlora-native train --backend cpu:devsim --offload-checkpoints` trains on that backend and saves the
    adapter; auto is cuda only when the module sees a GPU; an unavailable backend is a clear error."""
    import json
    import shutil

    from helpers_tokenizer import build_hf_tokenizer_dir
    from qlora_native import cli_train
    from qlora_native.cli import main

    assert cli_train.resolve_backend("auto") == ("cuda" if HAVE_GPU else "cpu")
    path = build_tiny(str(tmp_path / "m"), vocab_size=400)
    tokdir = build_hf_tokenizer_dir(tmp_path / "tok", "llama3", vocab_size=400)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokdir / f, os.path.join(path, f))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"item {i} ->", "completion": f" value {i % 3}"}) + "\n"
                            for i in range(8)))
    out = tmp_path / "out"
    base = ["train", "--model", path, "--data", str(data), "--max-steps", "2", "--batch-size", "2", "--r", "4",
            "--lora-dropout", "0", "--no-progress"]
    assert main(base + ["--output", str(out), "--backend", "cpu:devsim", "--offload-checkpoints"]) == 0
    err = capsys.readouterr().err
    assert "backend cpu:devsim" in err
    assert (out / "adapter_model.safetensors").exists()
    if not HAVE_GPU:
        assert main(base + ["--output", str(tmp_path / "o2"), "--backend", "cuda"]) != 0
        assert "cuda" in capsys.readouterr().err


def test_trainer_checkpoint_resumes_on_another_backend(tiny, tmp_path):
    """A Trainer run checkpointed on the CPU backend resumes on cpu:devsim (the checkpoint's adapter and
    optimizer.safetensors in the host format) and ends bit-identical to the uninterrupted CPU run."""
    from qlora_native.trainer import Trainer
    from test_trainer import _real_dies_after, args_for, make_examples, read_log

    rng = np.random.default_rng(4)
    ex = make_examples(rng, 14, V=64, lo=4, hi=12)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    kw = dict(max_steps=6, gradient_accumulation_steps=2, save_steps=3, learning_rate=5e-3, max_seq_len=16,
              warmup_ratio=0.1, weight_decay=0.01, max_grad_norm=0.1)
    load = lambda be: qlora_native.Model.from_pretrained(tiny, quantize="nf4", backend=be, tokenizer=None,  # noqa: E731
                                                         compute_dtype="float32")
    full = load("cpu")
    a_full = args_for(tmp_path / "full", **kw)
    Trainer(full, cfg, ex, None, a_full).train()
    a = args_for(tmp_path / "part", **kw)
    part = load("cpu")
    part.train_step = _real_dies_after(part, 4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(part, cfg, ex, None, a).train()
    resumed = load("cpu:devsim")
    out = Trainer(resumed, cfg, ex, None, a).train(resume_from_checkpoint=True)  # from checkpoint-3
    assert out["global_step"] == 6
    keep = ("step", "loss", "learning_rate", "grad_norm", "train_loss", "train_tokens")
    strip = lambda r: {k: r[k] for k in keep if k in r}  # noqa: E731
    assert [strip(r) for r in read_log(a)] == [strip(r) for r in read_log(a_full)]
    for k, v in full.get_adapter_state_dict().items():
        np.testing.assert_array_equal(resumed.get_adapter_state_dict()[k], v, err_msg=k)
