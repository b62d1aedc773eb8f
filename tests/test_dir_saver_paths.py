"""The engine's directory save (io/atomic_dir.cpp DirSaver, through _core.io.write_peft_adapter, the
writer qlora_adapter_save uses) on paths it cannot make absolute: "" and a relative path after the
working directory was removed. OSError with the errno, not std::filesystem's exception (a bare
RuntimeError 'filesystem error: cannot make absolute path', found by a fuzz of the path parameters)."""
import os

import numpy as np
import pytest

from qlora_native import _core

T = [("t", "F32", [1], np.zeros(4, np.uint8))]


@pytest.mark.parametrize("empty", ["", b""])
def test_empty_path_is_file_not_found(empty):
    with pytest.raises(FileNotFoundError):
        _core.io.write_peft_adapter(empty, T, "{}")


def test_relative_path_without_a_working_directory(tmp_path, monkeypatch):
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(FileNotFoundError):
        _core.io.write_peft_adapter("adapter", T, "{}")
    assert not os.path.exists(tmp_path / "adapter")


def test_relative_path_still_saves(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _core.io.write_peft_adapter("sub/adapter", T, "{}")
    assert sorted(os.listdir(tmp_path / "sub" / "adapter")) == ["adapter_config.json", "adapter_model.safetensors"]
