"""Atomic writes of files and of directories of files: the one place where qlora_native writes to a
temporary name and renames it into place.

    atomic_io.write_text("out/trainer_log.jsonl", text)     # one file: temp + fsync + rename
    with atomic_io.save_dir("out/adapter") as d:             # a directory of files, saved as a unit
        save_safetensors(d / "adapter_model.safetensors", ...); write_text(d / "adapter_config.json", ...)
    atomic_io.recover("out/adapter")                         # loaders: finish / roll back a killed save

Modes: files are created with 0666 and directories with 0777, so the umask (and default ACLs)
decide, exactly as for open() and mkdir(); a directory that is replaced keeps its mode.

How a directory is saved (save_dir). The new files are written into a staging directory
`.NAME.qlora-tmp.TAG` beside the target (TAG = host-pid-random), fsync'ed, then:

* The target is absent: one rename puts the staging directory in place.
* The target holds nothing but files this save writes (plus `obsolete` names and our own
  leftovers), i.e. it is a previous save of the same thing: the two directories are swapped
  with renameat2(RENAME_EXCHANGE), one atomic step, and the old one (now under the staging name)
  is removed. Where the kernel or filesystem lacks it: target -> `.NAME.qlora-old.TAG`, staging
  -> target, remove the old one. A kill between those two renames leaves no target but a
  complete old copy; recover() (run by every loader and the next save) renames it back.
* The target holds other entries too (the Trainer's output_dir with its checkpoints and log,
  a user's directory with a README), or is our working directory, a symlink or a mount point:
  those must survive, so the set of files is committed
  through a journal instead. The staging directory is renamed into the target as
  `.NAME.qlora-commit.TAG` (the commit point: from then on the new set is complete and durable),
  then each file is renamed over its old version, `obsolete` files are removed and the commit
  directory is deleted. A kill before the commit point leaves the old files untouched; a kill
  after it leaves a commit directory that recover() rolls forward, so every qlora_native
  loader sees either the complete old or the complete new set. (A foreign reader that does not
  run recover() can see a mix in the microseconds of the roll-forward, or after a kill in it.)

Leftovers of killed saves (staging / old / commit directories, temporaries of single files,
the C++ writer's, which uses the same `.NAME.qlora-tmp.TAG` names, and names of earlier versions
such as `*.safetensors.tmp.PID.N.R`) are handled by the
next save into that directory: commit directories are rolled forward, displaced old copies
restored or removed, temporaries removed once their owner is gone (its pid is dead on this
host) or, when that cannot be told, after a safe age, so concurrent savers keep their files.
Concurrent saves of the same target are not serialized: the last one wins.
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import secrets
import shutil
import socket
import stat
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from . import _core

__all__ = ["write_file", "write_bytes", "write_text", "save_dir", "recover", "cleanup"]



def _host_tag(name: bytes) -> str:
    """FNV-1a (32 bit) of the host name, as cpp/src/io/atomic_dir.cpp computes it."""
    h = 0x811C9DC5
    for c in name:
        h = ((h ^ c) * 0x01000193) & 0xFFFFFFFF
    return f"{h:08x}"


_HOST = _host_tag(socket.gethostname().encode("utf-8", "replace"))
_TAG = r"(?P<host>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}"
_OURS = re.compile(rf"\.(?P<name>.+)\.qlora-(?P<kind>tmp|old|commit)\.{_TAG}")
_CPP_TMP = re.compile(r".+\.safetensors\.tmp\.(?P<pid>\d+)\.\d+\.\d+")  # io::AtomicFileWriter of earlier builds
# Temporaries of earlier versions (mkstemp / mkdtemp names, no owner): removed after UNOWNED_AGE.
_LEGACY_TMP = re.compile(r"\.checkpoint-\d+\.[a-z0-9_]{8}\.tmp|\.(?:adapter_config\.json|trainer_log\.jsonl)\."
                         r"[a-z0-9_]{8}\.tmp|\.config\.json\.[a-z0-9_]{8}|adapter_config\.json\.tmp")
_LEGACY_OLD = re.compile(r"\.(?P<name>checkpoint-\d+)\.old\.[a-z0-9_]{8}")  # holds the old dir as "x"
_REMOVE_LIST = ".qlora-remove.json"  # in a commit directory: names the roll-forward deletes
OWNED_AGE = 24 * 3600.0    # a temporary whose owner looks alive is still stale after this (pid reuse)
UNOWNED_AGE = 600.0        # a temporary without an owner we can check (a checkpoint takes seconds)
_WAIT_SWAP = 2.0           # a loader waits this long for a live saver to finish its two-rename swap

# Temporaries (files, staging dirs) of saves in progress in this process are registered in the engine's
# registry (cpp/src/io/atomic_dir.hpp, _core.io.*_inflight), which its writers (the adapter writer,
# save_safetensors) use too: either side's cleanup keeps the other's live temporaries.


# ---------------------------------------------------------------- small helpers
def _tag() -> str:
    return f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


def _fsync_dir(d) -> None:
    """Persist renames in directory d (best effort: some filesystems refuse fsync on directories)."""
    try:
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(d: Path) -> None:
    """fsync every regular file under d (third-party writers may not have), then the directories."""
    for root, dirs, files in os.walk(d):
        for f in files:
            p = os.path.join(root, f)
            if os.path.isfile(p) and not os.path.islink(p):
                fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        _fsync_dir(root)


def _remove(p: Path) -> None:
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink()
    except FileNotFoundError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _age(p: Path) -> float:
    try:
        return time.time() - os.lstat(p).st_mtime
    except OSError:
        return 0.0


def _stale(p: Path, host: str | None, pid: int | None) -> bool:
    """True when the save that made p is over: its pid is dead here, or p is too old to matter."""
    if pid is None:
        return _age(p) > UNOWNED_AGE
    if _age(p) > OWNED_AGE:
        return True
    if host is not None and host != _HOST:
        return False  # another host's: its pids mean nothing here
    if pid == os.getpid():  # ours (or an earlier process's with the same pid, e.g. in a container)
        return host is not None and not _core.io.is_inflight(os.path.abspath(p))
    return not _alive(pid)


@contextmanager
def _registered(p):
    key = os.path.abspath(p)
    _core.io.register_inflight(key)
    try:
        yield
    finally:
        _core.io.unregister_inflight(key)


# renameat2(RENAME_EXCHANGE): swaps two paths atomically (Linux >= 3.15, glibc >= 2.28).
def _load_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2 = _load_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap a and b; False when the system cannot (the caller falls back)."""
    fn = _renameat2
    if fn is None:
        return False
    sys.audit("qlora_native.atomic_io.exchange", os.fspath(a), os.fspath(b))  # seen by the kill tests
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), os.fspath(a), None, os.fspath(b))


