"""Weighted adapter combinations (model.add_weighted_adapter) against PEFT's add_weighted_adapter on the
same adapters: per-module delta weights scaling * B @ A, the combined config, errors, and the
combined adapter used, trained, saved and loaded (torch/transformers/peft are test-only)."""
import copy
import json
import math
import warnings

import numpy as np
import pytest

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import qlora_native  # noqa: E402
from qlora_native import LoraConfig  # noqa: E402
from qlora_native import adapter_combine  # noqa: E402
from qlora_native.lora_config import module_path  # noqa: E402

from helpers_model import make_checkpoint, reference_logits, reference_model  # noqa: E402

EPS32 = float(np.finfo(np.float32).eps)
MODEL_KW = dict(hidden=64, inter=96, layers=2, heads=4, kv_heads=2, vocab=100)

# Adapter pairs (the same kwargs build our LoraConfig and PEFT's).
PAIRS = {
    # same rank, different targets (modules that only one adapter has), different alphas
    "lists": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
              dict(r=4, lora_alpha=12, target_modules=["q_proj", "k_proj", "down_proj", "up_proj"])),
    # "all-linear" is a set of names for PEFT: it combines with a list
    "all_linear": (dict(r=3, lora_alpha=6, target_modules="all-linear"),
                   dict(r=3, lora_alpha=3, target_modules=["o_proj", "gate_proj"])),
    # regex targets: the combined target is "(t1)|(t2)"
    "regex": (dict(r=4, lora_alpha=4, target_modules=r".*\.layers\.0\.self_attn\.(q|v)_proj"),
              dict(r=4, lora_alpha=8, target_modules=r".*\.self_attn\.q_proj")),
    # target_modules None: PEFT's Llama default {q_proj, v_proj}
    "default": (dict(r=4, lora_alpha=8), dict(r=2, lora_alpha=2, target_modules=["k_proj"])),
    # different ranks and a rank_pattern (cat / svd only)
    "ranks": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"], rank_pattern={"down_proj": 2}),
              dict(r=6, lora_alpha=3, target_modules=["q_proj", "up_proj", "down_proj"])),
}
SAME_RANK_TYPES = ("linear", "ties", "magnitude_prune")  # deterministic in PEFT at any density
SVD_TYPES = ("svd", "ties_svd", "magnitude_prune_svd")
RANDOM_TYPES = ("dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd")
PEFT_CFG_KEYS = ("r", "lora_alpha", "use_rslora", "rank_pattern", "alpha_pattern", "layers_to_transform",
                 "lora_dropout", "exclude_modules")
MAX_DIFF = {}  # combination type -> max |ours - PEFT| of the deltas seen (printed by -s)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    torch.set_num_threads(1)  # tiny matrices: threads only add contention on a shared machine
    rng = np.random.default_rng(1234)
    tmp = tmp_path_factory.mktemp("combine")
    path, cfg, state = make_checkpoint(tmp, rng, **MODEL_KW)
    model = qlora_native.Model.from_pretrained(path, quantize=None)
    base = reference_model(cfg, state, "float32")
    base.config.save_pretrained(tmp / "base")  # PEFT reads the base config from base_model_name_or_path
    return dict(model=model, base=base, cfg=cfg, state=state, tmp=tmp)


@pytest.fixture
def model(env):
    m = env["model"]
    yield m
    for name in m.adapters:
        m.delete_adapter(name)


def add_random(model, name, rng, **kw):
    """Adapter `name` with random non-zero A and B (PEFT's B = 0 init would hide the math)."""
    model.add_adapter(name, LoraConfig(lora_dropout=0.0, **kw), seed=0)
    sd = model.get_adapter_state_dict(name)
    model.set_adapter_state_dict(name, {k: (rng.standard_normal(v.shape) / np.sqrt(v.shape[1])).astype(np.float32)
                                        for k, v in sd.items()})


def our_deltas(model, name):
    """{module path: scaling * B @ A (float64)} of one of our adapters."""
    sd = model.get_adapter_state_dict(name)
    out = {}
    for layer, proj, r, _, s in model.adapter_config(name).resolve(model.config.num_hidden_layers):
        p = module_path(layer, proj)
        a = sd[f"base_model.model.{p}.lora_A.weight"].astype(np.float64)
        b = sd[f"base_model.model.{p}.lora_B.weight"].astype(np.float64)
        assert a.shape[0] == b.shape[1] == r, p
        out[p] = s * (b @ a)
    return out


def peft_model(env, model, names):
    """PEFT model on the same base weights holding our adapters `names` (via our saved directories)."""
    pm = None
    for n in names:
        d = env["tmp"] / f"src_{n}"
        model.save_adapter(d, n, base_model_name_or_path=str(env["tmp"] / "base"))
        if pm is None:
            pm = peft.PeftModel.from_pretrained(copy.deepcopy(env["base"]), str(d), adapter_name=n)
        else:
            pm.load_adapter(str(d), adapter_name=n)
    return pm


