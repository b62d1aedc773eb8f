"""atomic_io and the saves built on it: file and directory modes follow the umask, a directory of
files is saved as a unit without touching other files, killed saves are recovered by loaders and
cleaned by the next save (only when their owner is gone), save_pretrained never drops an adapter
silently, adapters record their base model, load_adapter on a file says so.
(kill -9 at every step of every save: test_save_kill.py)"""
import json
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

import helpers_save_kill as hk
from qlora_native import LoraConfig, Model, adapter_io, atomic_io, io
from qlora_native.trainer import LOG_NAME, Trainer, TrainingArguments


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return hk.make_base(tmp_path_factory.mktemp("base") / "base")


def _model(base, adapter=True, r=2, seed=0):
    m = Model.from_pretrained(base, quantize="nf4", tokenizer=None)
    if adapter:
        m.add_adapter("a", LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights="gaussian"), seed=seed)
    return m


def _args(out, **kw):
    d = dict(output_dir=str(out), learning_rate=1e-2, max_steps=4, save_steps=2, logging_steps=1,
             per_device_train_batch_size=4, disable_tqdm=True, max_seq_len=16, seed=3)
    d.update(kw)
    return TrainingArguments(**d)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _tag(pid) -> str:
    return f"{atomic_io._HOST}-{pid}-0badc0de"


@pytest.fixture
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


# ---------------------------------------------------------------- modes
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002], indirect=True)
def test_modes_follow_umask(tmp_path, base, umask):
    m = _model(base)
    m.save_adapter(tmp_path / "ad")
    m.save_adapter(tmp_path / "ad")                      # re-save (swap)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "notes.txt").write_text("x")
    m.save_adapter(tmp_path / "shared")                  # journal commit into a shared dir
    with pytest.warns(UserWarning, match="save_adapter"):  # the active adapter is not in it
        m.save_pretrained(tmp_path / "full")
    io.save_safetensors(tmp_path / "one.safetensors", {"w": np.zeros(2, np.float32)})  # the C++ writer
    atomic_io.write_text(tmp_path / "one.txt", "x")
    Trainer(m, "a", hk.examples(), None, _args(tmp_path / "run")).train()
    files = dirs = 0
    for dirpath, dn, fn in os.walk(tmp_path):
        for d in dn:
            assert stat.S_IMODE(os.stat(os.path.join(dirpath, d)).st_mode) == 0o777 & ~umask, (d, umask)
            dirs += 1
        for f in fn:
            mode = stat.S_IMODE(os.stat(os.path.join(dirpath, f)).st_mode)
            assert mode == 0o666 & ~umask, (os.path.join(dirpath, f), oct(mode), oct(umask))
            files += 1
    assert files >= 15 and dirs >= 6
    assert {"adapter_config.json", LOG_NAME, "trainer_state.json", "config.json"} <= \
        {f for _, _, fn in os.walk(tmp_path) for f in fn}


def test_resave_keeps_directory_mode(tmp_path, base):
    m = _model(base)
    d = tmp_path / "ad"
    m.save_adapter(d)
    os.chmod(d, 0o750)
    m.save_adapter(d)
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o750


# ---------------------------------------------------------------- issue 13 items
def test_save_pretrained_with_active_adapter_warns(tmp_path, base):
    m = _model(base)
    with pytest.warns(UserWarning, match=r"save_adapter") as rec:
        m.save_pretrained(tmp_path / "m")
    assert rec[0].filename == __file__  # points at the caller's line
    assert "'a'" in str(rec[0].message) and "base model only" in str(rec[0].message)
    m.set_active_adapter(None)  # no adapter in use: the base model is exactly what is saved
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m.save_pretrained(tmp_path / "m2")