# ---------------------------------------------------------------- single files
def write_file(path, writer) -> None:
    """Write `path` atomically: writer(tmp) writes the complete file at a temporary name beside it
    (`.NAME.qlora-tmp.TAG`: a later save removes it if this process dies), which is then fsync'ed
    and renamed over `path`; nothing is left behind on an error."""
    path = Path(path)
    # A device, fifo or socket there would be replaced by the rename (the engine's rule).
    _core.io.check_replaceable(path)
    tmp = path.parent / f".{path.name}.qlora-tmp.{_tag()}"
    with _registered(tmp):
        try:
            writer(tmp)
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            _core.io.check_replaceable(path)  # one put there while writing
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    _fsync_dir(path.parent)


def write_bytes(path, data: bytes) -> None:
    """write_file of `data`, created with mode 0666 & ~umask (what a plain open() gives)."""
    def write(tmp):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    write_file(path, write)


def write_text(path, text: str) -> None:
    """write_bytes of UTF-8 text."""
    write_bytes(path, text.encode("utf-8"))


# ---------------------------------------------------------------- directories
def _is_staging(p: Path) -> bool:
    return _core.io.is_inflight(os.path.abspath(p))


def _matches(name: str, patterns) -> bool:
    return any(p.fullmatch(name) if isinstance(p, re.Pattern) else p == name for p in patterns)


