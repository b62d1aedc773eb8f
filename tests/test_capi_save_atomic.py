"""qlora_adapter_save (C API, via ctypes on _core) saves the adapter directory as a unit, with the
on-disk protocol and names of python/qlora_native/atomic_io.py: a re-save leaves the complete new
adapter, modes follow the umask, a kill -9 at any step (test-only fault points, QLORA_TEST_FAULT)
leaves the complete old or the complete new adapter once Python's load_adapter has recovered the
directory, the C save finishes what a killed save left, and concurrent savers do not collide."""
import ctypes
import os
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qlora_native import _core, atomic_io  # noqa: E402
from qlora_native.adapter_io import load_adapter  # noqa: E402

from helpers_model import make_checkpoint  # noqa: E402

from helpers_capi import ERR_IO, LORA_DOWN, LORA_Q, LORA_V, OK, LoraParams, load_lib  # noqa: E402
CFG, W = "adapter_config.json", "adapter_model.safetensors"
OLD_R, NEW_R, OLD_SEED, NEW_SEED = 4, 8, 11, 22
Q, V_, DOWN = LORA_Q, LORA_V, LORA_DOWN

# The child process: loads the model through the C API, adds the "new" adapter and saves it into
# `out` (argv[4]) with QLORA_TEST_FAULT set by the parent (the process kills itself at that step).
CHILD = r"""
import ctypes, sys
tests, so, ckpt, out, r, seed, mask = sys.argv[1:]
sys.path.insert(0, tests)
from helpers_capi import LoraParams, load_lib
lib = load_lib(so)
lib.qlora_adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(LoraParams)]
lib.qlora_adapter_save.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
p = lib.qlora_model_default_params()
p.quantize = 0
h = lib.qlora_model_load(ckpt.encode(), ctypes.byref(p))
assert h, lib.qlora_last_error()
lp = lib.qlora_lora_default_params()
lp.r, lp.alpha, lp.target_mask, lp.seed = int(r), 16.0, int(mask), int(seed)
assert lib.qlora_adapter_add(h, b"x", ctypes.byref(lp)) == 0, lib.qlora_last_error()
rc = lib.qlora_adapter_save(h, out.encode())
assert rc == 0, (rc, lib.qlora_last_error())
"""


@pytest.fixture(scope="module")
def lib():
    lib = load_lib()
    lib.qlora_adapter_add.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(LoraParams)]
    lib.qlora_adapter_save.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    return lib


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path, _, _ = make_checkpoint(tmp_path_factory.mktemp("ckpt"), np.random.default_rng(0), hidden=64, inter=128,
                                 heads=4, kv_heads=2, vocab=100)
    return path


class Saver:
    """A C model with the "old" (r=4) and "new" (r=8, other projections) adapters."""

    def __init__(self, lib, ckpt):
        self.lib = lib
        p = lib.qlora_model_default_params()
        p.quantize = 0
        self.h = lib.qlora_model_load(os.fspath(ckpt).encode(), ctypes.byref(p))
        assert self.h, lib.qlora_last_error()

    def add(self, which):
        lp = self.lib.qlora_lora_default_params()
        lp.r, lp.alpha, lp.target_mask, lp.seed = ((OLD_R, 8.0, Q | V_, OLD_SEED) if which == "old"
                                                   else (NEW_R, 16.0, Q | DOWN, NEW_SEED))
        assert self.lib.qlora_adapter_add(self.h, which.encode(), ctypes.byref(lp)) == OK, self.lib.qlora_last_error()

    def save(self, d):
        return self.lib.qlora_adapter_save(self.h, os.fspath(d).encode())

    def close(self):
        self.lib.qlora_model_free(self.h)


@pytest.fixture(scope="module")
def refs(lib, ckpt, tmp_path_factory):
    """The complete old and new saves (for comparison) and a saver whose active adapter is `new`."""
    base = tmp_path_factory.mktemp("refs")
    s = Saver(lib, ckpt)
    s.add("old")
    assert s.save(base / "old") == OK
    s.add("new")
    assert s.save(base / "new") == OK
    out = {k: load_adapter(base / k) for k in ("old", "new")}
    yield s, base, out
    s.close()


