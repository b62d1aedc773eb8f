"""Checks of a Trainer checkpoint's trainer_state.json and optimizer files before a resume uses
them: a hand-edited or corrupt checkpoint is a FormatError naming the file and the field, never a
run that trains 10^18 steps, skips an epoch or reports a negative loss."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ._core import FormatError


def _int(state: dict, key: str, where: Path, lo: int, hi: int | None, default=None) -> int:
    v = state.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise FormatError(f"{where}: '{key}' must be an int in {rng}, got {v!r}")
    return v


def check_state(where: Path, state, total_steps: int, num_batches) -> None:
    """The fields a resume reads: positions within the run, counters, the rng and the log.
    num_batches(epoch): batches in that epoch (the position must lie inside it)."""
    if not isinstance(state, dict):
        raise FormatError(f"{where}: expected a JSON object, got {type(state).__name__}")
    step = _int(state, "global_step", where, 0, total_steps)
    epoch = _int(state, "epoch", where, 0, step)  # every epoch so far took at least one step
    _int(state, "batch_in_epoch", where, 0, num_batches(epoch))
    _int(state, "tokens_seen", where, 0, None, default=0)
    _int(state, "loss_tokens", where, 0, None, default=0)
    loss = state.get("loss_sum", 0.0)
    if isinstance(loss, bool) or not isinstance(loss, (int, float)) or not math.isfinite(loss) or loss < 0:
        raise FormatError(f"{where}: 'loss_sum' must be a finite number >= 0, got {loss!r}")
    if not isinstance(state.get("rng", {}), dict):
        raise FormatError(f"{where}: 'rng' must be an object, got {state['rng']!r}")
    log = state.get("log_history", [])
    if not isinstance(log, list) or not all(isinstance(r, dict) for r in log):
        raise FormatError(f"{where}: 'log_history' must be a list of objects")


def flatten(obj, prefix="s"):
    """Nested dict/list/tuple of arrays and JSON scalars -> ({name: array}, JSON skeleton): what the
    Trainer writes as optimizer.safetensors / optimizer.json; unflatten is its inverse."""
    tensors: dict = {}

    def walk(o, p):
        if isinstance(o, np.ndarray):
            tensors[p] = np.ascontiguousarray(o)
            return {"__tensor__": p}
        if isinstance(o, dict):
            for k in o:
                if not isinstance(k, str):
                    raise ValueError(f"optimizer state: key {k!r} at {p} is not a str")
            return {"__dict__": {k: walk(v, f"{p}.{k}") for k, v in o.items()}}
        if isinstance(o, (list, tuple)):
            items = [walk(v, f"{p}.{i}") for i, v in enumerate(o)]
            return {"__tuple__": items} if isinstance(o, tuple) else items
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        if o is None or isinstance(o, (bool, int, float, str)):
            return o
        raise ValueError(f"optimizer state: cannot serialize {type(o).__name__} at {p}")

    return tensors, walk(obj, prefix)


def unflatten(where: Path, skel, tensors: dict):
    """optimizer.json's skeleton with its tensors put back (flatten's inverse); every
    tensor a float array (an int one would be cast, truncating the moments)."""
    if isinstance(skel, dict):
        if "__tensor__" in skel:
            name = skel["__tensor__"]
            if not isinstance(name, str) or name not in tensors:
                raise FormatError(f"{where}: optimizer state: tensor {name!r} missing")
            t = tensors[name]
            if t.dtype.kind != "f" and t.dtype.name != "bfloat16":
                raise FormatError(f"{where}: optimizer state: tensor {name!r} is {t.dtype}, not a float type")
            return t
        if "__tuple__" in skel:
            if not isinstance(skel["__tuple__"], list):
                raise FormatError(f"{where}: optimizer state: '__tuple__' must be a list")
            return tuple(unflatten(where, v, tensors) for v in skel["__tuple__"])
        if not isinstance(skel.get("__dict__"), dict):
            raise FormatError(f"{where}: optimizer state: an object must hold '__dict__', '__tuple__' or '__tensor__'")
        return {k: unflatten(where, v, tensors) for k, v in skel["__dict__"].items()}
    if isinstance(skel, list):
        return [unflatten(where, v, tensors) for v in skel]
    return skel
