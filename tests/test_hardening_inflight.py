"""The temporaries of saves in progress in this process (staging directories, temporary files) carry
our own pid, so a cleanup (the next save's, a loader's recover) cannot tell them from the leftovers of
an earlier process that had the same pid (containers reuse pids after a kill -9): the saves register
them, and a cleanup removes an own-pid temporary only when it is not registered.

Before: Python's atomic_io and the C++ writers (io::DirSaver, io::AtomicFileWriter: the adapter writer,
save_safetensors) kept separate registries, so in one process each side's cleanup removed the other's
live temporaries: an engine adapter save into a directory deleted the staging directory of a Python
save_dir in progress there (that save then failed), and atomic_io.cleanup deleted the temporary file of
an engine write in progress. Now the C++ registry (cpp/src/io/atomic_dir.hpp) is the only one;
atomic_io uses it through _core.io.register_inflight / unregister_inflight / is_inflight."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from qlora_native import LoraConfig, _core, atomic_io

CFG_JSON = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]).peft_config_json(None)


def _adapter_items():  # layer 0's q_proj factors, r = 2
    z = {"A": np.ones((2, 8), np.float32), "B": np.zeros((8, 2), np.float32)}
    return [(f"base_model.model.model.layers.0.self_attn.q_proj.lora_{k}.weight", "F32", z[k].shape,
             z[k].reshape(-1).view(np.uint8)) for k in "AB"]


def _own_tag() -> str:
    return f"{atomic_io._HOST}-{os.getpid()}-0badc0de"


def test_engine_save_keeps_a_python_save_in_progress(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "README").write_text("a user's file: the engine's save of out is a journal commit")
    with atomic_io.save_dir(out / "x") as staging:
        (staging / "f.txt").write_text("new")
        _core.io.write_peft_adapter(out, _adapter_items(), CFG_JSON)  # cleans out's leftovers first
        assert staging.is_dir()  # was removed: an own-pid temporary the engine's registry did not hold
    assert (out / "x" / "f.txt").read_text() == "new"
    assert (out / "adapter_model.safetensors").is_file() and (out / "README").is_file()
    assert not [e for e in os.listdir(out) if "qlora-" in e]


def test_python_cleanup_keeps_an_engine_write_in_progress(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    big = np.zeros(1 << 27, np.uint8)  # 128 MiB: the write (and its fsync) outlasts a few cleanups
    errors, seen = [], []

    def write():
        try:
            _core.io.save_safetensors(out / "big.safetensors", [("w", "U8", big.shape, big)], {})
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=write)
    t.start()
    while t.is_alive():  # the engine releases the GIL while it writes
        tmp = [e for e in os.listdir(out) if ".qlora-tmp." in e]
        if tmp:
            seen.extend(tmp)
            atomic_io.cleanup(out)  # was: deleted the live temporary, and the write's rename failed
    t.join()
    assert not errors, errors
    if not seen:
        pytest.skip("the write finished before its temporary was seen")
    assert os.listdir(out) == ["big.safetensors"]
    assert os.path.getsize(out / "big.safetensors") > big.size


@pytest.mark.parametrize("side", ["python", "engine"])
def test_own_pid_leftover_removed_unless_registered(tmp_path, side):
    """What the registry is for: an own-pid temporary that no save of this process holds is an earlier
    process's leftover (removed); a registered one is a save in progress (kept). Both sides' cleanups
    read the one registry."""
    out = tmp_path / "out"
    out.mkdir()
    live = out / f".ad.qlora-tmp.{_own_tag()}"
    dead = out / f".ad.qlora-tmp.{atomic_io._HOST}-{os.getpid()}-0dead000"
    live.mkdir()
    dead.mkdir()
    _core.io.register_inflight(os.path.abspath(live))
    try:
        assert _core.io.is_inflight(os.path.abspath(live)) and not _core.io.is_inflight(os.path.abspath(dead))
        if side == "python":
            atomic_io.cleanup(out)
        else:  # the engine's adapter writer cleans the target's leftovers before it saves
            _core.io.write_peft_adapter(out / "ad", _adapter_items(), CFG_JSON)
        assert live.is_dir() and not dead.exists()
    finally:
        _core.io.unregister_inflight(os.path.abspath(live))
    assert not _core.io.is_inflight(os.path.abspath(live))
    atomic_io.cleanup(out)  # no longer registered: now it is a leftover
    assert not live.exists()


def test_python_save_registers_its_staging_in_the_engine(tmp_path):
    with atomic_io.save_dir(tmp_path / "d") as staging:
        assert _core.io.is_inflight(os.path.abspath(staging))
        with atomic_io.save_dir(staging / "inner") as inner:  # nested: written straight into the staging
            assert inner == staging / "inner"
    assert not _core.io.is_inflight(os.path.abspath(staging)) and (tmp_path / "d" / "inner").is_dir()


@pytest.mark.parametrize("spelling", ["symlink", "dotdot", "double-slash"])
def test_another_spelling_of_the_directory_keeps_a_save_in_progress(tmp_path, spelling):
    """The registry matched paths as written, so a save naming the directory another way (through a
    symlink, with "..", with a leading "//") took a live own-pid temporary there for a leftover and
    deleted it (helper Y's repro, session 18). Keys are now the directory's (device, inode) and the name."""
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    (real / "sub").mkdir()
    other = {"symlink": str(tmp_path / "link"), "dotdot": str(real / "sub" / ".."),
             "double-slash": "/" + str(real)}[spelling]
    with atomic_io.save_dir(real / "x") as staging:  # registered under real/...
        (staging / "f.txt").write_text("new")
        _core.io.write_peft_adapter(other + "/y", _adapter_items(), CFG_JSON)  # cleans other's leftovers
        atomic_io.cleanup(other)
        assert staging.is_dir()
    assert (real / "x" / "f.txt").read_text() == "new" and (real / "y" / "adapter_config.json").is_file()
