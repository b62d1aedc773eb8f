"""Weighted combinations of LoRA adapters: PEFT's add_weighted_adapter (peft 0.21) on qlora_native.

    model.add_weighted_adapter(["a", "b"], [0.7, 0.3], "mix", combination_type="svd")

The combined adapter is an ordinary adapter of the model (usable, trainable, savable in PEFT
format). Its config is what PEFT gives it: adapters[0]'s config with r = lora_alpha = the new rank
(scaling 1), no rank/alpha patterns, and the union of the adapters' target_modules (sets) or
"(t1)|(t2)|..." (regex strings). New rank: the common rank (linear, ties, dare_*, magnitude_prune),
the sum of the ranks (cat), svd_rank or the largest rank (*svd).

Per module, with delta_i = scaling_i * B_i @ A_i and w_i the weights:
  cat:      A = [w_i scaling_i A_i] stacked along the rank, B = [B_i] side by side (exact: sum w_i delta_i);
  linear, ties, dare_linear, dare_ties, magnitude_prune: the merge rule applied to the A's and to the
            B's separately, with sqrt(|w_i scaling_i|) per factor (the sign on A) -- PEFT's approximation;
  svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd: the merge rule applied to the
            delta_i, then B = U_k S_k, A = V_k^T of its rank-k truncated SVD (optionally clamped).
The merge rules are those of peft/utils/merge_utils.py: magnitude pruning keeps the int(density * n)
largest magnitudes, DARE keeps each entry with probability density and divides by density, TIES
elects the sign per entry (from the pruned, unweighted tensors) and averages the weighted entries
that agree with it.

Why numpy and not an engine kernel: this is one-off linear algebra on the adapters' small A/B
tensors (and an SVD, which the engine has no LAPACK for), run once per combination, not a hot path.
The math is done in float64 and stored as float32, so results agree with PEFT's float32 ones to
float32 rounding.

Where we differ from PEFT, on purpose (PEFT is silent or crashes there):
  * an existing adapter_name raises ValueError (PEFT returns without doing anything);
  * weights of another length than adapters, an unknown combination_type (also with one adapter),
    a missing or out-of-range density, an unknown majority_sign_method raise ValueError;
  * DARE uses numpy's random generator (seed=...), not torch's: the kept entries differ from PEFT's,
    the rule is the same;
  * the combined adapter of use_rslora adapters gets use_rslora=False: PEFT keeps use_rslora and so
    scales its result by sqrt(new rank) instead of 1;
  * where a module's result has fewer than new-rank components (a module whose rank comes from a
    rank_pattern, or svd_rank above the module's min(out, in)), it is padded with zero components,
    which does not change the delta (PEFT keeps the smaller tensor under a config saying r, so its
    saved adapter does not load, or fails); svd_rank above every projection's min(out, in) raises;
  * arguments the combination type does not use (density, svd_rank, svd_clamp) give a UserWarning;
  * a module of the combined adapter that none of the adapters has raises ValueError naming it;
    modules of the adapters that the combined config does not cover (PEFT drops them silently:
    only adapters[0]'s layers_to_transform / exclude_modules are kept) give a RuntimeWarning.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import warnings

import numpy as np

from .lora_config import ALL_LINEAR, DEFAULT_TARGETS, PROJECTIONS, LoraConfig, module_path, peft_tensor_name

__all__ = ["COMBINATION_TYPES", "add_weighted_adapter", "combined_config", "combine_module"]

COMBINATION_TYPES = ("svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear", "dare_ties_svd",
                     "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd")
_SAME_RANK = ("linear", "ties", "dare_ties", "dare_linear", "magnitude_prune")  # combine A and B separately
_SVD = tuple(t for t in COMBINATION_TYPES if t.endswith("svd"))
_MERGE_RULE = {  # combination type -> merge rule of peft.utils.merge_utils
    "linear": "task_arithmetic", "svd": "task_arithmetic", "ties": "ties", "ties_svd": "ties",
    "dare_linear": "dare_linear", "dare_linear_svd": "dare_linear", "dare_ties": "dare_ties",
    "dare_ties_svd": "dare_ties", "magnitude_prune": "magnitude_prune", "magnitude_prune_svd": "magnitude_prune"}
_USES_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")  # merge rules
_USES_SIGN = ("ties", "dare_ties")
_SVD_DRIVERS = (None, "gesvd", "gesvdj", "gesvda")


# ---------------------------------------------------------------- argument checks
def _check_number(what, v, lo=None, hi=None):
    if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
        raise ValueError(f"add_weighted_adapter: {what} must be a finite number, got {v!r}")
    v = float(v)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"add_weighted_adapter: {what} must be in [{lo}, {hi}], got {v!r}")
    return v


def _check_positive_int(what, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v <= 0:
        raise ValueError(f"add_weighted_adapter: {what} must be a positive int or None, got {v!r}")
    return int(v)


def _peft_targets(cfg: LoraConfig, num_layers: int):
    """target_modules as PEFT holds it once the adapter is on a Llama model: a set of names (a list;
    None = the Llama default names; "all-linear" = the module paths of every linear layer but lm_head,
    as peft 0.21's _maybe_include_all_linear_layers sets it) or a regex string."""
    t = cfg.target_modules
    if t is None:
        return set(DEFAULT_TARGETS)
    if isinstance(t, str):
        if t.lower() == ALL_LINEAR:
            return {module_path(i, p) for i in range(num_layers) for p in PROJECTIONS}
        return t
    return set(t)


def _max_rank(cfg: LoraConfig) -> int:
    # PEFT: config.r, or the largest rank the config can give a module when it has a rank_pattern
    return int(max(cfg.r, *cfg.rank_pattern.values())) if cfg.rank_pattern else int(cfg.r)


def combined_config(configs: list, combination_type: str, svd_rank: int | None, num_layers: int):
    """(effective combination type, new rank, LoraConfig of the combined adapter), as PEFT's
    _check_add_weighted_adapter + add_weighted_adapter set them for a num_layers-layer Llama model;
    configs[0] gives the other fields."""
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if not configs:
        raise ValueError("add_weighted_adapter: adapters must name at least one adapter")
    if len(configs) == 1:  # PEFT: one adapter can only be combined linearly
        combination_type = "linear"
    ranks = [_max_rank(c) for c in configs]
    if combination_type in _SAME_RANK:
        if len(set(ranks)) != 1:
            raise ValueError("All adapters must have the same r value when using combination_type linear, ties, "
                             "dare_ties or dare_linear.")
        new_rank = ranks[0]
    elif combination_type == "cat":
        new_rank = sum(ranks)
    else:
        new_rank = svd_rank or max(ranks)
    targets = [_peft_targets(c, num_layers) for c in configs]
    if len({type(t) for t in targets}) > 1:
        raise ValueError("all adapter configs should follow the same target modules type. Combining adapters with "
                         "`target_modules` type being a mix of list/set and string is not supported.")
    if isinstance(targets[0], str):
        new_targets = "|".join(f"({t})" for t in targets)
    else:
        new_targets = sorted(set().union(*targets))
    cfg = dataclasses.replace(configs[0], r=new_rank, lora_alpha=new_rank, target_modules=new_targets,
                              rank_pattern={}, alpha_pattern={}, use_rslora=False)
    return combination_type, new_rank, cfg


# ---------------------------------------------------------------- merge rules (peft/utils/merge_utils.py)
def _magnitude_prune(t: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return t
    k = int(density * t.size)  # PEFT: int(density * numel), the k largest magnitudes are kept
    flat = t.ravel()
    out = np.zeros_like(flat)
    if k > 0:
        keep = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        out[keep] = flat[keep]
    return out.reshape(t.shape)


def _random_prune(t: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    if density >= 1:
        return t
    keep = rng.random(t.shape) < density  # Bernoulli(density) per entry, then rescaled by 1/density
    return np.where(keep, t, 0.0) / density


def _merge(rule: str, tensors: list, weights: np.ndarray, density, sign_method: str, rng) -> np.ndarray:
    """One merge rule over same-shaped float64 tensors with per-tensor weights."""
    if rule in ("ties", "magnitude_prune"):
        tensors = [_magnitude_prune(t, density) for t in tensors]
    elif rule in ("dare_linear", "dare_ties"):
        tensors = [_random_prune(t, density, rng) for t in tensors]
    stack = np.stack(tensors)
    weighted = stack * weights.reshape((-1,) + (1,) * (stack.ndim - 1))
    if rule not in _USES_SIGN:
        return weighted.sum(axis=0)
    # TIES: elect each entry's sign from the pruned, unweighted tensors (sum of values, or of signs),
    # then average the weighted entries that have that sign (zeros have none)
    sign = np.sign(stack)
    votes = stack.sum(axis=0) if sign_method == "total" else sign.sum(axis=0)
    agree = sign == np.where(votes >= 0, 1.0, -1.0)
    return (weighted * agree).sum(axis=0) / np.maximum(agree.sum(axis=0), 1)


def _pad_rank(a: np.ndarray, b: np.ndarray, rank: int):
    """Zero components up to `rank` (B @ A unchanged)."""
    k = a.shape[0]
    if k < rank:
        a = np.concatenate([a, np.zeros((rank - k, a.shape[1]), a.dtype)], axis=0)
        b = np.concatenate([b, np.zeros((b.shape[0], rank - k), b.dtype)], axis=1)
    return a, b


def _svd_of_combination(combination_type, As, Bs, ws, weights, scalings, density, sign_method, rng):
    """(U, S, Vh) of the merged delta, singular values descending; only the leading ones matter.
    The task-arithmetic sum (svd) is B_cat @ A_cat of rank R = sum r_i: with R <= min(out, in) its SVD
    comes from QR factorizations of the factors and the SVD of an R x R matrix (the same triplets as a
    dense SVD, for O((out + in) R^2) instead of O(out in min(out, in)) work). The pruned deltas of the
    other types are dense: a full (reduced) SVD."""
    out_f, in_f = Bs[0].shape[0], As[0].shape[1]
    rank = sum(a.shape[0] for a in As)
    if combination_type == "svd" and rank <= min(out_f, in_f):
        qb, rb = np.linalg.qr(np.concatenate(Bs, axis=1))
        qa, ra = np.linalg.qr(np.concatenate([w * a for w, a in zip(ws, As)], axis=0).T)
        um, s, vmh = np.linalg.svd(rb @ ra.T)
        return qb @ um, s, vmh @ qa.T
    deltas = [sc * (b @ a) for sc, a, b in zip(scalings, As, Bs)]
    delta = _merge(_MERGE_RULE[combination_type], deltas, np.array(weights), density, sign_method, rng)
    # the leading singular triplets of the full SVD; the reduced one needs far less memory
    return np.linalg.svd(delta, full_matrices=False)


def combine_module(combination_type: str, factors: list, new_rank: int, *, density=None,
                   majority_sign_method: str = "total", svd_clamp=None, svd_full_matrices: bool = True,
                   rng: np.random.Generator | None = None, where: str = "module"):
    """Combined (A [new_rank, in], B [out, new_rank]) float32 of one module.
    factors: [(A_i [r_i, in], B_i [out, r_i], scaling_i, weight_i)] of the adapters that have it."""
    if not factors:
        raise ValueError(f"add_weighted_adapter: no adapter has {where}")
    if rng is None:
        rng = np.random.default_rng()
    As = [np.asarray(a, np.float64) for a, _, _, _ in factors]
    Bs = [np.asarray(b, np.float64) for _, b, _, _ in factors]
    ws = [float(w) * float(s) for _, _, s, w in factors]
    if combination_type == "cat":
        a = np.concatenate([w * a for w, a in zip(ws, As)], axis=0)
        b = np.concatenate(Bs, axis=1)
    elif combination_type in _SAME_RANK:
        ranks = sorted({a.shape[0] for a in As})
        if len(ranks) > 1:  # PEFT fails in torch.stack here
            raise ValueError(f"add_weighted_adapter: the adapters have ranks {ranks} at {where}; combination_type "
                             f"{combination_type!r} needs equal ranks in every module (use 'cat' or an svd type)")
        # sqrt(|w scaling|) on each factor, the sign on A only (so B @ A gets w * scaling)
        w_a = np.array([math.copysign(math.sqrt(abs(w)), w) for w in ws])
        w_b = np.array([math.sqrt(abs(w)) for w in ws])
        rule = _MERGE_RULE[combination_type]
        a = _merge(rule, As, w_a, density, majority_sign_method, rng)
        b = _merge(rule, Bs, w_b, density, majority_sign_method, rng)
    elif combination_type in _SVD:
        u, s, vh = _svd_of_combination(combination_type, As, Bs, ws, [float(w) for *_, w in factors],
                                       [float(sc) for _, _, sc, _ in factors], density, majority_sign_method, rng)
        k = min(new_rank, s.size)
        b, a = u[:, :k] * s[:k], vh[:k]
        if svd_clamp is not None:
            hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), svd_clamp)
            b, a = np.clip(b, -hi, hi), np.clip(a, -hi, hi)  # hi < 0: everything becomes hi, as torch.clamp
    else:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    a, b = _pad_rank(a, b, new_rank)
    return np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32)


