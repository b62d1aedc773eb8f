"""The installable C/C++ package (issue 12). `cmake --install` of a build tree, and the copy a wheel
carries (`python -m qlora_native --cmake-dir`), each give a package that cpp/examples/consumer finds
with find_package(qlora), links (shared qlora::qlora, and static qlora::qlora_static) and runs: a tiny
GGUF is loaded, the prompt tokenized by the C++ tokenizer, generated from with a PEFT adapter at a
scale, and the printed text equals what the Python face generates and decodes. libqlora.so exports
exactly the functions of qlora.h, and qlora.hpp calls every one of them.

The build tree is the one the imported _core came from (tools/dev-build), else pip's
build/{wheel_tag}: its objects are reused, nothing is compiled twice."""
from __future__ import annotations

import fcntl
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import qlora_native
from qlora_native import _core

REPO = Path(__file__).resolve().parents[1]
CONSUMER = REPO / "cpp" / "examples" / "consumer"
INCLUDE = REPO / "cpp" / "include" / "qlora"
CMAKE = shutil.which("cmake")
needs_cmake = pytest.mark.skipif(CMAKE is None, reason="cmake is not on PATH (it comes with the [test] extras)")
PROMPT = "the cat sat on the mat"
N_NEW = 12
BUILD_LOCK = "/tmp/qlora-build.lock"  # tools/dev-build users serialize builds of build/dev on it (flock)


def c_api_functions() -> list[str]:
    names = re.findall(r"QLORA_API[^;{]*?\b(qlora_\w+)\s*\(", (INCLUDE / "qlora.h").read_text())
    assert len(names) > 30, names  # the pattern still matches the header's declarations
    return names


def test_cpp_wrapper_covers_the_c_api():
    hpp = (INCLUDE / "qlora.hpp").read_text()
    missing = [f for f in c_api_functions() if not re.search(rf"\b{f}\s*\(", hpp)]
    assert not missing, f"qlora.hpp does not wrap: {missing}"