def test_adapter_records_base_model_path(tmp_path, base):
    m = _model(base)
    assert m.name_or_path == str(base)
    m.save_adapter(tmp_path / "a1")
    assert json.loads((tmp_path / "a1" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    m.save_adapter(tmp_path / "a2", base_model_name_or_path="org/name")
    assert json.loads((tmp_path / "a2" / "adapter_config.json").read_text())["base_model_name_or_path"] == "org/name"


def test_load_adapter_on_a_file_says_not_a_directory(tmp_path, base):
    f = tmp_path / "adapter_model.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(NotADirectoryError, match=r"adapter_model\.safetensors.*not an adapter directory"):
        adapter_io.load_adapter(f)
    with pytest.raises(NotADirectoryError, match="not an adapter directory"):
        _model(base, adapter=False).load_adapter(f)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        adapter_io.load_adapter(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        _model(base).save_adapter(f)


# ---------------------------------------------------------------- a directory saved as a unit
def test_shared_directory_keeps_other_files_and_drops_stale_index(tmp_path, base):
    d = tmp_path / "m"
    d.mkdir()
    (d / "README.md").write_text("mine")
    (d / "sub").mkdir()
    shard = "model-00001-of-00002.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    (d / shard).write_bytes(b"old shard")
    inode = os.stat(d).st_ino
    m = _model(base, adapter=False)
    m.save_pretrained(d)
    assert sorted(os.listdir(d)) == ["README.md", "config.json", "model.safetensors", "sub"]
    assert os.stat(d).st_ino == inode  # committed file by file: the user's directory stays
    r = Model.from_pretrained(d, tokenizer=None)
    np.testing.assert_array_equal(r._core.get_tensor("model.norm.weight"), m._core.get_tensor("model.norm.weight"))


def test_dedicated_directory_is_swapped_and_symlink_kept(tmp_path, base):
    m = _model(base)
    d = tmp_path / "ad"
    m.save_adapter(d)
    ino = os.stat(d).st_ino
    m.save_adapter(d)
    assert os.stat(d).st_ino != ino  # swapped in as a whole
    assert sorted(os.listdir(d)) == sorted([adapter_io.CONFIG_NAME, adapter_io.WEIGHTS_NAME])
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    m.save_adapter(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and sorted(os.listdir(real)) == sorted(os.listdir(d))
    assert sorted(os.listdir(tmp_path)) == ["ad", "link", "real"]


def test_saving_into_the_working_directory_keeps_it(tmp_path, base, monkeypatch):
    d = tmp_path / "ad"
    d.mkdir()
    monkeypatch.chdir(d)
    m = _model(base)
    m.save_adapter(".")
    m.save_adapter(".")  # holds only adapter files now, but it is our cwd: committed in place
    assert os.getcwd() == str(d) and os.path.samefile(".", d)
    assert sorted(os.listdir(".")) == sorted([adapter_io.CONFIG_NAME, adapter_io.WEIGHTS_NAME])
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_failed_save_leaves_old_adapter(tmp_path, base, monkeypatch):
    m = _model(base)
    d = tmp_path / "ad"
    m.save_adapter(d)
    before = {n: (d / n).read_bytes() for n in os.listdir(d)}

    new = _model(base, r=4, seed=1)
    # The engine's writer fails mid-save: a file-size limit (write() -> EFBIG, SIGXFSZ ignored) that
    # the weights file exceeds (not the ones of other tests: the limit is lifted right after).
    old_sig = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (256, limit[1]))
    try:
        with pytest.raises(OSError, match="File too large|adapter_model"):
            new.save_adapter(d)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, old_sig)
    assert {n: (d / n).read_bytes() for n in os.listdir(d)} == before
    assert sorted(os.listdir(tmp_path)) == ["ad"]


def test_concurrent_saves_to_one_adapter_dir(tmp_path, base):
    d = tmp_path / "ad"
    models = [_model(base, r=2 + 2 * i, seed=i) for i in range(2)]
    errors = []

    def work(m):
        try:
            for _ in range(8):
                m.save_adapter(d)
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    ts = [threading.Thread(target=work, args=(m,)) for m in models]
    for t in ts:
        t.start()
    for t in ts:
        t.join(60)
    assert not errors
    cfg, _ = adapter_io.load_adapter(d)  # one complete save, whichever came last
    assert cfg.r in (2, 4)
    assert sorted(os.listdir(tmp_path)) == ["ad"]


# ---------------------------------------------------------------- leftovers of killed saves
def test_next_save_removes_dead_owners_leftovers_only(tmp_path, base):
    dead, live = _dead_pid(), os.getppid()
    d = tmp_path / "ad"
    _model(base).save_adapter(d)
    old_age = 2 * atomic_io.UNOWNED_AGE
    made = {
        # in the parent of the target
        tmp_path / f".ad.qlora-tmp.{_tag(dead)}": "dir",
        tmp_path / f".ad.qlora-old.{_tag(dead)}": "dir",          # target exists: a finished swap's old copy
        tmp_path / f".ad.qlora-tmp.{_tag(live)}": "dir",          # a live saver's: kept
        tmp_path / f".other.qlora-tmp.{_tag(dead)}": "dir",       # another target's: not this save's business
        # in the target
        d / f"adapter_model.safetensors.tmp.{dead}.0.12345": "file",   # the C++ writer's
        d / f"adapter_model.safetensors.tmp.{live}.0.12345": "file",
        d / f".adapter_config.json.qlora-tmp.{_tag(dead)}": "file",
        d / ".adapter_config.json.abcd1234.tmp": "old file",      # earlier versions' mkstemp names
        d / ".adapter_config.json.abcd5678.tmp": "file",          # ... too young to tell
    }
    for p, kind in made.items():
        if kind == "dir":
            p.mkdir()
            (p / "adapter_model.safetensors").write_bytes(b"partial")
        else:
            p.write_bytes(b"partial")
        if kind.startswith("old"):
            os.utime(p, (p.stat().st_atime - old_age, p.stat().st_mtime - old_age))
    kept = {tmp_path / f".ad.qlora-tmp.{_tag(live)}", tmp_path / f".other.qlora-tmp.{_tag(dead)}"}
    # the re-save swaps the directory: the leftovers inside go with the old one
    _model(base).save_adapter(d)
    assert {p for p in made if os.path.lexists(p)} == kept
    # a save into a shared directory cleans inside it
    (d / "README.md").write_text("x")
    for p in made:
        if p.parent == d:
            p.write_bytes(b"partial")
    os.utime(d / ".adapter_config.json.abcd1234.tmp", (0, 0))
    _model(base).save_adapter(d)
    assert sorted(os.listdir(d)) == sorted(["README.md", "adapter_config.json", "adapter_model.safetensors",
                                            f"adapter_model.safetensors.tmp.{live}.0.12345",
                                            ".adapter_config.json.abcd5678.tmp"])


def test_loader_restores_a_directory_displaced_by_a_killed_swap(tmp_path, base):
    m = _model(base)
    d = tmp_path / "ad"
    m.save_adapter(d)
    want = m.get_adapter_state_dict()
    os.rename(d, tmp_path / f".ad.qlora-old.{_tag(_dead_pid())}")   # killed between the two renames
    (tmp_path / f".ad.qlora-tmp.{_tag(_dead_pid())}").mkdir()
    _, got = adapter_io.load_adapter(d)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k])
    m2 = Model.from_pretrained(base, tokenizer=None)
    m2.save_pretrained(tmp_path / "full")
    os.rename(tmp_path / "full", tmp_path / f".full.qlora-old.{_tag(_dead_pid())}")
    Model.from_pretrained(tmp_path / "full", tokenizer=None)
    assert sorted(os.listdir(tmp_path)) == ["ad", "full"]  # restored; the dead saver's staging removed


