"""qlora_native._core.train.AdamW and gradient clipping vs torch.optim.AdamW / clip_grad_norm_.

Tolerance (AdamW): every step rounds p twice (decay, update) and forms the increment
lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) with a handful of fp32 roundings; m and v are running sums
whose rounding errors are bounded by eps32 times the running sum of |g| (m) or of g^2 (v, no
cancellation). Errors in p are never amplified (weight decay only shrinks them). So after T steps
    |p_fp32 - p_exact| <= c * eps32 * sum_t (|p_t| + lr_t/bc1_t * a_t / (sqrt(v_t/bc2_t) + eps)),
a_t = EMA of |g| (an upper bound of |m_t|), evaluated along a float64 reference run, with c a few
roundings per step (c = 4). Two fp32 implementations (ours, torch's) then differ by <= 2c * ...
"""
import numpy as np
import pytest

import qlora_native
from qlora_native import _core

train = _core.train
EPS32 = float(np.finfo(np.float32).eps)
SHAPES = [(7, 33), (129,), (3, 5, 4), (300, 257)]  # the last one (77k elements) runs threaded
C_ROUNDINGS = 4


def _problem(rng, steps, gscale=None):
    p0 = [rng.standard_normal(s).astype(np.float32) for s in SHAPES]
    grads = []
    for _ in range(steps):
        # a new magnitude each step (1e-3 .. 10) unless given: exercises the adaptive scaling
        scale = 10 ** rng.uniform(-3, 1) if gscale is None else gscale
        grads.append([(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES])
    return p0, grads


def _reference(p0, grads, lrs, wd, b1=0.9, b2=0.999, eps=1e-8):
    """float64 AdamW in torch's order, plus the per-element error bound of the module docstring."""
    P = [p.astype(np.float64) for p in p0]
    M = [np.zeros(p.shape) for p in p0]
    V = [np.zeros(p.shape) for p in p0]
    A = [np.zeros(p.shape) for p in p0]
    S = [np.zeros(p.shape) for p in p0]  # m's error scale: sum_k b1^(t-k) (|g_k| + |m_{k-1}| + |m_k|)
    bound = [np.zeros(p.shape) for p in p0]
    for k, (gs, lr) in enumerate(zip(grads, lrs)):
        t = k + 1
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        for i, g32 in enumerate(gs):
            g = g32.astype(np.float64)
            P[i] *= 1 - lr * wd  # decoupled decay first, as torch
            m_old = np.abs(M[i])
            M[i] = b1 * M[i] + (1 - b1) * g
            S[i] = b1 * S[i] + np.abs(g) + m_old + np.abs(M[i])
            V[i] = b2 * V[i] + (1 - b2) * g * g
            A[i] = b1 * A[i] + (1 - b1) * np.abs(g)
            den = np.sqrt(V[i] / bc2) + eps
            P[i] -= lr / bc1 * M[i] / den
            bound[i] += np.abs(P[i]) + lr / bc1 * A[i] / den
    return P, S, [EPS32 * C_ROUNDINGS * b for b in bound]


def _torch_run(p0, grads, lrs, wd):
    torch = pytest.importorskip("torch")
    tp = [torch.tensor(p, requires_grad=True) for p in p0]
    opt = torch.optim.AdamW(tp, lr=lrs[0], betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    for gs, lr in zip(grads, lrs):
        for p, g in zip(tp, gs):
            p.grad = torch.tensor(g)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.step()
    return [p.detach().numpy() for p in tp], opt


def _transformers_lrs(name, base_lr, warmup, total):
    pytest.importorskip("transformers")
    torch = pytest.importorskip("torch")
    from types import SimpleNamespace

    from transformers import TrainingArguments, get_scheduler

    n_warm = TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=warmup), total)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = get_scheduler(name, opt, num_warmup_steps=n_warm, num_training_steps=total)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_adamw_matches_torch_50_steps(rng, weight_decay, schedule):
    steps = 50
    p0, grads = _problem(rng, steps)
    lrs = _transformers_lrs(schedule, 0.05, 0.1, steps)  # lr 0.05: weight-decay order is visible
    ours_lrs = [train.lr_at(schedule, k, 0.05, 0.1, steps) for k in range(steps)]
    assert ours_lrs == lrs
    ours = [p.copy() for p in p0]
    opt = train.AdamW(ours, weight_decay=weight_decay)
    for gs, lr in zip(grads, ours_lrs):
        opt.step(gs, lr)
    assert opt.step_count == steps
    theirs, topt = _torch_run(p0, grads, lrs, weight_decay)
    P, S, tol = _reference(p0, grads, lrs, weight_decay)
    for i in range(len(SHAPES)):
        assert ours[i].dtype == np.float32 and ours[i].shape == SHAPES[i]
        assert not np.array_equal(ours[i], p0[i])
        np.testing.assert_array_less(np.abs(ours[i] - P[i]), tol[i] + 1e-30)
        np.testing.assert_array_less(np.abs(ours[i] - theirs[i]), 2 * tol[i] + 1e-30)
    # the moments as torch keeps them: v has no cancellation (a few eps32 relative); each step
    # rounds m's update ~3 times, on values no larger than |g_k|, |m_{k-1}|, |m_k|, decayed by b1.
    sd = opt.state_dict()
    for i, p in enumerate(topt.param_groups[0]["params"]):
        st = topt.state[p]
        assert int(st["step"].item()) == sd["step"] == steps
        m_t, v_t = st["exp_avg"].numpy(), st["exp_avg_sq"].numpy()
        np.testing.assert_allclose(sd["exp_avg_sq"][i], v_t, rtol=16 * EPS32, atol=0)
        np.testing.assert_array_less(np.abs(sd["exp_avg"][i] - m_t), 2 * C_ROUNDINGS * EPS32 * S[i] + 1e-30)