def peft_deltas(pm, name):
    from peft.tuners.lora import LoraLayer

    pre = "base_model.model."
    with torch.no_grad():
        return {n[len(pre):]: m.get_delta_weight(name).double().numpy() for n, m in pm.named_modules()
                if isinstance(m, LoraLayer) and name in m.lora_A}


PRUNED_SVD_TYPES = ("ties_svd", "magnitude_prune_svd")
# dare_ties_svd at density 1 prunes nothing, but its TIES sign election merges entrywise, so it is
# full rank as well (and an entry whose deltas nearly cancel can elect either sign in float32)
FLOAT64_PEFT_TYPES = PRUNED_SVD_TYPES + ("dare_ties_svd",)


def both(env, model, rng, pair, ctype, weights=(0.7, -0.4), **kw):
    """Adds pair's adapters a, b to our model and to PEFT, combines them into c on both sides."""
    add_random(model, "x", rng, **PAIRS[pair][0])
    add_random(model, "y", rng, **PAIRS[pair][1])
    pm = peft_model(env, model, ["x", "y"])
    if ctype in FLOAT64_PEFT_TYPES:
        # These prune entries of each delta B @ A by magnitude (we form it in float64): in float32 an
        # entry within rounding of the density threshold can land on the other side of it (a seed
        # did: 0.08 apart at one entry), a discontinuity no tolerance covers. PEFT in float64 forms
        # the same deltas to ~1e-16, so both sides prune the same entries.
        pm = pm.to(torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that density 1 prunes nothing
        pm.add_weighted_adapter(["x", "y"], list(weights), "c", combination_type=ctype, **kw)
    model.add_weighted_adapter(["x", "y"], list(weights), "c", combination_type=ctype, **kw)
    return pm


def check_config(model, pm, name="c"):
    ours, theirs = model.adapter_config(name).to_peft_dict(), pm.peft_config[name].to_dict()
    for k in PEFT_CFG_KEYS:
        assert ours[k] == theirs[k], k
    t = theirs["target_modules"]
    assert ours["target_modules"] == (t if isinstance(t, str) else sorted(t))


def record(ctype, diff):
    MAX_DIFF[ctype] = max(MAX_DIFF.get(ctype, 0.0), diff)


def assert_deltas_close(ours, ref, ctype, rel=16 * EPS32):
    assert set(ours) == set(ref)
    for p in ref:
        assert ours[p].shape == ref[p].shape, p
        diff = float(np.abs(ours[p] - ref[p]).max())
        record(ctype, diff)
        assert diff <= rel * max(float(np.abs(ref[p]).max()), 1e-30), (p, diff)


# ---------------------------------------------------------------- parity with PEFT
@pytest.mark.parametrize("pair", ["lists", "all_linear", "regex", "ranks", "default"])
def test_cat_matches_peft_exactly_in_structure(env, model, rng, pair):
    pm = both(env, model, rng, pair, "cat")
    check_config(model, pm)
    cfg = model.adapter_config("c")
    assert cfg.r == cfg.lora_alpha == sum(max([c["r"], *c.get("rank_pattern", {}).values()]) for c in PAIRS[pair])
    ours = model.get_adapter_state_dict("c")
    from peft import get_peft_model_state_dict

    theirs = {k: v.numpy() for k, v in get_peft_model_state_dict(pm, adapter_name="c").items()}
    assert {k: v.shape for k, v in ours.items()} == {k: tuple(v.shape) for k, v in theirs.items()}
    assert_deltas_close(our_deltas(model, "c"), peft_deltas(pm, "c"), "cat")
    # cat is exact: the combined delta is the weighted sum of the deltas
    da, db, dc = our_deltas(model, "x"), our_deltas(model, "y"), our_deltas(model, "c")
    for p in dc:
        want = 0.7 * da.get(p, 0.0) - 0.4 * db.get(p, 0.0)
        np.testing.assert_allclose(dc[p], want, rtol=0, atol=16 * EPS32 * np.abs(want).max(), err_msg=p)


@pytest.mark.parametrize("ctype", SAME_RANK_TYPES)
@pytest.mark.parametrize("pair", ["lists", "all_linear", "regex"])
def test_same_rank_types_match_peft(env, model, rng, pair, ctype):
    kw = {} if ctype == "linear" else dict(density=0.6, majority_sign_method="total" if pair != "regex" else
                                           "frequency")
    pm = both(env, model, rng, pair, ctype, **kw)
    check_config(model, pm)
    assert model.adapter_config("c").r == PAIRS[pair][0]["r"]
    assert {k: v.shape for k, v in model.get_adapter_state_dict("c").items()} == {
        k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(pm, adapter_name="c").items()}
    assert_deltas_close(our_deltas(model, "c"), peft_deltas(pm, "c"), ctype)


def svdvals(m):
    return torch.linalg.svdvals(torch.from_numpy(m)).numpy()  # torch: single-threaded here (see env)


def svd_tolerance(delta: np.ndarray, k: int) -> float:
    """Max-abs tolerance for the rank-k truncation of `delta` computed in float32 (PEFT) vs float64 (us).
    A float32 perturbation E (|E| ~ eps32 * sigma_1) moves the kept singular subspaces by up to
    |E| / (sigma_k - sigma_k+1) (Wedin), so the product moves by ~ |E| * (1 + 2 sigma_1 / gap)."""
    s = svdvals(delta)
    if k >= s.size or s[k] <= 1e-6 * s[0]:
        gap = s[min(k, s.size) - 1]  # nothing truncated but rounding noise
    else:
        gap = s[k - 1] - s[k]
    return 64 * EPS32 * s[0] * (1 + 2 * s[0] / max(gap, 1e-300))


def check_eckart_young(got: np.ndarray, exact: np.ndarray, k: int):
    """What every correct rank-k truncation satisfies, ties in the singular values or not: the top k
    singular values of `exact`, and the optimal residual."""
    s, sg = svdvals(exact), svdvals(got)
    kk = min(k, s.size)
    tol = 64 * EPS32 * s[0]
    np.testing.assert_allclose(sg[:kk], s[:kk], rtol=0, atol=tol)
    assert np.all(sg[kk:] <= tol)
    resid = np.linalg.norm(exact - got)
    assert abs(resid - math.sqrt(float(np.sum(s[kk:] ** 2)))) <= tol * math.sqrt(s.size)


def assert_truncation_close(ours, ref, exact, k, what):
    """Rank-k truncations of `exact` (ours vs PEFT's) within the singular-gap tolerance, and ours a
    correct rank-k truncation (Eckart-Young)."""
    assert set(ours) == set(ref)
    for p in ref:
        diff = float(np.abs(ours[p] - ref[p]).max())
        record(what, diff)
        assert diff <= svd_tolerance(exact[p], k), (p, diff)
        check_eckart_young(ours[p], exact[p], k)


@pytest.mark.parametrize("pair,ctype", [(p, t) for p in ("lists", "ranks") for t in SVD_TYPES] +
                         [("all_linear", "svd"), ("regex", "svd")])
def test_svd_types_match_peft(env, model, rng, pair, ctype):
    kw = {} if ctype == "svd" else dict(density=0.5)
    full = 32  # = min(out, in) of k/v_proj (PEFT fails above)
    pm = both(env, model, rng, pair, ctype, svd_rank=full, **kw)
    check_config(model, pm)
    assert model.adapter_config("c").r == full
    ours, ref = our_deltas(model, "c"), peft_deltas(pm, "c")
    if ctype == "svd":  # rank <= r_x + r_y <= 32: nothing is truncated
        assert_deltas_close(ours, ref, ctype, rel=64 * EPS32)
    else:
        # Pruning the deltas entrywise leaves a full-rank matrix, so rank 32 truncates the 64-wide
        # modules: PEFT's float32 SVD and ours agree only as far as the singular value gap at 32
        # allows (as in test_truncated_svd_matches_peft; a seed gave sigma_32 ~ sigma_33).
        model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "full", combination_type=ctype, svd_rank=64, **kw)
        exact = our_deltas(model, "full")
        assert_truncation_close(ours, ref, exact, full, ctype)
    if ctype == "svd":  # untruncated svd is exact
        da, db = our_deltas(model, "x"), our_deltas(model, "y")
        for p in ours:
            want = 0.7 * da.get(p, 0.0) - 0.4 * db.get(p, 0.0)
            np.testing.assert_allclose(ours[p], want, rtol=0, atol=64 * EPS32 * np.abs(want).max(), err_msg=p)


