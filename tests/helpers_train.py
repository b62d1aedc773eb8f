"""The training-test setup several test files share (one copy): a model with one active adapter "a",
a small labelled batch with a -100 prompt prefix and one left-padded row, and the right-padded batch
of the PEFT parity tests."""
from __future__ import annotations

import numpy as np

import qlora_native
from qlora_native import LoraConfig, _core


def adapter_model(path, backend="cpu", *, quantize="nf4", compute_dtype="float32", head_format=None, dropout=0.0,
                  seed=3, lora=None):
    """Model at `path` on `backend` (fp32 compute by default: parity with the CPU; CUDA's own default
    is bf16 on sm_80+) with adapter "a" active: LoraConfig(**lora) (default r=4, alpha=8, all-linear),
    PEFT's init from `seed` (B zero). head_format, when given, is set before the adapter is added."""
    m = qlora_native.Model.from_pretrained(path, quantize=quantize, backend=backend, tokenizer=None,
                                           compute_dtype=compute_dtype)
    if head_format is not None:
        m.head_format = head_format
    cfg = dict(r=4, lora_alpha=8, target_modules="all-linear") if lora is None else lora
    m.add_adapter("a", LoraConfig(lora_dropout=dropout, **cfg), seed=seed)
    m.set_adapter("a")
    return m


def train_batch(seed=0, B=2, T=12, V=80):
    """(ids, labels, mask) int32 [B, T]: random ids in [3, V), the first 3 labels -100, row 1 padded
    on the left by 2."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, V, size=(B, T)).astype(np.int32)
    labels = ids.copy()
    labels[:, :3] = -100
    mask = np.ones_like(ids)
    mask[1, :2] = 0
    return ids, labels, mask


def assert_same_training(a, b, steps):
    """AdamW steps (lr 1e-3, clip 1.0) on train_batch(0..steps-1) give models a and b the same losses
    and the same adapter "a", bit for bit."""
    for m in (a, b):
        m.configure_optimizer(lr=1e-3)
    for step in range(steps):
        batch = train_batch(step)
        assert a.train_step([batch], lr=1e-3, max_grad_norm=1.0)["loss"] == \
            b.train_step([batch], lr=1e-3, max_grad_norm=1.0)["loss"], step
    sa, sb = a.get_adapter_state_dict("a"), b.get_adapter_state_dict("a")
    for k in sa:
        np.testing.assert_array_equal(np.asarray(sa[k]), np.asarray(sb[k]), err_msg=k)


def padded_batch(rng, V, B=3, T=12):
    """(ids, mask, labels) int64 [B, T], right-padded: row lengths T, T-3, T-5; labels = ids with -100
    on padding and a few random positions (transformers' convention: shifted inside the model)."""
    ids = rng.integers(3, V, (B, T))
    mask = np.ones((B, T), np.int64)
    for b, n in enumerate([T, T - 3, T - 5][:B]):
        mask[b, n:] = 0
        ids[b, n:] = 0
    labels = np.where(mask == 1, ids, -100)
    labels[rng.random((B, T)) < 0.15] = -100
    return ids, mask, labels


def engine_curve(m, batches, steps=20, record=False):
    """Losses of `steps` AdamW steps (zero_grad, forward_backward, clip 1.0, optimizer_step) cycling over
    `batches` of (ids, mask, labels), as test_train_parity.torch_training runs PEFT. record: also the
    adapter before each step and after the last (steps + 1 dicts) and the clipped gradients each step used."""
    losses, weights, grads = [], [], []
    for step in range(steps):
        ids, mask, labels = batches[step % len(batches)]
        if record:
            weights.append(m.get_adapter_state_dict())
        m.zero_grad()
        losses.append(m.forward_backward(ids, labels, mask))
        m.clip_grad_norm(1.0)
        if record:
            grads.append(m.get_adapter_gradients())
        m.optimizer_step()
    if not record:
        return np.array(losses)
    weights.append(m.get_adapter_state_dict())
    return np.array(losses), weights, grads


def loss_and_grads(m, batch=None):
    """One forward_backward of adapter "a" over `batch` (default train_batch()) from zero gradients:
    (loss, {name: gradient copy})."""
    ids, labels, mask = train_batch() if batch is None else batch
    m.zero_grad()
    loss = m.forward_backward(ids, labels, mask)
    return loss, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}


def random_lora_b(m, seed=7, scale=0.2):
    """Adapter "a"'s lora_B tensors set to scale * N(0, 1) from `seed` (nonzero B: the expand and dA
    contribute); the other tensors unchanged. Returns m."""
    rng = np.random.default_rng(seed)
    sd = {k: (rng.standard_normal(v.shape) * scale).astype(np.float32) if "lora_B" in k else v
          for k, v in m.get_adapter_state_dict("a").items()}
    m.set_adapter_state_dict("a", sd)
    return m


def profiled_loss_and_grads(m, batch):
    """loss_and_grads(m, batch) with the profiler reset and on for that pass only:
    (loss, {name: gradient copy}, _core.profile_report())."""
    _core.profile_reset()
    _core.profile_enable(True)
    try:
        m.zero_grad()
        ids, labels, mask = batch
        loss = m.forward_backward(ids, labels, mask)
    finally:
        _core.profile_enable(False)
    report = _core.profile_report()
    return loss, {k: np.array(v) for k, v in m.get_adapter_gradients("a").items()}, report
