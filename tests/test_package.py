import os
import subprocess
import sys
from pathlib import Path

import qlora_native
from qlora_native import _core
from qlora_native.cli import main

PKG_DIR = Path(qlora_native.__file__).parent


def test_info_reports_runtime(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert qlora_native.__version__ in out
    assert _core.simd_level() in out
    assert "CUDA backend" in out


def test_threads_settable():
    n = qlora_native.num_threads()
    try:
        qlora_native.set_num_threads(1)
        assert qlora_native.num_threads() == 1
        qlora_native.set_num_threads(3)
        assert qlora_native.num_threads() == 3
    finally:
        qlora_native.set_num_threads(n)
    import pytest

    with pytest.raises(ValueError):
        qlora_native.set_num_threads(0)


def test_simd_level_settable():
    import pytest

    best = _core.best_simd_level()
    try:
        for level in qlora_native.supported_simd_levels():
            qlora_native.set_simd_level(level)
            assert qlora_native.simd_level() == level
    finally:
        qlora_native.set_simd_level(best)
    with pytest.raises(ValueError):
        qlora_native.set_simd_level("sse9")


def test_backend_lookup():
    import pytest

    for name in _core.available_backends():
        assert _core.check_backend(name) == name
    with pytest.raises(ValueError, match="unknown backend"):
        _core.check_backend("tpu")
    with pytest.raises(ValueError, match="unknown SIMD level"):
        _core.check_backend("cpu:sse9")
    if not _core.cuda_device_count():
        with pytest.raises(ValueError, match="unavailable"):
            _core.check_backend("cuda")


def test_package_never_imports_torch():
    """python/qlora_native must run without PyTorch: import every module with torch made unimportable."""
    code = (
        "import sys, importlib, pkgutil\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'torch' or name.startswith('torch.'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import qlora_native\n"
        "for m in pkgutil.walk_packages(qlora_native.__path__, 'qlora_native.'):\n"
        "    if m.name.endswith('__main__'): continue\n"
        "    importlib.import_module(m.name)\n"
        "assert 'torch' not in sys.modules\n"
        "from qlora_native.cli import main\n"
        "main(['info'])\n"
    )
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "qlora_native" in r.stdout