@pytest.mark.parametrize("ctype", SVD_TYPES)
def test_truncated_svd_matches_peft(env, model, rng, ctype):
    """Default svd_rank (the largest rank, 4) truncates the rank <= 8 combination; the truncated
    deltas agree within the float32 tolerance that the singular value gaps allow."""
    kw = {} if ctype == "svd" else dict(density=0.5)
    pm = both(env, model, rng, "lists", ctype, **kw)
    assert model.adapter_config("c").r == 4
    ours, ref = our_deltas(model, "c"), peft_deltas(pm, "c")
    # the combination before truncation: ours untruncated. svd_rank=64 is above min(out, in) = 32 of
    # k/v_proj, where PEFT fails: we pad with zero components (checked against the weighted sum)
    model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "full", combination_type=ctype, svd_rank=64, **kw)
    exact = our_deltas(model, "full")
    assert {v.shape for v in model.get_adapter_state_dict("full").values()} == {(64, 64), (64, 96), (32, 64), (96, 64)}
    if ctype == "svd":
        da, db = our_deltas(model, "x"), our_deltas(model, "y")
        for p in exact:
            want = 0.7 * da.get(p, 0.0) - 0.4 * db.get(p, 0.0)
            np.testing.assert_allclose(exact[p], want, rtol=0, atol=64 * EPS32 * np.abs(want).max(), err_msg=p)
    assert_truncation_close(ours, ref, exact, 4, ctype + " (rank 4)")