def _leftover(name: str) -> bool:
    return bool(_OURS.fullmatch(name) or _CPP_TMP.fullmatch(name) or _LEGACY_TMP.fullmatch(name)
                or _LEGACY_OLD.fullmatch(name))


@contextmanager
def save_dir(final, *, obsolete=()):
    """Yield a staging directory (a Path) to write the files of directory `final` into; on a normal
    exit they replace `final`'s as a unit (see the module docstring), on an exception they are
    discarded and `final` is untouched. obsolete: names (str or compiled regex) of files an
    earlier save may have left in `final` that must not survive this one (e.g. a stale shard
    index). Saving into a directory that is itself being staged writes straight into it (the
    enclosing save makes it atomic). Raises NotADirectoryError when `final` is a file."""
    final = Path(os.path.abspath(final))
    if _is_staging(final) or _is_staging(final.parent):
        final.mkdir(exist_ok=True)
        yield final
        return
    if final.exists() and not final.is_dir():
        raise NotADirectoryError(f"{final}: exists and is not a directory")
    parent = final.parent
    os.makedirs(parent, exist_ok=True)  # mode 0777 & ~umask
    cleanup(parent, name=final.name)
    if final.is_dir():
        cleanup(final)
    tag = _tag()
    # Beside the target, so that it can be swapped in; inside it when it is a symlink or mount
    # point (its own filesystem) or when the parent is not writable (then only a journal commit).
    inside = final.is_symlink() or os.path.ismount(final)
    staging = (final if inside else parent) / f".{final.name}.qlora-tmp.{tag}"
    try:
        os.mkdir(staging, 0o777)
    except PermissionError:
        if inside or not final.is_dir():
            raise
        staging = final / f".{final.name}.qlora-tmp.{tag}"
        os.mkdir(staging, 0o777)
    try:
        with _registered(staging):  # until committed: concurrent cleanups in this process keep it
            yield staging
            _commit(staging, final, tag, obsolete)
    except BaseException:
        _remove(staging)
        raise


def _commit(staging: Path, final: Path, tag: str, obsolete) -> None:
    _fsync_tree(staging)
    parent = final.parent
    beside = staging.parent == parent
    if beside and not os.path.lexists(final):
        try:
            os.rename(staging, final)
            _fsync_dir(parent)
            return
        except OSError as exc:  # created meanwhile by someone else: replace it like any other
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    new = set(os.listdir(staging))
    have = os.listdir(final)
    if beside and not _holds_cwd(final) and all(e in new or _matches(e, obsolete) or _leftover(e) for e in have):
        _swap(staging, final, tag)
    else:
        _journal(staging, final, tag, [e for e in have if _matches(e, obsolete) and e not in new])


def _holds_cwd(d: Path) -> bool:
    """Swapping away our own working directory (save_adapter(".")) would strand relative paths."""
    try:
        cwd, real = os.getcwd(), os.path.realpath(d)
    except OSError:
        return False
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def _swap(staging: Path, final: Path, tag: str) -> None:
    parent = final.parent
    try:  # the directory keeps its mode (like open() of an existing file)
        os.chmod(staging, stat.S_IMODE(os.stat(final).st_mode))
    except OSError:
        pass
    if _exchange(staging, final):
        _fsync_dir(parent)
        _remove(staging)  # now the old save
        return
    old = parent / f".{final.name}.qlora-old.{tag}"
    with _registered(old):
        os.rename(final, old)
        try:
            os.rename(staging, final)
        except BaseException:
            os.rename(old, final)
            raise
    _fsync_dir(parent)
    _remove(old)