def test_adamw_eps_placement_with_tiny_gradients(rng):
    """|g| ~ 1e-8: eps is comparable to sqrt(v_hat), so where eps is added matters."""
    steps = 30
    p0, grads = _problem(rng, steps, gscale=1e-8)
    lrs = [train.lr_at("linear", k, 1e-2, 3, steps) for k in range(steps)]
    ours = [p.copy() for p in p0]
    opt = train.AdamW(ours)
    for gs, lr in zip(grads, lrs):
        opt.step(gs, lr)
    theirs, _ = _torch_run(p0, grads, lrs, 0.0)
    P, _, tol = _reference(p0, grads, lrs, 0.0)
    for i in range(len(SHAPES)):
        np.testing.assert_array_less(np.abs(ours[i] - P[i]), tol[i] + 1e-30)
        np.testing.assert_array_less(np.abs(ours[i] - theirs[i]), 2 * tol[i] + 1e-30)


def test_adamw_defaults_match_trainer():
    transformers = pytest.importorskip("transformers")
    fields = transformers.TrainingArguments.__dataclass_fields__
    opt = train.AdamW([np.ones(3, np.float32)])
    assert opt.betas == (fields["adam_beta1"].default, fields["adam_beta2"].default) == (0.9, 0.999)
    assert opt.eps == fields["adam_epsilon"].default == 1e-8
    assert opt.weight_decay == fields["weight_decay"].default == 0.0


def test_adamw_updates_in_place_without_copies(rng):
    p = rng.standard_normal((4, 5)).astype(np.float32)
    before = p.copy()
    opt = train.AdamW([p])
    assert opt.params[0] is p
    opt.step([rng.standard_normal((4, 5)).astype(np.float32)], 1e-3)
    assert not np.array_equal(p, before)


@pytest.mark.parametrize("weight_decay", [0.0, 0.05])
def test_state_dict_resume_is_bit_exact(rng, weight_decay, tmp_path):
    steps, cut = 50, 20
    p0, grads = _problem(rng, steps)
    lrs = [train.lr_at("cosine", k, 0.02, 5, steps) for k in range(steps)]
    full = [p.copy() for p in p0]
    opt = train.AdamW(full, betas=(0.85, 0.99), weight_decay=weight_decay)
    for gs, lr in zip(grads, lrs):
        opt.step(gs, lr)

    part = [p.copy() for p in p0]
    opt1 = train.AdamW(part, betas=(0.85, 0.99), weight_decay=weight_decay)
    for gs, lr in zip(grads[:cut], lrs[:cut]):
        opt1.step(gs, lr)
    sd = opt1.state_dict()
    assert sd["step"] == cut and sd["betas"] == (0.85, 0.99) and sd["weight_decay"] == weight_decay
    # a checkpoint on disk: params + moments through safetensors
    tensors = {f"p{i}": p for i, p in enumerate(part)}
    tensors.update({f"m{i}": a for i, a in enumerate(sd["exp_avg"])})
    tensors.update({f"v{i}": a for i, a in enumerate(sd["exp_avg_sq"])})
    qlora_native.io.save_safetensors(str(tmp_path / "ckpt.safetensors"), tensors)
    opt1.step(grads[cut], lrs[cut])  # the saved dict is a copy: later steps don't change it
    f = qlora_native.io.safe_open(str(tmp_path / "ckpt.safetensors"))
    np.testing.assert_array_equal(f["m0"], sd["exp_avg"][0])

    resumed = [np.array(f[f"p{i}"]) for i in range(len(SHAPES))]
    opt2 = train.AdamW(resumed)  # default hyperparameters: load_state_dict restores the saved ones
    opt2.load_state_dict({"step": np.int64(cut), "betas": sd["betas"], "eps": sd["eps"], "weight_decay": sd["weight_decay"],
                          "exp_avg": [np.array(f[f"m{i}"]) for i in range(len(SHAPES))],
                          "exp_avg_sq": [np.array(f[f"v{i}"]) for i in range(len(SHAPES))]})
    assert opt2.betas == (0.85, 0.99) and opt2.step_count == cut
    for gs, lr in zip(grads[cut:], lrs[cut:]):
        opt2.step(gs, lr)
    for a, b in zip(full, resumed):
        np.testing.assert_array_equal(a, b)
    sd_full, sd_res = opt.state_dict(), opt2.state_dict()
    assert sd_full["step"] == sd_res["step"] == steps
    for k in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(sd_full[k], sd_res[k]):
            np.testing.assert_array_equal(a, b)