def test_truncated_svd_with_tied_singular_values(env, model, rng):
    """With sigma_k = sigma_k+1 the rank-k truncation is not unique: PEFT and we may keep different
    singular vectors. Both must still be optimal truncations (Eckart-Young)."""
    add_random(model, "x", rng, r=4, lora_alpha=4, target_modules=["q_proj"])
    add_random(model, "y", rng, r=4, lora_alpha=4, target_modules=["q_proj"])
    q = np.linalg.qr(rng.standard_normal((64, 64)))[0]
    sd = model.get_adapter_state_dict("x")
    for name, sig in (("x", [3.0, 2.0, 1.0, 1.0]), ("y", [1.0, 1.0, 0.5, 0.25])):  # sigma_4 = sigma_5 = 1
        cols = slice(0, 4) if name == "x" else slice(4, 8)  # orthogonal ranges: singular values add as sets
        new = {}
        for k in sd:
            if k.endswith("lora_A.weight"):
                new[k] = q[:, cols].T.copy().astype(np.float32)
            else:
                new[k] = (q[:, cols] * np.array(sig)).astype(np.float32)
        model.set_adapter_state_dict(name, new)
    pm = peft_model(env, model, ["x", "y"])
    pm.add_weighted_adapter(["x", "y"], [1.0, 1.0], "c", combination_type="svd", svd_rank=4)
    model.add_weighted_adapter(["x", "y"], [1.0, 1.0], "c", combination_type="svd", svd_rank=4)
    exact = {p: our_deltas(model, "x")[p] + our_deltas(model, "y")[p] for p in our_deltas(model, "x")}
    for d in (our_deltas(model, "c"), peft_deltas(pm, "c")):
        for p in exact:
            check_eckart_young(d[p], exact[p], 4)


def test_svd_clamp_rule(env, model, rng):
    """svd_clamp clips U S and V^T to +-(their joint svd_clamp quantile). The quantile depends on the
    signs the SVD gives each singular pair (arbitrary), so the clamped factors are compared per
    implementation: clamped == clip(unclamped, +-quantile(unclamped)), for PEFT and for us."""
    from peft.tuners.lora import LoraLayer

    add_random(model, "x", rng, **PAIRS["lists"][0])
    add_random(model, "y", rng, **PAIRS["lists"][1])
    pm = peft_model(env, model, ["x", "y"])
    for clamp in (None, 0.9):
        name = "u" if clamp is None else "c"
        pm.add_weighted_adapter(["x", "y"], [0.7, -0.4], name, combination_type="svd", svd_clamp=clamp)
        model.add_weighted_adapter(["x", "y"], [0.7, -0.4], name, combination_type="svd", svd_clamp=clamp)
    ours_u, ours_c = model.get_adapter_state_dict("u"), model.get_adapter_state_dict("c")
    checked = 0
    for n, m in pm.named_modules():
        if not isinstance(m, LoraLayer) or "c" not in m.lora_A:
            continue
        fac = {k: (m.lora_A[k].weight.detach(), m.lora_B[k].weight.detach()) for k in "uc"}
        hi = torch.quantile(torch.cat([fac["u"][1].flatten(), fac["u"][0].flatten()]), 0.9)
        for i in range(2):  # PEFT follows the rule we implement
            torch.testing.assert_close(fac["c"][i], fac["u"][i].clamp(-hi, hi), rtol=0, atol=0)
        ka, kb = n + ".lora_A.weight", n + ".lora_B.weight"
        a, b = ours_u[ka].astype(np.float64), ours_u[kb].astype(np.float64)
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), 0.9)
        assert 0 < hi < max(np.abs(a).max(), np.abs(b).max())  # something is clipped
        np.testing.assert_allclose(ours_c[ka], np.clip(a, -hi, hi), rtol=0, atol=4 * EPS32 * hi)
        np.testing.assert_allclose(ours_c[kb], np.clip(b, -hi, hi), rtol=0, atol=4 * EPS32 * hi)
        checked += 1
    assert checked == 10