def _journal(staging: Path, final: Path, tag: str, remove: list) -> None:
    for e in os.listdir(staging):
        if os.path.isdir(staging / e) and not os.path.islink(staging / e):
            raise ValueError(f"{final}: holds other files, so the save is committed file by file, which cannot "
                             f"replace the directory {e!r}; save into an empty or dedicated directory")
    if remove:
        write_text(staging / _REMOVE_LIST, json.dumps(sorted(remove)))
    commit = final / f".{final.name}.qlora-commit.{tag}"
    os.rename(staging, commit)  # the commit point
    _fsync_dir(final)
    _fsync_dir(staging.parent)
    _roll_forward(commit, final)


def _roll_forward(commit: Path, d: Path) -> None:
    """Move a committed set of files into d (idempotent: a killed roll-forward is simply rerun)."""
    remove = []
    try:
        remove = json.loads((commit / _REMOVE_LIST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        pass
    except ValueError:
        remove = []
    for e in sorted(os.listdir(commit)):
        if e == _REMOVE_LIST:
            continue
        try:
            os.replace(commit / e, d / e)
        except FileNotFoundError:  # moved meanwhile by a concurrent roll-forward
            pass
    for r in remove:
        if isinstance(r, str) and "/" not in r and r not in (".", ".."):
            try:
                os.unlink(d / r)
            except FileNotFoundError:
                pass
    _fsync_dir(d)
    _remove(commit)


def _restore(old: Path, target: Path, pid_info, inner: str | None = None) -> None:
    """A displaced old copy whose target is missing: the swap was killed between its renames.
    Put it back once the saver is gone. A live one finishes within microseconds: wait for it, but
    not forever (its pid may be a new process's: containers reuse pids after a kill)."""
    deadline = time.monotonic() + _WAIT_SWAP
    while not _stale(old, *pid_info) and time.monotonic() < deadline:
        if os.path.lexists(target):
            return
        time.sleep(0.01)
    if os.path.lexists(target):
        return
    src = old / inner if inner else old
    if not os.path.lexists(src):
        return
    os.rename(src, target)
    _fsync_dir(target.parent)
    if inner:
        _remove(old)


def cleanup(d, name: str | None = None) -> None:
    """Finish or undo what killed saves left in directory d: roll commit directories forward,
    restore or delete displaced old copies, delete temporaries whose owner is gone. name: only
    the leftovers of the entry `name` of d. Best effort: OSErrors are ignored."""
    d = Path(d)
    try:
        entries = os.listdir(d)
    except OSError:
        return
    for e in entries:
        p = d / e
        try:
            m = _OURS.fullmatch(e)
            if m is not None:
                if name is not None and m["name"] != name:
                    continue
                owner = (m["host"], int(m["pid"]))
                if m["kind"] == "commit":
                    _roll_forward(p, d)  # complete and durable: anyone may finish it
                elif m["kind"] == "old" and not os.path.lexists(d / m["name"]):
                    _restore(p, d / m["name"], owner)
                elif _stale(p, *owner):
                    _remove(p)
                continue
            if name is not None:
                continue
            m = _LEGACY_OLD.fullmatch(e)
            if m is not None:
                if not os.path.lexists(d / m["name"]):
                    _restore(p, d / m["name"], (None, None), inner="x")
                elif _stale(p, None, None):
                    _remove(p)
                continue
            m = _CPP_TMP.fullmatch(e)
            if m is not None:
                if _stale(p, None, int(m["pid"])):
                    _remove(p)
            elif _LEGACY_TMP.fullmatch(e) and _stale(p, None, None):
                _remove(p)
        except OSError:
            continue


def recover(path) -> None:
    """Before reading directory `path` (an adapter, a checkpoint, a saved model, an output_dir):
    finish or roll back a save of it that was killed, so that it holds the complete old or the
    complete new save. Only looks at our own names; temporaries of live saves are left alone."""
    path = Path(os.path.abspath(path))
    cleanup(path.parent, name=path.name)
    if path.is_dir():
        cleanup(path)