def test_resume_finds_checkpoint_left_displaced(tmp_path, base):
    """A re-save of checkpoint-N killed between its renames (this version's names or the earlier
    `.checkpoint-N.old.XXXXXXXX/x`) must not make resume miss it."""
    a = _args(tmp_path / "out")
    Trainer(_model(base, adapter=False), LoraConfig(r=2, target_modules=["q_proj"]), hk.examples(), None, a).train()
    out = Path(a.output_dir)
    os.rename(out / "checkpoint-4", out / f".checkpoint-4.qlora-old.{_tag(_dead_pid())}")
    legacy = out / ".checkpoint-2.old.k3j4h5g6"
    legacy.mkdir()
    os.rename(out / "checkpoint-2", legacy / "x")
    m = _model(base, adapter=False)
    summary = Trainer(m, LoraConfig(r=2, target_modules=["q_proj"]), hk.examples(), None, a).train(
        resume_from_checkpoint=True)
    assert summary["global_step"] == 4 and summary["input_tokens"] == 0  # resumed at step 4: nothing left
    assert sorted(p for p in os.listdir(out) if "checkpoint" in p) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("umask", [0o027], indirect=True)
def test_capi_adapter_save_modes(tmp_path, base, umask):
    import ctypes

    pytest.importorskip("torch")  # test_capi_train's helpers need it
    from helpers_capi import QUANT_NF4, CModel, load_model_lib
    from test_capi_train import Q, V_, _check, _setup

    lib = load_model_lib()
    _setup(lib)
    m = CModel(lib, base, QUANT_NF4)
    try:
        p = lib.qlora_lora_default_params()
        p.r, p.alpha, p.target_mask = 2, 4.0, Q | V_
        _check(lib, lib.qlora_adapter_add(m.h, b"ft", ctypes.byref(p)))
        _check(lib, lib.qlora_adapter_save(m.h, str(tmp_path / "ad").encode()))
    finally:
        m.close()
    assert stat.S_IMODE(os.stat(tmp_path / "ad").st_mode) == 0o750
    for f in os.listdir(tmp_path / "ad"):
        assert stat.S_IMODE(os.stat(tmp_path / "ad" / f).st_mode) == 0o640, f