@pytest.mark.parametrize("ctype", RANDOM_TYPES)
def test_random_types_match_peft_at_density_one(env, model, rng, ctype):
    """density=1 keeps everything: DARE is deterministic and equals PEFT's."""
    kw = dict(svd_rank=32) if ctype.endswith("svd") else {}
    pm = both(env, model, rng, "lists", ctype, density=1.0, **kw)
    check_config(model, pm)
    if ctype == "dare_ties_svd":
        # the TIES merge is entrywise, so the combination is full rank and rank 32 truncates the 64-wide
        # modules: within the singular-gap tolerance, as test_svd_types_match_peft (a seed gave 6.8e-6
        # against a fixed 64 eps bound of 6.7e-6)
        model.add_weighted_adapter(["x", "y"], [0.7, -0.4], "full", combination_type=ctype, density=1.0, svd_rank=64)
        assert_truncation_close(our_deltas(model, "c"), peft_deltas(pm, "c"), our_deltas(model, "full"), 32,
                                ctype + " (density 1)")
        return
    assert_deltas_close(our_deltas(model, "c"), peft_deltas(pm, "c"), ctype + " (density 1)", rel=64 * EPS32)


def test_rslora_combination_has_scaling_one(env, model, rng):
    """Ours is the documented combination (use_rslora off, scaling alpha / r = 1). PEFT < 0.22 kept
    use_rslora on the combined config, which scaled its result by sqrt(new rank); PEFT 0.22 turns it off
    as we do: the expected factor follows the combined config PEFT made."""
    add_random(model, "x", rng, r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj"])
    add_random(model, "y", rng, r=4, lora_alpha=2, use_rslora=True, target_modules=["q_proj"])
    pm = peft_model(env, model, ["x", "y"])
    pm.add_weighted_adapter(["x", "y"], [0.5, 2.0], "c", combination_type="cat")
    model.add_weighted_adapter(["x", "y"], [0.5, 2.0], "c", combination_type="cat")
    cfg = model.adapter_config("c")
    assert (cfg.r, cfg.lora_alpha, cfg.use_rslora) == (8, 8, False)
    ours, ref = our_deltas(model, "c"), peft_deltas(pm, "c")
    pc = pm.peft_config["c"]
    assert (pc.r, pc.lora_alpha) == (8, 8)
    peft_factor = math.sqrt(8) if pc.use_rslora else 1.0  # PEFT's scaling of its combined adapter over ours
    da, db = our_deltas(model, "x"), our_deltas(model, "y")
    for p in ours:
        want = 0.5 * da[p] + 2.0 * db[p]
        np.testing.assert_allclose(ours[p], want, rtol=0, atol=16 * EPS32 * np.abs(want).max())
        np.testing.assert_allclose(ours[p] * peft_factor, ref[p], rtol=0, atol=64 * EPS32 * np.abs(ref[p]).max())


def test_linear_with_rank_pattern_is_padded(env, model, rng, tmp_path):
    """Equal r but a rank_pattern: PEFT's linear result has the pattern's rank under a config saying r
    (its own saved adapter then fails to load); ours is padded to r with zero components, the same delta."""
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2})
    add_random(model, "x", rng, **kw)
    add_random(model, "y", rng, **kw)
    pm = peft_model(env, model, ["x", "y"])
    pm.add_weighted_adapter(["x", "y"], [0.6, 0.3], "c", combination_type="linear")
    model.add_weighted_adapter(["x", "y"], [0.6, 0.3], "c", combination_type="linear")
    check_config(model, pm)
    assert {v.shape for v in model.get_adapter_state_dict("c").values()} == {(4, 64), (64, 4), (32, 4)}
    assert_deltas_close(our_deltas(model, "c"), peft_deltas(pm, "c"), "linear")
    model.save_adapter(tmp_path, "c", base_model_name_or_path=str(env["tmp"] / "base"))
    back = peft.PeftModel.from_pretrained(copy.deepcopy(env["base"]), str(tmp_path), adapter_name="c")
    assert_deltas_close(peft_deltas(back, "c"), peft_deltas(pm, "c"), "linear")


def test_single_adapter_is_linear_and_exact(env, model, rng):
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    pm = peft_model(env, model, ["x"])
    pm.add_weighted_adapter(["x"], [-1.5], "c", combination_type="ties")  # PEFT: one adapter -> linear
    model.add_weighted_adapter(["x"], [-1.5], "c", combination_type="ties")
    check_config(model, pm)
    ours, da = our_deltas(model, "c"), our_deltas(model, "x")
    assert_deltas_close(ours, peft_deltas(pm, "c"), "linear")
    for p in ours:
        np.testing.assert_allclose(ours[p], -1.5 * da[p], rtol=0, atol=16 * EPS32 * np.abs(da[p]).max())