def test_adamw_same_result_for_any_thread_count(rng):
    p0, grads = _problem(rng, 3)
    results = []
    old = qlora_native.num_threads()
    try:
        for n in (1, 2, 3):
            qlora_native.set_num_threads(n)
            ps = [p.copy() for p in p0]
            opt = train.AdamW(ps, weight_decay=0.01)
            for gs in grads:
                opt.step(gs, 1e-2)
            results.append(ps)
    finally:
        qlora_native.set_num_threads(old)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_adamw_bad_inputs(rng):
    p = rng.standard_normal((4, 5)).astype(np.float32)
    g = rng.standard_normal((4, 5)).astype(np.float32)
    with pytest.raises(ValueError, match="float32"):
        train.AdamW([p.astype(np.float64)])
    with pytest.raises(ValueError, match="C-contiguous"):
        train.AdamW([np.asfortranarray(rng.standard_normal((4, 5)).astype(np.float32))])
    ro = p.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        train.AdamW([ro])
    with pytest.raises(ValueError, match="share memory"):
        train.AdamW([p, p])
    with pytest.raises(ValueError, match="share memory"):
        train.AdamW([p, p.reshape(-1)[3:]])
    with pytest.raises(ValueError, match="list"):
        train.AdamW(p)
    with pytest.raises(ValueError, match="numpy"):
        train.AdamW([[1.0, 2.0]])
    with pytest.raises(ValueError, match="no parameters"):
        train.AdamW([])
    with pytest.raises(ValueError, match="beta1"):
        train.AdamW([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match="beta2"):
        train.AdamW([p], betas=(0.9, float("nan")))
    with pytest.raises(ValueError, match="eps"):
        train.AdamW([p], eps=-1e-8)
    with pytest.raises(ValueError, match="weight_decay"):
        train.AdamW([p], weight_decay=float("inf"))

    opt = train.AdamW([p])
    before = p.copy()
    for lr in (float("nan"), float("inf"), -1e-3):
        with pytest.raises(ValueError, match="lr"):
            opt.step([g], lr)
    with pytest.raises(ValueError, match="2 gradients for 1"):
        opt.step([g, g], 1e-3)
    with pytest.raises(ValueError, match="shape"):
        opt.step([g.reshape(5, 4)], 1e-3)
    with pytest.raises(ValueError, match="float32"):
        opt.step([g.astype(np.float64)], 1e-3)
    with pytest.raises(ValueError, match="C-contiguous"):
        opt.step([np.asfortranarray(g)], 1e-3)
    assert opt.step_count == 0
    np.testing.assert_array_equal(p, before)  # a refused step changes nothing


def test_load_state_dict_validates(rng):
    ps = [rng.standard_normal(s).astype(np.float32) for s in [(3, 4), (5,)]]
    opt = train.AdamW(ps)
    opt.step([rng.standard_normal(p.shape).astype(np.float32) for p in ps], 1e-3)
    good = opt.state_dict()

    def with_(**kw):
        d = dict(good)
        d.update(kw)
        return d

    with pytest.raises(ValueError, match="missing key 'exp_avg_sq'"):
        opt.load_state_dict({k: v for k, v in good.items() if k != "exp_avg_sq"})
    with pytest.raises(ValueError, match="shape"):
        opt.load_state_dict(with_(exp_avg=[good["exp_avg"][0].T.copy(), good["exp_avg"][1]]))
    with pytest.raises(ValueError, match="1 arrays for 2"):
        opt.load_state_dict(with_(exp_avg_sq=good["exp_avg_sq"][:1]))
    with pytest.raises(ValueError, match="float32"):
        opt.load_state_dict(with_(exp_avg=[a.astype(np.float64) for a in good["exp_avg"]]))
    for bad_step in (-1, 1.0, True, "1"):
        with pytest.raises(ValueError, match="step"):
            opt.load_state_dict(with_(step=bad_step))
    bad = [a.copy() for a in good["exp_avg_sq"]]
    bad[1][2] = np.nan
    with pytest.raises(ValueError, match="exp_avg_sq 1"):
        opt.load_state_dict(with_(exp_avg_sq=bad))
    bad = [a.copy() for a in good["exp_avg_sq"]]
    bad[0][0, 0] = -1.0
    with pytest.raises(ValueError, match="exp_avg_sq 0"):
        opt.load_state_dict(with_(exp_avg_sq=bad))
    with pytest.raises(ValueError, match="beta1"):
        opt.load_state_dict(with_(betas=(1.5, 0.9)))
    # nothing was half-loaded
    after = opt.state_dict()
    assert after["step"] == 1 and after["betas"] == (0.9, 0.999)
    for k in ("exp_avg", "exp_avg_sq"):
        for a, b in zip(after[k], good[k]):
            np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------- gradient clipping / checks


def _grads(rng, scale=1.0):
    return [(rng.standard_normal(s) * scale).astype(np.float32) for s in SHAPES]


@pytest.mark.parametrize("clips", [True, False])
def test_clip_grad_norm_matches_torch(rng, clips):
    torch = pytest.importorskip("torch")
    gs = _grads(rng, scale=10 ** rng.uniform(-2, 2))
    exact = float(np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in gs)))
    max_norm = exact * (0.3 if clips else 2.0)
    tg = [torch.tensor(g, requires_grad=True) for g in gs]
    for t, g in zip(tg, gs):
        t.grad = torch.tensor(g)
    t_norm = float(torch.nn.utils.clip_grad_norm_(tg, max_norm))
    ours = [g.copy() for g in gs]
    norm = train.clip_grad_norm(ours, max_norm)
    n = sum(g.size for g in gs)
    # float64 sum of exact squares: relative error <= n * eps64
    assert abs(norm - exact) <= n * np.finfo(np.float64).eps * exact
    assert train.grad_norm(gs) == norm
    if not clips:
        for a, g in zip(ours, gs):
            np.testing.assert_array_equal(a, g)  # scale >= 1: untouched, as torch (x * 1.0)
        return
    # ours: g * fl32(coef); torch: g * coef computed in fp32 from its fp32 norm. Their coefficients
    # differ by torch's norm error (measured) plus a few roundings (the +1e-6, the divide, the cast).
    rel = abs(t_norm - exact) / exact + 4 * EPS32
    for a, t, g in zip(ours, tg, gs):
        theirs = t.grad.numpy()
        assert not np.array_equal(a, g)
        np.testing.assert_array_less(np.abs(a - theirs), rel * np.abs(theirs) + 1e-30)
        coef = max_norm / (exact + 1e-6)
        np.testing.assert_array_less(np.abs(a - g * coef), 2 * EPS32 * np.abs(g * coef) + 1e-30)


