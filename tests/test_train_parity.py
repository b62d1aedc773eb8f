"""LoRA training on the engine vs PEFT autograd: A/B gradients (transformers in float64 as the
reference), gradient checkpointing bit-identical to keeping every activation, a finite-difference
check of the engine's own loss, 20 AdamW steps against PEFT + torch.optim.AdamW (teacher-forced),
frozen base weights, exact optimizer resume, and dropout determinism."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from helpers_train import engine_curve, padded_batch  # noqa: E402
from test_lora_model import EPS32, build, peft_reference, random_adapter  # noqa: E402

MODEL_CASES = {
    "gqa2-untied-nf4": dict(nf4=True, hidden=64, inter=128, heads=4, kv_heads=2, vocab=100),
    "gqa1-tied-nf4": dict(nf4=True, hidden=48, inter=96, heads=4, kv_heads=4, vocab=90, tie=True),
    "gqa4-fp32-3layers": dict(nf4=False, hidden=64, inter=96, heads=8, kv_heads=2, head_dim=8, vocab=80, layers=3),
    "qwen2-bias-nf4": dict(nf4=True, arch="qwen2", hidden=64, inter=128, heads=4, kv_heads=2, vocab=100),
}
LORA_CASES = {
    "all-linear": dict(r=4, lora_alpha=8, target_modules="all-linear"),
    "qv-rslora": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], use_rslora=True),
    "subset-patterns": dict(r=4, lora_alpha=4, target_modules=["k_proj", "o_proj", "down_proj"],
                            rank_pattern={"down_proj": 2}, alpha_pattern={"o_proj": 32}),
}


def torch_loss(pm, ids, mask, labels):
    mt = torch.from_numpy(mask)
    pos = (mt.cumsum(-1) - 1).masked_fill(mt == 0, 1)
    return pm(input_ids=torch.from_numpy(ids), attention_mask=mt, position_ids=pos,
              labels=torch.from_numpy(labels)).loss


def peft_grads(pm):
    return {n.replace(".default", ""): p.grad.double().numpy().copy()
            for n, p in pm.named_parameters() if "lora_" in n}


def grad_tol(cfg, T):
    # Relative (Frobenius) error of an fp32 gradient: each layer's backward chains about twice the
    # forward's dot products (lengths up to K = max(D, I, V, T)), i.e. 2 * fp32_tol per layer, and
    # an early layer's gradient passes through every later layer: 2 * L * 16 * sqrt(K) * eps32.
    K = max(cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"], T)
    return 2 * cfg["num_hidden_layers"] * 16 * np.sqrt(K) * EPS32


@pytest.mark.parametrize("lcase", list(LORA_CASES))
@pytest.mark.parametrize("mcase", list(MODEL_CASES))
def test_gradients_match_peft(tmp_path, rng, mcase, lcase):
    model, cfg, ref = build(tmp_path, rng, **MODEL_CASES[mcase])
    random_adapter(model, "a", rng, **LORA_CASES[lcase])
    pm = peft_reference(model, cfg, ref, "a", tmp_path)
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"])
    loss_ref = torch_loss(pm, ids, mask, labels)
    loss_ref.backward()
    want = peft_grads(pm)
    tol = grad_tol(cfg, ids.shape[1])
    # The a-priori bound assumes a well-conditioned gradient; where a tensor's gradient is a sum
    # that cancels, any fp32 evaluation is worse. torch's own float32 run of the same reference
    # measures that conditioning per tensor; ours may sum in another order (blocked kernels), so
    # each tensor's bound is the larger of the a-priori one and 8x torch's fp32 error (our error /
    # torch's, 648 tensors over 3 seeds: median 1.2, max 3.4).
    pm32 = peft_reference(model, cfg, ref, "a", tmp_path, torch_dtype="float32")
    torch_loss(pm32, ids, mask, labels).backward()
    want32 = peft_grads(pm32)
    got = {}
    for ckpt in (True, False):
        model.gradient_checkpointing = ckpt
        model.zero_grad()
        loss = model.forward_backward(ids, labels, mask)
        assert abs(loss - loss_ref.item()) < tol * abs(loss_ref.item())
        got[ckpt] = model.get_adapter_gradients()
    assert set(got[True]) == set(want)
    scale = max(np.abs(g).max() for g in want.values())
    for name, g in want.items():
        assert np.abs(g).max() > 1e-3 * scale, name  # every tensor gets a real gradient
        err = np.linalg.norm(got[True][name] - g) / np.linalg.norm(g)
        err32 = np.linalg.norm(want32[name] - g) / np.linalg.norm(g)
        assert err < max(tol, 8 * err32), (name, err, tol, err32)
        # Checkpointing recomputes each layer with the same ops on the same inputs: bit-identical.
        assert np.array_equal(got[True][name], got[False][name]), name


def test_gradient_accumulation_and_loss_scale(tmp_path, rng):
    """Grads accumulate across calls; loss_scale weights a micro-batch; zero_grad clears."""
    model, cfg, _ = build(tmp_path, rng)
    random_adapter(model, "a", rng, r=4, lora_alpha=8, target_modules="all-linear")
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"])
    model.forward_backward(ids, labels, mask)
    g1 = model.get_adapter_gradients()
    model.forward_backward(ids, labels, mask, loss_scale=0.5)
    g2 = model.get_adapter_gradients()
    for k in g1:
        np.testing.assert_allclose(g2[k], 1.5 * g1[k], rtol=1e-5, atol=1e-6 * np.abs(g1[k]).max())
    model.zero_grad()
    assert not any(v.any() for v in model.get_adapter_gradients().values())
    # eval_loss: same loss as forward_backward's, no gradients
    s, n = model.eval_loss(ids, labels, mask)
    assert n == int((labels[:, 1:] != -100).sum())
    assert abs(s / n - model.forward_backward(ids, labels, mask)) < 1e-5 * abs(s / n)
    model.zero_grad()
    model.eval_loss(ids, labels, mask)
    assert not any(v.any() for v in model.get_adapter_gradients().values())
    # No counted token: nan, gradients unchanged.
    assert np.isnan(model.forward_backward(ids, np.full_like(labels, -100), mask))


# Central differences with Richardson extrapolation (h and h/2). Measured: plain central
# differences converge as h^2 (3% at h = 1e-2), the extrapolation as h^4 (worst seen 1.6% at
# h = 1e-2, 1e-4 at h = 2.5e-3); fp32 loss rounding (~1e-6 relative on a loss ~4, amplified ~3x
# by the extrapolation) / h bounds the absolute part.
FD_REL, FD_ABS = 5e-3, 3 * 4e-6 * 4


def richardson(central, h):
    return (4 * central(h / 2) - central(h)) / 3


def test_finite_differences(tmp_path, rng):
    """A few A/B entries: central differences of the engine's own loss (fp32 model, float64 steps)."""
    model, cfg, _ = build(tmp_path, rng, nf4=False, hidden=32, inter=48, heads=2, kv_heads=1, vocab=40, layers=2)
    random_adapter(model, "a", rng, r=2, lora_alpha=4, target_modules="all-linear")
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"], B=2, T=8)
    model.forward_backward(ids, labels, mask)
    grads = model.get_adapter_gradients()
    sd = model.get_adapter_state_dict()
    h = 2.5e-3

    def loss_at(name, idx, delta):
        d = {k: v.copy() for k, v in sd.items()}
        d[name][idx] += delta
        model.set_adapter_state_dict("a", d)
        s, n = model.eval_loss(ids, labels, mask)
        return s / n

    checked = 0
    for name in sorted(grads)[::5]:
        g = grads[name]
        idx = np.unravel_index(np.argmax(np.abs(g)), g.shape)
        fd = richardson(lambda hh: (loss_at(name, idx, hh) - loss_at(name, idx, -hh)) / (2 * hh), h)
        assert abs(fd - g[idx]) < FD_REL * abs(g[idx]) + FD_ABS / h, (name, fd, g[idx])
        checked += 1
    assert checked >= 4


