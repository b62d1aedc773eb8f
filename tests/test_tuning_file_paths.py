"""What QLORA_TUNE_CACHE may name (cpu/tuning.cpp): the file is read and rewritten only when it is a
regular file of at most 1 MiB (through a symlink: the file it leads to, the link stays) or absent.
Anything else is left as it is and the choice stays in the process: a fifo (an open would block the
first GEMV forever), a device (QLORA_TUNE_CACHE=/dev/null, the usual "discard", became a regular
file by the atomic rename when run as root), a symlink to a directory (replaced by a file), a huge
file (read whole on the first GEMV: seconds, gigabytes, then MemoryError; and replaced). Each case
in a child process (the choice is per process) with a timeout."""
import os
import stat

import pytest

from qlora_native import _core

# The same skips and child-process runner as the tuning tests there (a fresh process per case: the
# choice is per process).
from test_nf4_gemv_avx2_lookup import KEY, _child as _child_env, pytestmark  # noqa: F401


def _child(path):
    return _child_env({"QLORA_TUNE_CACHE": str(path)})


def test_fifo_is_neither_opened_for_reading_nor_replaced(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    got = _child(fifo)
    assert got["source"] == "measured"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="mknod of a device needs root")
def test_device_is_not_replaced(tmp_path):
    null = tmp_path / "null"  # a /dev/null of our own: the real one must not be risked
    os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    got = _child(null)
    assert got["source"] == "measured"
    assert stat.S_ISCHR(os.lstat(null).st_mode)


def test_symlinks(tmp_path):
    d = tmp_path / "dir"
    d.mkdir()
    (tmp_path / "to_dir").symlink_to(d)
    got = _child(tmp_path / "to_dir")
    assert got["source"] == "measured"
    assert (tmp_path / "to_dir").is_symlink() and (tmp_path / "to_dir").is_dir()
    (tmp_path / "loop_a").symlink_to(tmp_path / "loop_b")
    (tmp_path / "loop_b").symlink_to(tmp_path / "loop_a")
    assert _child(tmp_path / "loop_a")["source"] == "measured"
    assert (tmp_path / "loop_a").is_symlink()
    # A link to a tuning file: written through, the link stays.
    real = tmp_path / "real.txt"
    real.write_text("")
    (tmp_path / "link.txt").symlink_to(real)
    first = _child(tmp_path / "link.txt")
    assert first["source"] == "measured" and (tmp_path / "link.txt").is_symlink()
    assert real.read_text() == f"{_core.cpu_signature()}\t{KEY}\t{first['choice']}\n"
    second = _child(tmp_path / "link.txt")
    assert (second["source"], second["choice"]) == ("file", first["choice"])


def test_large_file_is_not_read_nor_replaced(tmp_path):
    big = tmp_path / "big"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    got = _child(big)
    assert got["source"] == "measured"
    assert big.stat().st_size == 64 << 20
    # Up to 1 MiB it is a tuning file (with a junk line): read.
    ok = tmp_path / "ok"
    ok.write_bytes(b"x" * (1 << 19) + b"\n" + f"{_core.cpu_signature()}\t{KEY}\tvpermps\n".encode())
    got = _child(ok)
    assert (got["source"], got["choice"]) == ("file", "vpermps")