# ---------------------------------------------------------------- DARE: defining properties
def _identify(got, tensors, weights, density, ties):
    """For each entry: which keep-pattern of the two tensors gives `got` (DARE keeps each entry with
    probability density and rescales it by 1/density; TIES then averages the sign-elected ones)."""
    cands = []
    for keep in ((0, 0), (1, 0), (0, 1), (1, 1)):
        kept = [k * t / density for k, t in zip(keep, tensors)]
        w = [wi * t for wi, t in zip(weights, kept)]
        if ties:
            votes = kept[0] + kept[1]
            elected = np.where(votes >= 0, 1.0, -1.0)
            agree = [np.sign(t) == elected for t in kept]
            cands.append((w[0] * agree[0] + w[1] * agree[1]) / np.maximum(agree[0] * 1.0 + agree[1], 1))
        else:
            cands.append(w[0] + w[1])
    cands = np.stack(cands)
    err = np.abs(cands - got[None])
    best = err.argmin(axis=0)
    scale = np.abs(cands).max()
    assert err.min(axis=0).max() <= 64 * EPS32 * scale  # every entry is one of the patterns
    return best


@pytest.mark.parametrize("ctype", ["dare_linear_svd", "dare_ties_svd"])
def test_dare_svd_defining_properties(model, rng, ctype):
    density = 0.3
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj"])
    add_random(model, "y", rng, r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj"])
    model.add_weighted_adapter(["x", "y"], [0.8, 0.5], "c", combination_type=ctype, density=density, svd_rank=64,
                               seed=7)
    da, db, dc = our_deltas(model, "x"), our_deltas(model, "y"), our_deltas(model, "c")
    ties = ctype == "dare_ties_svd"
    for p in dc:
        best = _identify(dc[p], [da[p], db[p]], [0.8, 0.5], density, ties)
        n = best.size
        zero = np.mean(best == 0)  # neither kept
        assert abs(zero - (1 - density) ** 2) < 5 * math.sqrt(0.25 / n), p
        if not ties:  # the patterns are distinguishable: each tensor is kept with probability density
            for which in (1, 2):
                kept = np.mean((best == which) | (best == 3))
                assert abs(kept - density) < 5 * math.sqrt(0.25 / n), (p, which)


@pytest.mark.parametrize("ctype", ["dare_linear", "dare_ties"])
def test_dare_factor_defining_properties(model, rng, ctype):
    """dare_linear / dare_ties act on A and on B separately with sqrt(|w scaling|) per factor."""
    density = 0.5
    add_random(model, "x", rng, r=8, lora_alpha=8, target_modules=["down_proj"])
    add_random(model, "y", rng, r=8, lora_alpha=16, target_modules=["down_proj"])
    model.add_weighted_adapter(["x", "y"], [1.0, -0.5], "c", combination_type=ctype, density=density, seed=3)
    sa, sb, sc = (model.get_adapter_state_dict(n) for n in ("x", "y", "c"))
    w = [1.0 * 1.0, -0.5 * 2.0]  # weight * scaling
    for k in sc:
        if k.endswith("lora_A.weight"):
            fw = [math.copysign(math.sqrt(abs(x)), x) for x in w]
        else:
            fw = [math.sqrt(abs(x)) for x in w]
        best = _identify(sc[k].astype(np.float64), [sa[k].astype(np.float64), sb[k].astype(np.float64)], fw,
                         density, ctype == "dare_ties")
        assert abs(np.mean(best == 0) - (1 - density) ** 2) < 5 * math.sqrt(0.25 / best.size), k
    # the seed fixes the masks; another seed gives other masks
    for name, seed in (("c2", 3), ("c3", 4)):
        model.add_weighted_adapter(["x", "y"], [1.0, -0.5], name, combination_type=ctype, density=density, seed=seed)
    s2, s3 = model.get_adapter_state_dict("c2"), model.get_adapter_state_dict("c3")
    for k in sc:
        np.testing.assert_array_equal(s2[k], sc[k])
        assert not np.array_equal(s3[k], sc[k])


def test_ties_sign_election_rules():
    """TIES on hand-made tensors: signs elected by the sum ('total') or the count ('frequency') of the
    pruned, unweighted values; the weighted values that agree are averaged."""
    t1 = np.array([[3.0, -1.0, 2.0, 0.0]])
    t2 = np.array([[-1.0, -1.0, -1.0, -2.0]])
    t3 = np.array([[-1.0, 4.0, -1.0, 0.0]])
    w = np.array([1.0, 2.0, 3.0])
    total = adapter_combine._merge("ties", [t1, t2, t3], w, 1.0, "total", None)
    # col 0: sum 1 -> +: only t1 (3*1); col 1: sum 2 -> +: t3 (4*3); col 2: sum 0 -> +: t1 (2);
    # col 3: sum -2 -> -: t2 (-2*2)
    np.testing.assert_array_equal(total, [[3.0, 12.0, 2.0, -4.0]])
    freq = adapter_combine._merge("ties", [t1, t2, t3], w, 1.0, "frequency", None)
    # col 0: 1 + vs 2 - -> -: (-2 - 3) / 2; col 1: 1 + vs 2 -: (-1 - 2) / 2; col 2: (-2 - 3) / 2; col 3: -4
    np.testing.assert_array_equal(freq, [[-2.5, -1.5, -2.5, -4.0]])
    # magnitude pruning keeps int(density * n) largest magnitudes
    np.testing.assert_array_equal(adapter_combine._magnitude_prune(np.array([1.0, -5.0, 3.0, 0.5]), 0.5),
                                  [0.0, -5.0, 3.0, 0.0])


# ---------------------------------------------------------------- the combined adapter is an ordinary adapter
def test_combined_adapter_forward_save_load_train(env, model, rng, tmp_path):
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    add_random(model, "y", rng, r=6, lora_alpha=6, target_modules=["q_proj", "o_proj"])
    model.add_weighted_adapter(["x", "y"], [0.6, 0.4], "mix", combination_type="svd")
    ids = rng.integers(3, 100, size=(2, 9))
    model.set_active_adapter("mix")
    logits = model(ids)
    model.set_active_adapter(None)
    assert not np.allclose(logits, model(ids))  # the adapter changes the output
    # saved in PEFT format: PEFT (float64 reference) computes the same logits
    out = tmp_path / "mix"
    model.save_adapter(out, "mix", base_model_name_or_path=str(env["tmp"] / "base"))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == saved["lora_alpha"] == 6 and saved["target_modules"] == ["down_proj", "o_proj", "q_proj",
                                                                                  "v_proj"]
    pm = peft.PeftModel.from_pretrained(reference_model(env["cfg"], env["state"], "float64"), str(out))
    ref = reference_logits(pm, ids)
    assert np.abs(logits - ref).max() <= 1e-4 * np.abs(ref).max()
    # loaded back: identical
    model.load_adapter(out, "mix2")
    model.set_active_adapter("mix2")
    np.testing.assert_array_equal(model(ids), logits)
    # trainable further
    model.set_active_adapter("mix")
    before = model.get_adapter_state_dict("mix")
    model.configure_optimizer(lr=1e-2)
    loss = model.forward_backward(ids, ids)
    assert math.isfinite(loss)
    model.optimizer_step()
    after = model.get_adapter_state_dict("mix")
    assert any(not np.array_equal(before[k], after[k]) for k in before)
    assert len(model.generate(ids[:1], max_new_tokens=3, eos_token_id=None)[0]) >= 3  # no EOS stop: any seed


def test_peft_combined_adapter_loads_into_ours(env, model, rng, tmp_path):
    """PEFT's own combined adapter (saved by PEFT) loads into qlora_native with the same deltas."""
    pm = both(env, model, rng, "lists", "cat")
    pm.save_pretrained(str(tmp_path), selected_adapters=["c"])
    model.load_adapter(tmp_path / "c", "c_from_peft")
    assert_deltas_close(our_deltas(model, "c_from_peft"), our_deltas(model, "c"), "cat")


# ---------------------------------------------------------------- errors
def test_errors(model, rng):
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["q_proj"])
    add_random(model, "y", rng, r=8, lora_alpha=8, target_modules=["q_proj"])
    add_random(model, "s", rng, r=4, lora_alpha=8, target_modules=r".*\.q_proj")
    add_random(model, "p", rng, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2})
    add_random(model, "l1", rng, r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1])
    add_random(model, "k0", rng, r=4, lora_alpha=8, target_modules=["k_proj"], layers_to_transform=[0])
    w2 = [0.5, 0.5]
    cases = [
        (dict(adapters=["x", "y"], combination_type="linear"), "All adapters must have the same r value"),
        (dict(adapters=["x", "y"], combination_type="ties", density=0.5), "All adapters must have the same r value"),
        (dict(adapters=["x", "s"], combination_type="cat"), "same target modules type"),
        (dict(adapters=["x", "zz"]), "Adapter zz does not exist"),
        (dict(adapters=["x", "y"], combination_type="average"), "Invalid combination_type: average"),
        (dict(adapters=["x"], weights=[1.0], combination_type="average"), "Invalid combination_type"),
        (dict(adapters=["x", "y"], weights=[1.0]), "one number per adapter"),
        (dict(adapters=["x", "y"], weights=[1.0, 2.0, 3.0]), "one number per adapter"),
        (dict(adapters=["x", "y"], weights=[1.0, float("nan")]), r"weights\[1\]"),
        (dict(adapters=["x", "y"], weights="ab"), "one number per adapter"),
        (dict(adapters=[]), "non-empty list"),
        (dict(adapters="x"), "non-empty list"),
        (dict(adapters=["x", "x"], combination_type="ties"), "needs density"),
        (dict(adapters=["x", "x"], combination_type="dare_linear", density=0.0), "density must be > 0"),
        (dict(adapters=["x", "x"], combination_type="ties", density=1.5), r"density must be in \[0.0, 1.0\]"),
        (dict(adapters=["x", "x"], combination_type="ties", density=0.5, majority_sign_method="max"),
         "majority_sign_method"),
        (dict(adapters=["x", "y"], svd_rank=0), "svd_rank"),
        (dict(adapters=["x", "y"], svd_rank=10**9), "svd_rank 1000000000 exceeds the largest rank"),
        (dict(adapters=["x", "y"], svd_rank=65), r"exceeds the largest rank a projection's delta can have \(64\)"),
        (dict(adapters=["x", "y"], svd_clamp=2.0), "svd_clamp"),
        (dict(adapters=["x", "y"], svd_driver="lapack"), "svd_driver"),
        (dict(adapters=["x", "y"], seed=-1), "seed"),
        # a module of the combined adapter that no adapter has (adapters[0]'s layers, union of targets)
        (dict(adapters=["l1", "k0"], combination_type="cat"), "none of the adapters"),
        (dict(adapter_name="x"), "already exists"),
        (dict(adapter_name=""), "non-empty str"),
    ]
    for kw, msg in cases:
        args = dict(adapters=["x", "y"], weights=w2, adapter_name="new", combination_type="svd")
        args.update(kw)
        if "weights" not in kw and isinstance(args["adapters"], list) and len(args["adapters"]) != 2:
            args["weights"] = [1.0] * len(args["adapters"])
        with pytest.raises(ValueError, match=msg):
            model.add_weighted_adapter(**args)
        assert "new" not in model.adapters  # nothing half-made is left behind
    # equal ranks but rank_pattern modules that differ between the adapters: PEFT's torch.stack fails
    add_random(model, "p2", rng, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.0.self_attn.q_proj": 2})
    add_random(model, "p3", rng, r=4, lora_alpha=8, target_modules=["q_proj"], rank_pattern={"layers.1.self_attn.q_proj": 2})
    with pytest.raises(ValueError, match="needs equal ranks in every module"):
        model.add_weighted_adapter(["p2", "p3"], w2, "new", combination_type="linear")
    assert "new" not in model.adapters


def test_errors_match_peft_messages(env, model, rng):
    """The messages PEFT raises for the same mistakes are the ones we raise."""
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["q_proj"])
    add_random(model, "y", rng, r=8, lora_alpha=8, target_modules=["q_proj"])
    add_random(model, "s", rng, r=4, lora_alpha=8, target_modules=r".*\.q_proj")
    pm = peft_model(env, model, ["x", "y", "s"])
    for adapters, ctype in ((["x", "y"], "linear"), (["x", "s"], "cat"), (["x", "zz"], "svd"),
                            (["x", "y"], "average")):
        with pytest.raises(ValueError) as theirs:
            pm.add_weighted_adapter(adapters, [0.5, 0.5], "new", combination_type=ctype)
        with pytest.raises(ValueError) as ours:
            model.add_weighted_adapter(adapters, [0.5, 0.5], "new", combination_type=ctype)
        assert str(ours.value) == str(theirs.value)