def nf4_bytes(model, cfg):
    from helpers_model import PROJECTIONS

    return {f"{l}.{p}": {k: np.array(v) for k, v in model.nf4_weight(f"model.layers.{l}.{p}").items()
                         if isinstance(v, np.ndarray)}
            for l in range(cfg["num_hidden_layers"]) for p in PROJECTIONS}


def torch_training(model, cfg, ref, tmp_path, batches, hp, dtype, autocast_bf16=False):
    """Losses and final factors of PEFT + torch.optim.AdamW (clip 1.0) in `dtype` (optionally
    under torch.autocast("cpu", bfloat16), the usual bf16 QLoRA recipe)."""
    import contextlib

    pm = peft_reference(model, cfg, ref, "a", tmp_path / f"{dtype}{'-ac' if autocast_bf16 else ''}", dtype)
    params = [p for n, p in pm.named_parameters() if "lora_" in n]
    opt = torch.optim.AdamW(params, foreach=False, **hp)
    losses = []
    for step in range(20):
        ids, mask, labels = batches[step % len(batches)]
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16) if autocast_bf16 else contextlib.nullcontext():
            loss = torch_loss(pm, ids, mask, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    final = {n.replace(".default", ""): p.detach().double().numpy() for n, p in pm.named_parameters() if "lora_" in n}
    return np.array(losses), final


def peft_along(model, cfg, ref, tmp_path, batches, weights, dtype):
    """PEFT's losses and A/B gradients (float64 copies) in `dtype` with its adapter set to weights[t]
    at step t: the reference evaluated on the engine's own trajectory (teacher forcing)."""
    pm = peft_reference(model, cfg, ref, "a", tmp_path / f"along-{dtype}", dtype)
    named = {n.replace(".default", ""): p for n, p in pm.named_parameters() if "lora_" in n}
    losses, grads = [], []
    for step, w in enumerate(weights):
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(torch.from_numpy(np.asarray(w[n])))
        ids, mask, labels = batches[step % len(batches)]
        loss = torch_loss(pm, ids, mask, labels)
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.double().numpy().copy() for n, p in named.items()})
        pm.zero_grad()
    return np.array(losses), grads