def _which(d, refs):
    """'old' or 'new' when directory d holds that complete save (after Python's recover), else fail."""
    cfg, tensors = load_adapter(d)  # runs atomic_io.recover first
    for k, (rcfg, rt) in refs[2].items():
        if cfg.r == rcfg.r and sorted(tensors) == sorted(rt) and all(np.array_equal(tensors[n], rt[n]) for n in rt):
            return k
    raise AssertionError(f"{d}: neither the old nor the new save (r={cfg.r}, {len(tensors)} tensors)")


def _ours(d):
    return sorted(e for e in os.listdir(d) if ".qlora-" in e or ".tmp" in e)


def _old_save(lib, ckpt, d):
    s = Saver(lib, ckpt)
    try:
        s.add("old")
        assert s.save(d) == OK, lib.qlora_last_error()
    finally:
        s.close()


def test_resave_replaces_as_unit_and_keeps_mode(lib, ckpt, refs, tmp_path):
    s = refs[0]
    d = tmp_path / "ad"
    _old_save(lib, ckpt, d)
    assert _which(d, refs) == "old"
    os.chmod(d, 0o750)
    assert s.save(d) == OK, lib.qlora_last_error()
    assert _which(d, refs) == "new"
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750   # a replaced directory keeps its mode
    assert sorted(os.listdir(d)) == sorted([W, CFG])
    assert _ours(tmp_path) == []                           # no staging / old copies left beside it


def test_shared_directory_keeps_other_files(lib, refs, tmp_path):
    s = refs[0]
    d = tmp_path / "shared"
    d.mkdir()
    (d / "README.md").write_text("mine")
    (d / CFG).write_text("{}")                          # a stale config of something else
    assert s.save(d) == OK, lib.qlora_last_error()
    assert _which(d, refs) == "new"
    assert (d / "README.md").read_text() == "mine"
    assert sorted(os.listdir(d)) == sorted(["README.md", W, CFG])
    assert _ours(tmp_path) == []


@pytest.fixture
def umask027():
    old = os.umask(0o027)
    yield
    os.umask(old)


def test_modes_follow_umask(lib, ckpt, refs, tmp_path, umask027):
    s = refs[0]
    s.save(tmp_path / "a" / "b")                        # fresh, parents created
    s.save(tmp_path / "a" / "b")                        # re-save (swap)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "x.txt").write_text("x")
    os.chmod(tmp_path / "shared" / "x.txt", 0o640)
    s.save(tmp_path / "shared")                         # journal commit
    n = 0
    for dirpath, dn, fn in os.walk(tmp_path):
        for e in dn:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, e)).st_mode) == 0o750, e
        for e in fn:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, e)).st_mode) == 0o640, os.path.join(dirpath, e)
            n += 1
    assert n == 5


def test_target_is_a_file(lib, refs, tmp_path):
    (tmp_path / "f").write_text("x")
    assert refs[0].save(tmp_path / "f") == ERR_IO
    assert b"not a directory" in lib.qlora_last_error().lower()
    assert (tmp_path / "f").read_text() == "x" and _ours(tmp_path) == []


def _dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_finishes_what_a_killed_save_left(lib, refs, tmp_path):
    """Leftovers in atomic_io's names (any side's): a commit directory is rolled forward, dead
    owners' temporaries removed, live ones kept; the adapter is then saved over it."""
    s = refs[0]
    d = tmp_path / "ad"
    d.mkdir()
    dead, live = _dead_pid(), os.getppid()  # getppid: alive, not ours
    host = atomic_io._HOST
    commit = d / f".ad.qlora-commit.{host}-{dead}-0badc0de"
    commit.mkdir()
    (commit / "extra.txt").write_text("committed")
    for name in (f".{W}.qlora-tmp.{host}-{dead}-00000001", f"{W}.tmp.{dead}.0.1"):
        (d / name).write_text("dead")
    keep = [d / f".{W}.qlora-tmp.{host}-{live}-00000002", d / f"{W}.tmp.{live}.0.2"]
    for p in keep:
        p.write_text("live")
    (tmp_path / f".ad.qlora-tmp.{host}-{dead}-00000003").mkdir()
    assert s.save(d) == OK, lib.qlora_last_error()
    assert (d / "extra.txt").read_text() == "committed"          # rolled forward, then kept (not ours)
    assert sorted(os.listdir(d)) == sorted([W, CFG, "extra.txt"] + [p.name for p in keep])
    assert _ours(tmp_path) == []
    assert _which(d, refs) == "new"


