"""The AVX2 NF4 GEMV's two decodes of whole blocks (cpu/nf4_gemv_avx2.cpp, M = 1..8): two vpermps
tables and a blend, or byte-table lookups (vpshufb, then unpacks and a multiply by the block's
scale). They must give the same bits (same products, same FMA order), so the engine may pick either
by a measurement (cpu/tuning.hpp, keys nf4_gemv_avx2_decode.v1 for M <= 4 and
nf4_gemv_avx2_decode_m8.v1 for the wide kernel, M = 5..8) and remember it per machine in a file; QLORA_NF4_GEMV_AVX2_LOOKUP=0 / 1 forces one. Also: the lookup path against float64, and the
tuning file's rules (measured once, then read; lines of other machines kept; garbage ignored; an
unwritable path or QLORA_TUNE=0 never fails a call)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core
from test_ops_nf4_gemv import EPS32, check_close, dequant_ref, random_nf4

try:
    from qlora_native import ops
except ImportError:
    ops = None
pytestmark = [
    pytest.mark.skipif(ops is None or not hasattr(ops, "nf4_gemm_nt"), reason="ops.nf4_gemm_nt not built"),
    pytest.mark.skipif("avx2" not in _core.supported_simd_levels(), reason="no AVX2 on this CPU / build"),
]
KEY = "nf4_gemv_avx2_decode.v1"
KEY_WIDE = "nf4_gemv_avx2_decode_m8.v1"

# (rows, cols, blocksize), K % 16 == 0: heads where a row starts mid-block (96 cols at bs 64, 160 at
# bs 128, 48 at bs 32), bs 32 (one 32-column step per block), a block longer than a row (4096),
# tails (K % bs != 0: 1056 at 64, 288 at 256, 80 at 32), K = 16 (no whole block).
SHAPES = [(7, 32, 32), (9, 96, 32), (5, 48, 32), (6, 80, 32), (33, 96, 64), (37, 160, 128), (5, 224, 256),
          (11, 4096, 4096), (13, 1056, 64), (3, 576, 64), (17, 288, 256), (40, 1024, 64), (4, 16, 64)]


def _gemv(x, w, lookup, alpha=1.0, beta=0.0, y0=None):
    old = os.environ.get("QLORA_NF4_GEMV_AVX2_LOOKUP")
    os.environ["QLORA_NF4_GEMV_AVX2_LOOKUP"] = lookup
    try:
        out = None if y0 is None else y0.copy()
        return np.asarray(ops.nf4_gemm_nt(x, w, out, alpha=alpha, beta=beta, backend="cpu:avx2"))
    finally:
        if old is None:
            os.environ.pop("QLORA_NF4_GEMV_AVX2_LOOKUP", None)
        else:
            os.environ["QLORA_NF4_GEMV_AVX2_LOOKUP"] = old


@pytest.mark.parametrize("double_quant", [True, False], ids=["dq", "nodq"])
@pytest.mark.parametrize("rows,cols,blocksize", SHAPES, ids=[f"{r}x{c}-bs{b}" for r, c, b in SHAPES])
def test_lookup_gives_the_vpermps_bits(rng, threads, double_quant, rows, cols, blocksize):
    w = random_nf4(rng, rows, cols, blocksize, double_quant)
    for M in (1, 2, 3, 4, 5, 8):  # 5, 8: the wide kernel (one decode for all rows of X)
        x = rng.standard_normal((M, cols)).astype(np.float32)
        a, b = _gemv(x, w, "1"), _gemv(x, w, "0")
        np.testing.assert_array_equal(a, b, err_msg=f"M={M} lookup vs vpermps")
        y0 = rng.standard_normal((M, rows)).astype(np.float32)
        a, b = _gemv(x, w, "1", -0.75, 1.5, y0), _gemv(x, w, "0", -0.75, 1.5, y0)
        np.testing.assert_array_equal(a, b, err_msg=f"M={M} alpha/beta lookup vs vpermps")


@pytest.mark.parametrize("rows,cols,blocksize", SHAPES[:9], ids=[f"{r}x{c}-bs{b}" for r, c, b in SHAPES[:9]])
def test_lookup_vs_float64(rng, rows, cols, blocksize):
    """Independent of the other decode: the lookup path against the float64 product of the
    dequantized weight (bound: the fp32 worst case of a K-term sum, as test_ops_nf4_gemv)."""
    w = random_nf4(rng, rows, cols, blocksize, True)
    wd = dequant_ref(w).astype(np.float64)
    for M in (1, 2, 4, 7):
        x = rng.standard_normal((M, cols)).astype(np.float32)
        x64 = x.astype(np.float64)
        check_close(_gemv(x, w, "1"), x64 @ wd.T, 2.0 * (cols + 4) * EPS32 * (np.abs(x64) @ np.abs(wd).T) + 1e-30,
                    f"lookup M={M} vs float64")


def test_the_switch_selects_another_decode(rng):
    """A test that cannot tell the decodes apart would pass with either switch ignored: the
    forced choice shows in the tuning report, and the measured one is a known variant."""
    w = random_nf4(rng, 8, 256, 64, True)
    for M, key in ((1, KEY), (8, KEY_WIDE)):
        x = rng.standard_normal((M, 256)).astype(np.float32)
        for v, name in (("0", "vpermps"), ("1", "lookup")):
            _gemv(x, w, v)
            e = {r["key"]: r for r in _core.tuning_report()}[key]
            assert (e["choice"], e["source"]) == (name, "env")
            assert e["variants"] == ["vpermps", "lookup"]


# The tuning file, each case in a fresh process (the choices are per process).
_CHILD = r"""
import json, os, sys
sys.path.insert(0, os.path.join({root!r}, "tests"))
import numpy as np
from qlora_native import _core, ops
from test_ops_nf4_gemv import random_nf4
w = random_nf4(np.random.default_rng(1), 8, 256, 64, True)
ops.nf4_gemm_nt(np.ones((1, 256), np.float32), w, backend="cpu:avx2")
print(json.dumps({{r["key"]: r for r in _core.tuning_report()}}.get({key!r})))
"""


def _child(env):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    e = {k: v for k, v in os.environ.items() if not k.startswith("QLORA_NF4_GEMV") and k != "QLORA_TUNE"}
    e.update(env)
    r = subprocess.run([sys.executable, "-c", _CHILD.format(root=root, key=KEY)], env=e, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import json

    return json.loads(r.stdout.strip().splitlines()[-1])


def test_tuning_file_measured_once_then_read(tmp_path):
    path = tmp_path / "sub" / "tuning.txt"  # the directory does not exist yet
    first = _child({"QLORA_TUNE_CACHE": str(path)})
    assert first["source"] == "measured" and first["choice"] in ("vpermps", "lookup")
    assert len(first["best_seconds"]) == 2 and all(t > 0 for t in first["best_seconds"])
    lines = path.read_text().splitlines()
    sig = _core.cpu_signature()
    assert lines == [f"{sig}\t{KEY}\t{first['choice']}"]
    second = _child({"QLORA_TUNE_CACHE": str(path)})
    assert (second["source"], second["choice"]) == ("file", first["choice"])
    assert not [p for p in path.parent.iterdir() if p.name != "tuning.txt"]  # no temporaries left


def test_tuning_file_keeps_other_machines_and_skips_garbage(tmp_path):
    path = tmp_path / "tuning.txt"
    sig = _core.cpu_signature()
    other = f"OtherVendor family 1 model 2 stepping 3 | x\t{KEY}\tvpermps"
    path.write_bytes(b"\xff\xfe garbage\nno tabs here\na\tb\n\t\t\n" + other.encode() + b"\n" +
                     f"{sig}\t{KEY}\tno-such-variant\n".encode())
    got = _child({"QLORA_TUNE_CACHE": str(path)})
    assert got["source"] == "measured"  # the unknown variant name is not a choice
    lines = path.read_text(errors="replace").splitlines()
    assert other in lines and f"{sig}\t{KEY}\t{got['choice']}" in lines
    assert not any("no-such-variant" in line for line in lines)
    # A planted choice is taken as it is (both give the same bits, so any is safe).
    for planted in ("vpermps", "lookup"):
        path.write_text(f"{sig}\t{KEY}\t{planted}\n")
        got = _child({"QLORA_TUNE_CACHE": str(path)})
        assert (got["source"], got["choice"]) == ("file", planted)


def test_tuning_never_fails_a_call(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    got = _child({"QLORA_TUNE_CACHE": str(blocker / "tuning.txt")})  # its directory cannot exist
    assert got["source"] == "measured"
    got = _child({"QLORA_TUNE_CACHE": "off"})
    assert got["source"] == "measured"
    got = _child({"QLORA_TUNE_CACHE": str(tmp_path / "t.txt"), "QLORA_TUNE": "0"})
    assert (got["source"], got["choice"]) == ("default", "lookup")
    assert not (tmp_path / "t.txt").exists()
    got = _child({"QLORA_TUNE_CACHE": str(tmp_path / "t.txt"), "QLORA_NF4_GEMV_AVX2_LOOKUP": "0"})
    assert (got["source"], got["choice"]) == ("env", "vpermps")
    assert not (tmp_path / "t.txt").exists()  # forced: nothing measured, nothing written


def test_tuning_file_default_place(tmp_path):
    """Without QLORA_TUNE_CACHE: $XDG_CACHE_HOME/qlora_native/tuning.txt, else ~/.cache/..."""
    got = _child({"QLORA_TUNE_CACHE": "", "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert got["source"] == "measured"
    assert (tmp_path / "xdg" / "qlora_native" / "tuning.txt").read_text().endswith(f"\t{got['choice']}\n")
    got = _child({"QLORA_TUNE_CACHE": "", "XDG_CACHE_HOME": "", "HOME": str(tmp_path / "home")})
    assert (tmp_path / "home" / ".cache" / "qlora_native" / "tuning.txt").exists()