def test_cmake_dir_flag_and_cli():
    """`python -m qlora_native --cmake-dir` prints the installed package's directory, or fails with
    a message naming what is missing (a source checkout has none); other arguments run the CLI."""
    pkg = Path(qlora_native.__file__).resolve().parent
    r = subprocess.run([sys.executable, "-m", "qlora_native", "--cmake-dir"], capture_output=True, text=True,
                       timeout=120)
    if (pkg / "lib" / "cmake" / "qlora" / "qloraConfig.cmake").is_file():
        assert r.returncode == 0, r.stderr
        assert Path(r.stdout.strip()) == pkg / "lib" / "cmake" / "qlora"
    else:
        assert r.returncode == 1 and r.stdout == ""
        assert "not an installed wheel" in r.stderr and "cmake --install" in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "qlora_native", "info"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and qlora_native.__version__ in r.stdout, r.stderr


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A tiny GGUF, a random PEFT adapter for it, and the Python face's texts (base, adapter,
    adapter at scale 0.5) for PROMPT; the three differ, so a consumer ignoring the adapter or
    its scale cannot pass."""
    from helpers_gguf import write_tiny_gguf
    from helpers_tiny import add_random_adapter

    d = tmp_path_factory.mktemp("consumer_case")
    gguf = write_tiny_gguf(d / "tiny.gguf")
    m = qlora_native.Model.from_pretrained(str(gguf))
    add_random_adapter(m, "a", seed=3)
    m.save_adapter(str(d / "adapter"), "a")
    tok = qlora_native.Tokenizer.from_pretrained(str(gguf))
    ids = tok.encode(PROMPT)
    m.set_adapter(None)
    base = m.generate(ids, N_NEW)[0]
    with_adapter = m.generate(ids, N_NEW, adapter_name="a")[0]
    m.set_adapter_scale("a", 0.5)
    half = m.generate(ids, N_NEW, adapter_name="a")[0]
    assert base != with_adapter and half not in (base, with_adapter)
    expect = [([], base), (["--adapter", str(d / "adapter")], with_adapter),
              (["--adapter", str(d / "adapter"), "--scale", "0.5"], half)]
    return gguf, d / "adapter", [(args, (tok.decode(out) + "\n").encode()) for args, out in expect]


def _run(cmd, timeout=300, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([str(c) for c in cmd], capture_output=True, timeout=timeout, **kw)
    assert r.returncode == 0, (f"{' '.join(map(str, cmd))} exited {r.returncode}\n"
                               f"{r.stdout.decode(errors='replace')[-3000:]}\n{r.stderr.decode(errors='replace')[-3000:]}")
    return r


def build_consumer(prefix_path, build_dir: Path) -> list[Path]:
    """Configures and builds cpp/examples/consumer against the package at prefix_path; returns its
    programs (the static one only where the package has qlora::qlora_static's dependencies)."""
    gen = ["-G", "Ninja"] if shutil.which("ninja") else []
    _run([CMAKE, "-S", CONSUMER, "-B", build_dir, *gen, "-DCMAKE_BUILD_TYPE=Release",
          f"-DCMAKE_PREFIX_PATH={prefix_path}"])
    _run([CMAKE, "--build", build_dir])
    return [p for p in (build_dir / "qlora_consumer", build_dir / "qlora_consumer_static") if p.is_file()]


def check_consumer(exe: Path, case) -> None:
    gguf, adapter, expect = case
    for args, want in expect:
        r = _run([exe, gguf, PROMPT, "-n", N_NEW, *args], timeout=120)
        assert r.stdout == want, (exe.name, args, r.stdout, want)
    # Engine errors come back as a message and exit status 1, not a crash.
    r = subprocess.run([str(exe), str(gguf), PROMPT, "--adapter", str(adapter) + "-missing"], capture_output=True,
                       timeout=120)
    assert r.returncode == 1 and b"-missing" in r.stderr, (r.returncode, r.stderr)


C_PROGRAM = r"""
#include <stdio.h>
#include "qlora/qlora.h"

/* The C API from C99: the prompt's ids, greedy generation, the text. */
int main(int argc, char** argv) {
  qlora_model* model;
  const qlora_tokenizer* tok;
  int32_t ids[64], out[16];
  int64_t n_out = 0;
  int32_t n, len;
  char text[1024];
  if (argc != 3) return 2;
  model = qlora_model_load(argv[1], NULL);
  if (!model) { fprintf(stderr, "%s\n", qlora_last_error()); return 1; }
  tok = qlora_model_get_tokenizer(model);
  n = tok ? qlora_tokenize(tok, argv[2], -1, ids, 64, 1, 1) : -1;
  if (n <= 0 || qlora_generate(model, ids, n, NULL, out, 16, &n_out, NULL, NULL) != QLORA_OK) {
    fprintf(stderr, "%s\n", qlora_last_error());
    qlora_model_free(model);
    return 1;
  }
  len = qlora_detokenize(tok, out, (int32_t)n_out, text, (int32_t)sizeof text, 0);
  if (len < 0) return 1;
  printf("%.*s\n", (int)len, text);
  qlora_model_free(model);
  return 0;
}
"""


def check_c_program(include_dir, lib_dir, tmp_path: Path, case) -> None:
    """qlora.h compiles as C99 (-pedantic -Werror) and links with plain -lqlora (no CMake); its greedy
    text equals the Python face's (16 new tokens, no stop ids)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return
    src = tmp_path / "c_api.c"
    src.write_text(C_PROGRAM)
    exe = tmp_path / "c_api"
    _run([cc, "-std=c99", "-Wall", "-Wextra", "-pedantic", "-Werror", f"-I{include_dir}", src, "-o", exe,
          f"-L{lib_dir}", "-lqlora", f"-Wl,-rpath,{lib_dir}"])
    gguf, _, _ = case
    m = qlora_native.Model.from_pretrained(str(gguf))
    tok = qlora_native.Tokenizer.from_pretrained(str(gguf))
    want = tok.decode(m.generate(tok.encode(PROMPT), 16, eos_token_id=None)[0]) + "\n"
    assert _run([exe, gguf, PROMPT], timeout=120).stdout == want.encode()


def config_dir(root: Path) -> Path:
    found = sorted(root.rglob("qloraConfig.cmake"))
    assert len(found) == 1, found
    return found[0].parent


def expect_static(cfg_dir: Path) -> bool:
    """qlora::qlora_static must be usable unless it needs a CUDA toolkit this machine lacks."""
    text = (cfg_dir / "qloraConfig.cmake").read_text()
    return "set(qlora_WITH_CUDA OFF)" in text or shutil.which("nvcc") is not None


def _build_dir() -> tuple[Path, bool] | None:
    """(build dir, whether it is a dev build to bring up to date) or None."""
    core_dir = Path(_core.__file__).resolve().parent.parent  # tools/dev-build: BUILD/qlora_native/_core*.so
    if (core_dir / "CMakeCache.txt").is_file():
        return core_dir, True
    # An installed wheel: pip built it in build/{wheel_tag} (pyproject), all targets, moments ago.
    caches = sorted(REPO.glob("build/*/CMakeCache.txt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for c in caches:
        if f"CMAKE_HOME_DIRECTORY:INTERNAL={REPO}\n" in c.read_text(errors="replace"):
            return c.parent, False
    return None


@needs_cmake
def test_install_tree_package_builds_and_runs_consumer(case, tmp_path):
    found = _build_dir()
    if found is None:
        pytest.skip("no CMake build tree of this checkout (tools/dev-build or pip install .)")
    bdir, dev = found
    if dev:  # bring libqlora up to date from the engine objects already built there
        with open(BUILD_LOCK, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            _run([CMAKE, "--build", bdir, "--target", "qlora_shared", "qlora_engine"], timeout=600)
    prefix = tmp_path / "prefix"
    _run([CMAKE, "--install", bdir, "--prefix", prefix, "--component", "qlora"])
    cfg = config_dir(prefix)
    wheel_layout = "qlora_native" in cfg.relative_to(prefix).parts  # a pip build tree installs as in the wheel
    root = prefix / "qlora_native" if wheel_layout else prefix
    assert (root / "include" / "qlora" / "qlora.h").is_file() and (root / "include" / "qlora" / "qlora.hpp").is_file()
    libdir = cfg.parents[1]  # LIBDIR/cmake/qlora
    shared = sorted(libdir.glob("libqlora.so*"))
    assert shared and (libdir / "libqlora.a").is_file(), sorted(libdir.iterdir())

    # Only the C API is exported from the shared library (the engine's C++ symbols stay inside).
    nm = shutil.which("nm")
    if nm:
        out = _run([nm, "-D", "--defined-only", shared[-1]]).stdout.decode()
        exported = {line.split()[-1] for line in out.splitlines() if line.strip()}
        assert exported == set(c_api_functions()), (exported ^ set(c_api_functions()))

    # Standard layout (dev builds): the install prefix itself is what CMAKE_PREFIX_PATH names.
    exes = build_consumer(cfg if wheel_layout else prefix, tmp_path / "consumer")
    assert len(exes) == (2 if expect_static(cfg) else 1), exes
    for exe in exes:
        check_consumer(exe, case)
    check_c_program(root / "include", libdir, tmp_path, case)


@needs_cmake
def test_wheel_package_builds_and_runs_consumer(case, tmp_path):
    pkg = Path(qlora_native.__file__).resolve().parent
    if not (pkg / "lib" / "cmake" / "qlora").is_dir():
        pytest.skip(f"qlora_native at {pkg} is not an installed wheel (a source checkout has no C/C++ package)")
    cmake_dir = _run([sys.executable, "-m", "qlora_native", "--cmake-dir"]).stdout.decode().strip()
    assert (Path(cmake_dir) / "qloraConfig.cmake").is_file()
    assert (pkg / "include" / "qlora" / "qlora.h").is_file()
    exes = build_consumer(cmake_dir, tmp_path / "consumer")
    assert len(exes) == (2 if expect_static(Path(cmake_dir)) else 1), exes
    for exe in exes:
        check_consumer(exe, case)
    # Without CMake: the directories `--include-dir` / `--lib-dir` print.
    inc, lib = (_run([sys.executable, "-m", "qlora_native", flag]).stdout.decode().strip()
                for flag in ("--include-dir", "--lib-dir"))
    assert Path(inc) == pkg / "include" and Path(lib) == pkg / "lib"
    check_c_program(inc, lib, tmp_path, case)