def _killed_save(ckpt, d, fault, no_exchange=False):
    env = dict(os.environ, QLORA_TEST_FAULT=fault)
    if no_exchange:
        env["QLORA_TEST_NO_EXCHANGE"] = "1"
    p = subprocess.run([sys.executable, "-c", CHILD, os.path.dirname(os.path.abspath(__file__)), _core.__file__,
                        os.fspath(ckpt), os.fspath(d), str(NEW_R), str(NEW_SEED), str(Q | DOWN)],
                       env=env, capture_output=True, timeout=120)
    assert p.returncode == -9, (fault, p.returncode, p.stderr.decode()[-2000:])


# (target before, fault step, no renameat2) -> what the directory holds after recover
KILLS = [
    ("absent", "write-config", False, None), ("absent", "commit", False, None),
    ("absent", "rename-fresh", False, None),
    ("ours", "write-config", False, "old"), ("ours", "commit", False, "old"), ("ours", "exchange", False, "old"),
    ("ours", "remove-old", False, "new"),
    ("ours", "exchange", True, "old"), ("ours", "rename-new", True, "old"), ("ours", "remove-old", True, "new"),
    ("shared", "commit", False, "old"), ("shared", "journal-commit", False, "old"),
    ("shared", "roll-forward-mid", False, "new"),
]


@pytest.mark.parametrize("before,fault,no_exchange,expect", KILLS, ids=[f"{k[0]}-{k[1]}{'-noexch' * k[2]}" for k in KILLS])
def test_kill9_leaves_old_or_new(lib, ckpt, refs, tmp_path, before, fault, no_exchange, expect):
    d = tmp_path / "ad"
    if before != "absent":
        _old_save(lib, ckpt, d)
    if before == "shared":
        (d / "notes.txt").write_text("mine")
    _killed_save(ckpt, d, fault, no_exchange)
    if fault == "rename-new":  # the window: no target under the final name, the old one displaced
        assert not d.exists() and any(".ad.qlora-old." in e for e in os.listdir(tmp_path))
    if fault == "roll-forward-mid":  # a mix on disk until recovered: the journal finishes it
        assert any(".ad.qlora-commit." in e for e in os.listdir(d))
    if expect is None:
        atomic_io.recover(d)
        assert not d.exists()
    else:
        assert _which(d, refs) == expect, fault
    # Python's recover removed the killed C program's staging / old copies (same host tag, dead pid).
    assert _ours(tmp_path) == [] and (not d.exists() or _ours(d) == [])
    if before == "shared":
        assert (d / "notes.txt").read_text() == "mine"
    # and the next C save into it works and leaves the new adapter
    assert refs[0].save(d) == OK
    assert _which(d, refs) == "new"


def test_concurrent_savers_do_not_collide(lib, ckpt, refs, tmp_path):
    d = tmp_path / "ad"
    savers = [Saver(lib, ckpt) for _ in range(2)]
    for s in savers:
        s.add("new")
    rcs, errs, N = [], [], 25

    def run(s):
        for _ in range(N):
            rc = s.save(d)
            rcs.append(rc)
            if rc != OK:
                errs.append(lib.qlora_last_error())

    try:
        ts = [threading.Thread(target=run, args=(s,)) for s in savers]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
    finally:
        for s in savers:
            s.close()
    assert rcs == [OK] * (2 * N), errs[:3]
    assert _which(d, refs) == "new" and sorted(os.listdir(d)) == sorted([W, CFG]) and _ours(tmp_path) == []


def test_save_into_working_directory(lib, ckpt, refs, tmp_path, monkeypatch):
    """dir is our working directory: committed file by file (a swap would strand relative paths)."""
    d = tmp_path / "ad"
    _old_save(lib, ckpt, d)
    ino = os.stat(d).st_ino
    monkeypatch.chdir(d)
    assert refs[0].save(".") == OK, lib.qlora_last_error()
    assert os.stat(".").st_ino == ino == os.stat(d).st_ino and os.path.isfile(CFG)
    assert _which(d, refs) == "new" and _ours(tmp_path) == [] and _ours(d) == []
