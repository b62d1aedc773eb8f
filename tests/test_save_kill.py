"""kill -9 at every filesystem mutation of each multi-file save (save_adapter, save_pretrained, the
Trainer's checkpoints incl. re-saving checkpoint-N, and its final adapter) -- Python's (an audit hook)
and the engine's adapter writer's (its QLORA_TEST_FAULT points): the directory under the
final name is, once a loader has looked at it, the complete old or the complete new save (compared
byte for byte with unkilled reference saves, and loadable), and the next save removes every leftover.

The sweep itself runs in helpers_save_kill.py (one subprocess that forks a child per kill point).
Counts are printed per scenario: tried / clean / lost / recovered (the loader had to finish or roll
back a swap or commit).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import helpers_save_kill as hk
from qlora_native import Model, adapter_io, atomic_io

SPECS = ["adapter:exchange", "adapter:rename", "adapter_shared:exchange", "pretrained:exchange",
         "pretrained:rename", "pretrained_shared:exchange", "trainer:exchange", "trainer:rename"]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
CKPT_FILES = ADAPTER_FILES + ("optimizer.json", "optimizer.safetensors")
MODEL_FILES = ("config.json", "model.safetensors")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([os.path.dirname(__file__)] + sys.path))
    p = subprocess.run([sys.executable, hk.__file__, str(root), *SPECS], capture_output=True, text=True,
                       timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    res = {}
    for line in p.stdout.splitlines():
        r = json.loads(line)
        res[r.pop("spec")] = r
    return root, res


def _files(d: Path, names) -> dict | None:
    try:
        return {n: (d / n).read_bytes() for n in names}
    except OSError:
        return None


def _leftovers(root: Path) -> list:
    out = []
    for dirpath, dirs, files in os.walk(root):
        for n in dirs + files:
            if atomic_io._leftover(n) or ".qlora-" in n or ".tmp" in n:
                out.append(os.path.join(dirpath, n))
    return out


def _verdict(got, old, new) -> str:
    return "old" if got == old else "new" if got == new else "lost"


def _adapter_unit(d: Path, ref_old: Path, ref_new: Path) -> str:
    try:
        adapter_io.load_adapter(d)  # recovers first
    except (OSError, ValueError):
        return "lost"
    return _verdict(_files(d, ADAPTER_FILES), _files(ref_old, ADAPTER_FILES), _files(ref_new, ADAPTER_FILES))


def _model_unit(d: Path, ref_old: Path, ref_new: Path) -> str:
    try:
        Model.from_pretrained(d, tokenizer=None)  # recovers first
    except (OSError, ValueError):
        return "lost"
    return _verdict(_files(d, MODEL_FILES), _files(ref_old, MODEL_FILES), _files(ref_new, MODEL_FILES))


def _ckpt_unit(d: Path, ref_old: Path, ref_new: Path) -> str:
    try:
        adapter_io.load_adapter(d)
        lr = json.loads((d / "trainer_state.json").read_text())["args"]["learning_rate"]
    except (OSError, ValueError, KeyError):
        return "lost"
    v = _verdict(_files(d, CKPT_FILES), _files(ref_old, CKPT_FILES), _files(ref_new, CKPT_FILES))
    return v if v == "lost" or lr == {"old": 1e-2, "new": 5e-3}[v] else "lost"


def _units(scenario: str, t: Path, R: Path) -> dict:
    """{unit: "old" | "new" | "lost"} for a trial directory (the loaders recover it first)."""
    if scenario.startswith("adapter"):
        return {"adapter": _adapter_unit(t / "adapter", R / "ref_old" / "adapter", R / "ref_new" / "adapter")}
    if scenario.startswith("pretrained"):
        return {"model": _model_unit(t / "model", R / "ref_old" / "model", R / "ref_new" / "model")}
    out = {"final": _adapter_unit(t / "out", R / "ref_old" / "out", R / "ref_new" / "out")}
    for ck in ("checkpoint-2",):  # exists before the new run: re-saved, must never go missing
        out[ck] = _ckpt_unit(t / "out" / ck, R / "ref_old" / "out" / ck, R / "ref_new" / "out" / ck)
    return out


def _needs_recovery(t: Path) -> bool:
    return any(".qlora-old." in p or ".qlora-commit." in p for p in _leftovers(t))


@pytest.mark.parametrize("spec", SPECS)
def test_kill9_leaves_old_or_new_and_next_save_cleans(sweep, spec, monkeypatch):
    root, res = sweep
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # as in the sweep: kill -9 keeps the page cache
    scenario, mode = spec.split(":")
    r = res[spec]
    R = root / f"{scenario}-{mode}"
    base, fn = R / "base", hk.SCENARIOS[scenario]
    monkeypatch.setattr(atomic_io, "_renameat2", atomic_io._renameat2 if mode == "exchange" else None)
    if mode == "rename":
        monkeypatch.setenv("QLORA_TEST_NO_EXCHANGE", "1")  # the engine's writer too
    tried = clean = lost = recovered = 0
    seen = set()
    bad = []
    for k in r["killed"]:
        t = R / f"t{k}"
        tried += 1
        recovered += _needs_recovery(t)
        units = _units(scenario, t, R)
        seen.update(units.values())
        if scenario.endswith("_shared"):
            sub = t / ("adapter" if scenario.startswith("adapter") else "model")
            if (sub / "README.md").read_text() != "user notes\n":
                units["README.md"] = "lost"
        fn(t, base, True)  # the next save: finishes the job and removes the leftovers
        left = _leftovers(t)
        after = _units(scenario, t, R)
        if "lost" in units.values():
            lost += 1
            bad.append((k, units))
        elif not left and set(after.values()) == {"new"}:
            clean += 1
        else:
            bad.append((k, left, after))
    print(f"\nkill -9 {spec}: tried {tried} ({r['py_events']} Python steps, {r['cpp_points']} engine fault points)"
          f" / clean {clean} / lost {lost} / recovered {recovered}")
    assert not bad, bad[:3]
    assert r["events"] >= 4 and r["killed"] == list(range(1, r["events"] + 1)), r  # every kill point was hit
    assert seen == {"old", "new"}, seen  # the sweep did catch saves before and after their commit
    if scenario.startswith("adapter") or scenario == "trainer":  # adapters are written by the engine
        assert r["cpp_points"] >= 4, r
    if mode == "rename" or scenario.endswith("_shared") or scenario == "trainer":
        assert recovered > 0  # some kills fell between the renames / in the roll-forward
