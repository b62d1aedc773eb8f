"""The engine's HF loader (model/hf_loader.cpp) on directory names the file system refuses: a name too
long, a symlink loop. OSError with the errno (as open() gives), not std::filesystem's exception (a bare
RuntimeError 'filesystem error: status: ...' from _core, found by a fuzz of the path parameters)."""
import errno
import os

import pytest

from qlora_native import _core


def _load(p):
    return _core.config.load_hf_model(p)


def test_name_too_long_is_oserror(tmp_path):
    for p in (tmp_path / ("n" * 300), tmp_path.joinpath(*(["d" * 250] * 20))):
        with pytest.raises(OSError) as e:
            _load(p)
        assert e.value.errno == errno.ENAMETOOLONG


def test_symlink_loop_is_oserror(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.symlink_to(b)
    b.symlink_to(a)
    with pytest.raises(OSError) as e:
        _load(a)
    assert e.value.errno == errno.ELOOP


def test_missing_and_not_a_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        _load(tmp_path / "missing")
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(NotADirectoryError):  # was FileNotFoundError (the throwing form's "not found")
        _load(f / "sub")
    with pytest.raises(FileNotFoundError):  # a file where the directory should be: as before
        _load(f)
    with pytest.raises(FileNotFoundError):  # a directory without config.json
        _load(tmp_path)
    assert os.path.isdir(tmp_path)
