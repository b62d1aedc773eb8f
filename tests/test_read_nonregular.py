"""Files the engine reads whole or maps (io/mapped_file.cpp: JSON configs and tokenizer.json through
read_file, safetensors through MappedFile) must be regular files, as the GGUF reader already requires:
a fifo blocked the open forever (no writer comes) and a /dev/zero-like device was read until memory ran
out (found by a fuzz of the _core path parameters). FormatError (a ValueError) naming the path."""
import os
import stat
import subprocess
import sys

import pytest

from qlora_native import _core

CALLS = {
    "json_load_file": "_core.io.json_load_file(p)",
    "SafetensorsFile": "_core.io.SafetensorsFile(p)",
}


def _child(call, path):
    code = (f"import sys\nfrom qlora_native import _core\np = {str(path)!r}\n"
            f"try:\n    {call}\nexcept ValueError as e:\n    print(type(e).__name__, e)\n")
    # In a child with a timeout and an address-space limit: the fifo blocked, /dev/zero grew.
    pre = "import resource; resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))\n"
    r = subprocess.run([sys.executable, "-c", pre + code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.mark.parametrize("call", sorted(CALLS))
def test_fifo_is_refused(tmp_path, call):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    out = _child(CALLS[call], fifo)
    assert out.startswith("FormatError") and "not a regular file" in out


@pytest.mark.parametrize("call", sorted(CALLS))
def test_zero_device_is_refused(call):
    if not stat.S_ISCHR(os.stat("/dev/zero").st_mode):
        pytest.skip("no /dev/zero")
    out = _child(CALLS[call], "/dev/zero")
    assert out.startswith("FormatError") and "not a regular file" in out


def test_regular_files_still_read(tmp_path):
    (tmp_path / "c.json").write_text('{"a": [1, 2]}')
    assert _core.io.json_load_file(tmp_path / "c.json") == {"a": [1, 2]}