def torch_adamw(start, grads, hp):
    """torch.optim.AdamW in float64 from `start` over the given gradients (clip 1.0 each step): final
    factors, the clipped gradients and the factors before each step."""
    ps = {n: torch.tensor(np.asarray(w, np.float64), requires_grad=True) for n, w in start.items()}
    opt = torch.optim.AdamW(list(ps.values()), foreach=False, **hp)
    clipped, params = [], []
    for g in grads:
        params.append({n: p.detach().numpy().copy() for n, p in ps.items()})
        for n, p in ps.items():
            p.grad = torch.from_numpy(g[n].copy())
        torch.nn.utils.clip_grad_norm_(list(ps.values()), 1.0)
        clipped.append({n: p.grad.numpy().copy() for n, p in ps.items()})
        opt.step()
    return {n: p.detach().numpy() for n, p in ps.items()}, clipped, params


def adamw_deviation_bound(grads, params, hp, errs):
    """Per-entry bound on |p_fp32 - p_exact| after fp32 AdamW over `grads` (exact, clipped; `params`
    before each step) when step t's gradient of tensor n is off by <= errs[t][n] per entry."""
    lr, (b1, b2), eps = hp["lr"], hp["betas"], hp["eps"]
    bound, m, v, a, em, ev2 = ({n: 0.0 for n in grads[0]} for _ in range(6))
    c2 = 0.0
    for t, gs in enumerate(grads):
        bc1, bc2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
        c2 = c2 * b1 * b1 / b2 + (1 - b1) ** 2 / (1 - b2)
        C = np.sqrt(c2 * bc2) / bc1  # Cauchy-Schwarz: |m_hat| / sqrt(v_hat) <= C for any gradients
        for n, g in gs.items():
            delta = errs[t][n]
            m[n] = b1 * m[n] + (1 - b1) * g
            v[n] = b2 * v[n] + (1 - b2) * g * g
            a[n] = b1 * a[n] + (1 - b1) * np.abs(g)
            em[n] = b1 * em[n] + (1 - b1) * delta
            ev2[n] = b2 * ev2[n] + (1 - b2) * delta ** 2
            D = np.sqrt(v[n] / bc2) + eps
            # u' - u = (dm - u' d(sqrt v)) / D with |dm| <= em, |d sqrt(v)| <= sqrt(ev2) (triangle
            # inequality on the weighted 2-norm), |u'| <= C; and never more than |u| + |u'| <= 2C.
            sens = np.minimum((em[n] / bc1 + C * np.sqrt(ev2[n] / bc2)) / D, 2 * C)
            bound[n] = bound[n] + lr * sens + 4 * EPS32 * (np.abs(params[t][n]) + lr * a[n] / bc1 / D)
    return bound


