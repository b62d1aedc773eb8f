"""An atomic save renames a finished temporary over its target, so a target that is a device, fifo or
socket would be replaced by a regular file (save_safetensors("/dev/null") run as root would destroy
/dev/null). Both writers refuse such a target with a ValueError naming it, leave the node as it was
and leave no temporary: the engine's (io::AtomicFileWriter: _core.io.save_safetensors, C API saves)
and Python's (atomic_io.write_file: qlora_native.io.save_safetensors, tokenizer / trainer / export
files), by one rule (io::check_replaceable). A symlink, a regular file and nothing there still work."""
import os
import socket
import stat

import numpy as np
import pytest

from qlora_native import _core, atomic_io
from qlora_native import io as qio

TENSORS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}


def _savers():
    return {
        "engine": lambda p: _core.io.save_safetensors(p, [("w", "F32", (2, 3), TENSORS["w"].reshape(-1).view(np.uint8))], {}),
        "python": lambda p: qio.save_safetensors(p, TENSORS),
        "atomic_io": lambda p: atomic_io.write_text(p, "x"),
    }


def _nodes(tmp_path):
    """(kind, path, S_IS* test) of the non-regular targets this machine lets a test make."""
    out = []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out.append(("a fifo", fifo, stat.S_ISFIFO))
    sock_path = tmp_path / "sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(sock_path))
    out.append(("a socket", sock_path, stat.S_ISSOCK))
    try:  # a character device like /dev/null (needs CAP_MKNOD: root in most containers)
        dev = tmp_path / "null"
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        out.append(("a character device", dev, stat.S_ISCHR))
    except (PermissionError, OSError):
        pass
    return out, s


@pytest.mark.parametrize("saver", ["engine", "python", "atomic_io"])
def test_nodes_are_not_replaced(tmp_path, saver):
    nodes, sock = _nodes(tmp_path)
    try:
        for kind, path, is_kind in nodes:
            with pytest.raises(ValueError, match=f"'{path}' is {kind}, not a regular file"):
                _savers()[saver](path)
            assert is_kind(os.lstat(path).st_mode), f"{kind} was replaced"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for _, p, _ in nodes)  # no temporaries
    finally:
        sock.close()


@pytest.mark.parametrize("saver", ["engine", "python", "atomic_io"])
def test_files_and_links_still_save(tmp_path, saver):
    _savers()[saver](tmp_path / "new")
    (tmp_path / "old").write_bytes(b"old")
    _savers()[saver](tmp_path / "old")
    assert (tmp_path / "old").read_bytes() != b"old"
    os.symlink(tmp_path / "old", tmp_path / "link")  # the rename replaces the link, as before
    _savers()[saver](tmp_path / "link")
    assert not os.path.islink(tmp_path / "link")