# ---------------------------------------------------------------- on a model
def add_weighted_adapter(model, adapters, weights, adapter_name, combination_type="svd", svd_rank=None,
                         svd_clamp=None, svd_full_matrices=True, svd_driver=None, density=None,
                         majority_sign_method="total", seed=None) -> None:
    """See LoraModelMixin.add_weighted_adapter."""
    name = model._new_adapter_name(adapter_name)
    if isinstance(adapters, str) or not isinstance(adapters, (list, tuple)) or not adapters:
        raise ValueError(f"add_weighted_adapter: adapters must be a non-empty list of adapter names, got {adapters!r}")
    for a in adapters:
        if not isinstance(a, str) or a not in model.adapters:
            raise ValueError(f"Adapter {a} does not exist")
    if isinstance(weights, (str, bytes)) or not hasattr(weights, "__len__") or len(weights) != len(adapters):
        got = len(weights) if hasattr(weights, "__len__") and not isinstance(weights, (str, bytes)) else repr(weights)
        raise ValueError(f"add_weighted_adapter: weights must have one number per adapter ({len(adapters)}), "
                         f"got {got}")
    weights = [_check_number(f"weights[{i}]", w) for i, w in enumerate(weights)]
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(f"Invalid combination_type: {combination_type}")
    if svd_rank is not None:
        svd_rank = _check_positive_int("svd_rank", svd_rank)
    if svd_clamp is not None:
        svd_clamp = _check_number("svd_clamp (a quantile)", svd_clamp, 0.0, 1.0)
    if not isinstance(svd_full_matrices, bool):
        raise ValueError(f"add_weighted_adapter: svd_full_matrices must be a bool, got {svd_full_matrices!r}")
    if svd_driver not in _SVD_DRIVERS:
        raise ValueError(f"add_weighted_adapter: svd_driver must be one of {_SVD_DRIVERS}, got {svd_driver!r}")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"add_weighted_adapter: majority_sign_method must be 'total' or 'frequency', "
                         f"got {majority_sign_method!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0):
        raise ValueError(f"add_weighted_adapter: seed must be a non-negative int or None, got {seed!r}")
    # PEFT combines a single adapter linearly whatever the type asked for
    rule = _MERGE_RULE.get("linear" if len(adapters) == 1 else combination_type)
    if density is not None:
        density = _check_number("density", density, 0.0, 1.0)
    if rule in _USES_DENSITY:
        if density is None:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} needs density "
                             "(the fraction of entries kept, in [0, 1])")
        if rule.startswith("dare") and density == 0.0:
            raise ValueError(f"add_weighted_adapter: combination_type {combination_type!r} rescales by 1/density; "
                             "density must be > 0")
    elif density is not None and _MERGE_RULE.get(combination_type) not in _USES_DENSITY:
        warnings.warn(f"add_weighted_adapter: density is not used by combination_type {combination_type!r}",
                      UserWarning, stacklevel=3)
    if svd_rank is not None:
        limit = max(min(shape) for shape in model._module_shapes().values())
        if svd_rank > limit:  # components beyond min(out, in) are zeros: refuse a huge allocation
            raise ValueError(f"add_weighted_adapter: svd_rank {svd_rank} exceeds the largest rank a projection's "
                             f"delta can have ({limit})")
        if combination_type not in _SVD:
            warnings.warn(f"add_weighted_adapter: svd_rank is not used by combination_type {combination_type!r}",
                          UserWarning, stacklevel=3)
    if svd_clamp is not None and combination_type not in _SVD:
        warnings.warn(f"add_weighted_adapter: svd_clamp is not used by combination_type {combination_type!r}",
                      UserWarning, stacklevel=3)

    n_layers = model.config.num_hidden_layers
    configs = [model.adapter_config(a) for a in adapters]
    ctype, new_rank, cfg = combined_config(configs, combination_type, svd_rank, n_layers)
    modules = cfg.resolve(n_layers)
    sources = []  # per adapter: {(layer, proj): (A, B, scaling)}
    for a, c in zip(adapters, configs):
        sd = model.get_adapter_state_dict(a)
        sources.append({(l, p): (sd[peft_tensor_name(l, p, "A")], sd[peft_tensor_name(l, p, "B")], s)
                        for l, p, _, _, s in c.resolve(n_layers)})
    covered = {(l, p) for l, p, *_ in modules}
    dropped = sorted({k for src in sources for k in src} - covered, key=lambda k: (k[0], PROJECTIONS.index(k[1])))
    if dropped:
        warnings.warn(f"add_weighted_adapter: the combined adapter (adapters[0]'s layers_to_transform / "
                      f"exclude_modules, as in PEFT) does not cover {len(dropped)} module(s) that the adapters "
                      f"have, e.g. {module_path(*dropped[0])}; their contribution is left out", RuntimeWarning,
                      stacklevel=3)
    rng = np.random.default_rng(seed)
    tensors = {}
    for layer, proj, *_ in modules:
        where = module_path(layer, proj)
        factors = [src[(layer, proj)] + (w,) for src, w in zip(sources, weights) if (layer, proj) in src]
        if not factors:
            raise ValueError(f"add_weighted_adapter: the combined adapter targets {where} (target_modules "
                             f"{cfg.target_modules!r} with adapters[0]'s layer selection), but none of the adapters "
                             f"{list(adapters)} has it (PEFT: 'No matching LoRAs found')")
        a, b = combine_module(ctype, factors, new_rank, density=density, majority_sign_method=majority_sign_method,
                              svd_clamp=svd_clamp, svd_full_matrices=svd_full_matrices, rng=rng, where=where)
        tensors[peft_tensor_name(layer, proj, "A")] = a
        tensors[peft_tensor_name(layer, proj, "B")] = b
    model._add(name, cfg, tensors, rng)