@pytest.mark.parametrize("nf4", [True, False], ids=["nf4", "fp32"])
def test_adamw_loss_curve_matches_peft(tmp_path, rng, nf4):
    """20 AdamW steps (dropout 0, clip 1.0) against PEFT + torch.optim.AdamW in float64, teacher-forced:
    PEFT's loss and gradient are taken at the engine's own weights each step, and torch's AdamW
    integrates those gradients from the same start, so every difference is an fp32 error of its
    step. A free-running float64 run is no precision reference: the dynamics amplify differences (20
    recorded runs: its gradients came to differ from ours by up to 7900x grad_tol x rms(g), from
    torch's own float32 run's by 7100x, while at equal weights ours stay within 0.3x of the bound below)."""
    model, cfg, ref = build(tmp_path, rng, nf4=nf4, layers=2)
    random_adapter(model, "a", rng, r=4, lora_alpha=8, target_modules="all-linear")
    hp = dict(lr=2e-3, weight_decay=0.01, betas=(0.9, 0.99), eps=1e-8)
    batches = [padded_batch(rng, cfg["vocab_size"]) for _ in range(4)]
    model.configure_optimizer(**hp)
    before = nf4_bytes(model, cfg) if nf4 else model._core.get_tensor("model.layers.0.mlp.up_proj.weight").copy()
    ours, weights, our_grads = engine_curve(model, batches, record=True)
    ref64, raw64 = peft_along(model, cfg, ref, tmp_path, batches, weights[:-1], "float64")
    _, raw32 = peft_along(model, cfg, ref, tmp_path, batches, weights[:-1], "float32")
    final64, grads, params = torch_adamw(weights[0], raw64, hp)
    assert ref64[-4:].mean() < ref64[:4].mean() - 0.05  # it learns
    tol = grad_tol(cfg, 12)
    rel = np.abs(ours - ref64) / ref64
    assert (rel < tol).all(), (rel, tol)
    # Gradient error per entry at equal weights: grad_tol * max|g| (grad_tol as a normwise bound), or 8x
    # torch's float32 error where the step's sums cancel (as in test_gradients_match_peft); clipping
    # adds the norm's relative error (the largest of those) times |g|.
    rho = [{n: max(tol, 8 * np.abs(g32[n] - g[n]).max() / np.abs(g[n]).max()) for n in g}
           for g, g32 in zip(raw64, raw32)]
    errs = [{n: (r[n] + max(r.values())) * np.abs(g[n]).max() for n in g} for r, g in zip(rho, grads)]
    grad_ratio = max(np.abs(og[n] - g[n]).max() / e[n] for og, g, e in zip(our_grads, grads, errs) for n in g)
    assert grad_ratio <= 1, grad_ratio
    # Final weights: AdamW's update u = m_hat / (sqrt(v_hat) + eps) moves by at most (error of m_hat +
    # |u| * error of sqrt(v_hat)) / (sqrt(v_hat) + eps) under those gradient errors, and never by more
    # than 2 max|u|: large where |g| is small against its error (sign-like first steps, eps-sized
    # gradients). lr times the sum over steps bounds the weight error (decay only shrinks it), plus
    # 4 fp32 roundings per step (tests/test_optimizer.py).
    bound = adamw_deviation_bound(grads, params, hp, errs)
    final = model.get_adapter_state_dict()
    ratio = max((np.abs(final[n] - w) / bound[n]).max() for n, w in final64.items())
    print(f"loss |ours - PEFT| / bound: max {(rel / tol).max():.3g}; gradient error / bound: max {grad_ratio:.3g}; "
          f"final weights |ours - PEFT| / bound: max {ratio:.3g}")
    for n, w in final64.items():
        assert (np.abs(final[n] - w) <= bound[n]).all(), (n, np.abs(final[n] - w).max(), bound[n].min())
    # The base is never written.
    if nf4:
        after = nf4_bytes(model, cfg)
        assert all(np.array_equal(before[k][j], after[k][j]) for k in before for j in before[k])
    else:
        assert np.array_equal(before, model._core.get_tensor("model.layers.0.mlp.up_proj.weight"))


def test_optimizer_state_resume_is_exact(tmp_path, rng):
    model, cfg, _ = build(tmp_path, rng)
    random_adapter(model, "a", rng, r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    model.configure_optimizer(lr=1e-3, weight_decay=0.1)
    data = [padded_batch(rng, cfg["vocab_size"]) for _ in range(6)]

    def run(m, items):
        for ids, mask, labels in items:
            m.zero_grad()
            m.forward_backward(ids, labels, mask)
            m.optimizer_step()

    run(model, data[:3])
    state, sd = model.get_optimizer_state(), model.get_adapter_state_dict()
    assert state["step"] == 3
    run(model, data[3:])
    # Resume in a fresh adapter slot from the checkpoint.
    model.add_adapter("b", model.adapter_config("a"))
    model.set_active_adapter("b")
    model.set_adapter_state_dict("b", {k: v for k, v in sd.items()})
    model.set_optimizer_state(state)
    run(model, data[3:])
    a, b = model.get_adapter_state_dict("a"), model.get_adapter_state_dict("b")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError):
        bad = dict(state)
        bad["exp_avg"] = state["exp_avg"][:-1]
        model.set_optimizer_state(bad)