def test_grad_norm_same_for_any_thread_count(rng):
    gs = _grads(rng)
    old = qlora_native.num_threads()
    try:
        norms = []
        for n in (1, 2, 3):
            qlora_native.set_num_threads(n)
            norms.append(train.grad_norm(gs))
    finally:
        qlora_native.set_num_threads(old)
    assert norms[0] == norms[1] == norms[2]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nonfinite_gradients_are_reported(rng, bad):
    gs = _grads(rng)
    assert train.find_nonfinite(gs) is None
    t = int(rng.integers(len(gs)))
    idx = int(rng.integers(gs[t].size))
    gs[t].reshape(-1)[idx] = bad
    if idx + 1 < gs[t].size:
        gs[t].reshape(-1)[idx + 1] = np.nan  # a later one is not the first
    ti, ii, v = train.find_nonfinite(gs)
    assert (ti, ii) == (t, idx)
    assert (np.isnan(v) and np.isnan(bad)) or v == bad
    before = [g.copy() for g in gs]
    norm = train.clip_grad_norm(gs, 1.0)
    assert not np.isfinite(norm)
    for a, b in zip(gs, before):
        np.testing.assert_array_equal(a, b)  # left untouched for the caller to report


def test_clip_bad_inputs(rng):
    gs = _grads(rng)
    for mx in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="max_norm"):
            train.clip_grad_norm(gs, mx)
    assert train.clip_grad_norm([g.copy() for g in gs], float("inf")) == train.grad_norm(gs)
    with pytest.raises(ValueError, match="float32"):
        train.clip_grad_norm([gs[0].astype(np.float64)], 1.0)
    ro = gs[0].copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        train.clip_grad_norm([ro], 1.0)
    assert train.grad_norm([ro]) > 0  # reading is fine
    with pytest.raises(ValueError, match="float16"):
        train.find_nonfinite([gs[0].astype(np.float16)])