def test_unused_arguments_warn(model, rng):
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["q_proj"])
    add_random(model, "y", rng, r=4, lora_alpha=8, target_modules=["q_proj"])
    for i, (kw, msg) in enumerate(((dict(density=0.5), "density is not used"),
                                   (dict(svd_rank=2), "svd_rank is not used"),
                                   (dict(svd_clamp=0.9), "svd_clamp is not used"))):
        with pytest.warns(UserWarning, match=msg):
            model.add_weighted_adapter(["x", "y"], [0.5, 0.5], f"c{i}", combination_type="linear", **kw)


def test_uncovered_modules_warn(model, rng):
    """PEFT keeps adapters[0]'s layers_to_transform: b's layer-0 module is left out; we say so."""
    add_random(model, "x", rng, r=4, lora_alpha=8, target_modules=["q_proj"], layers_to_transform=[1])
    add_random(model, "y", rng, r=4, lora_alpha=8, target_modules=["q_proj"])
    with pytest.warns(RuntimeWarning, match="model.layers.0.self_attn.q_proj"):
        model.add_weighted_adapter(["x", "y"], [0.5, 0.5], "c", combination_type="linear")
    assert [(l, p) for l, p, *_ in model.adapter_config("c").resolve(2)] == [(1, "q_proj")]


def test_report_max_diff():
    """Prints the max |ours - PEFT| per combination type seen by the tests above (pytest -s)."""
    for k in sorted(MAX_DIFF):
        print(f"max abs diff vs PEFT  {k:28s} {MAX_DIFF[k]:.3e}")