def test_clip_grad_norm_matches_torch(tmp_path, rng):
    model, cfg, _ = build(tmp_path, rng)
    random_adapter(model, "a", rng, r=4, lora_alpha=8, target_modules="all-linear")
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"])
    model.forward_backward(ids, labels, mask)
    g = model.get_adapter_gradients()
    tg = [torch.from_numpy(v.copy()) for v in g.values()]
    ps = [torch.nn.Parameter(torch.zeros_like(t)) for t in tg]
    for p, t in zip(ps, tg):
        p.grad = t
    norm = float(torch.nn.utils.clip_grad_norm_(ps, 0.1))
    ours = model.clip_grad_norm(0.1)
    assert abs(ours - norm) < 1e-6 * norm
    clipped = model.get_adapter_gradients()
    for (k, v), p in zip(clipped.items(), ps):
        np.testing.assert_allclose(v, p.grad.numpy(), rtol=1e-6, atol=1e-9)


def test_dropout_masks_deterministic_and_active(tmp_path, rng):
    """Dropout: training differs from eval, masks are regenerated identically under checkpointing,
    and the scale keeps E[x_drop] = x (loss near the no-dropout loss on average)."""
    from qlora_native import LoraConfig

    model, cfg, _ = build(tmp_path, rng)
    model.add_adapter("a", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3), seed=7)
    sd = model.get_adapter_state_dict()
    model.set_adapter_state_dict("a", {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in sd.items()})
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"])
    s, n = model.eval_loss(ids, labels, mask)
    results = {}
    for ckpt in (True, False):
        model.gradient_checkpointing = ckpt
        model.add_adapter(f"d{ckpt}", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.3),
                          seed=7)
        model.set_active_adapter(f"d{ckpt}")
        model.set_adapter_state_dict(f"d{ckpt}", model.get_adapter_state_dict("a"))
        results[ckpt] = (model.forward_backward(ids, labels, mask), model.get_adapter_gradients())
    assert results[True][0] == results[False][0]
    assert all(np.array_equal(results[True][1][k], results[False][1][k]) for k in results[True][1])
    assert results[True][0] != s / n  # dropout changed the forward
    model.zero_grad()
    no_drop = model.forward_backward(ids, labels, mask, training=False)
    assert abs(no_drop - s / n) < 1e-5 * abs(no_drop)


def test_dropout_gradient_finite_differences(tmp_path, rng):
    """With dropout the gradient is that of the loss under the same masks: masks are keyed by
    (seed, step, layer, module), so re-running step s reproduces them."""
    from qlora_native import LoraConfig

    model, cfg, _ = build(tmp_path, rng, nf4=False, hidden=32, inter=48, heads=2, kv_heads=1, vocab=40, layers=2)
    model.add_adapter("a", LoraConfig(r=2, lora_alpha=4, target_modules="all-linear", lora_dropout=0.4), seed=5)
    sd = {k: rng.standard_normal(v.shape).astype(np.float32) / 4 for k, v in model.get_adapter_state_dict().items()}
    model.set_adapter_state_dict("a", sd)
    ids, mask, labels = padded_batch(rng, cfg["vocab_size"], B=2, T=8)
    seed, _ = model._core.lora_dropout_state("a")

    def loss_at(d):
        model.set_adapter_state_dict("a", d)
        model._core.lora_set_dropout_state("a", seed, 3)
        return model.forward_backward(ids, labels, mask)

    model.zero_grad()
    base = loss_at(sd)
    grads = model.get_adapter_gradients()
    s, n = model.eval_loss(ids, labels, mask)
    assert abs(base - s / n) > 1e-4  # the masks change the loss
    h = 2.5e-3
    for name in sorted(grads)[::6]:
        g = grads[name]
        idx = np.unravel_index(np.argmax(np.abs(g)), g.shape)
        def central(hh):
            plus, minus = {k: v.copy() for k, v in sd.items()}, {k: v.copy() for k, v in sd.items()}
            plus[name][idx] += hh
            minus[name][idx] -= hh
            return (loss_at(plus) - loss_at(minus)) / (2 * hh)

        fd = richardson(central, h)
        assert abs(fd - g[idx]) < FD_REL * abs(g[idx]) + FD_ABS / h, (name, fd, g[idx])
