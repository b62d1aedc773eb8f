import os

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

from helpers_capi import load_model_lib

# Kernel choices measured at run time (cpu/tuning.hpp) stay in the test process: no file under the
# user's cache directory (tests/test_nf4_gemv_avx2_lookup.py sets its own paths).
os.environ.setdefault("QLORA_TUNE_CACHE", "off")


@pytest.fixture
def rng(request):
    """A fresh random generator per test; the seed is printed on failure for reproduction."""
    # QLORA_TEST_SEED=<seed printed by a failing run> reproduces it.
    seed = int(os.environ.get("QLORA_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    request.node.user_properties.append(("seed", seed))
    print(f"rng seed: {seed}")
    return np.random.default_rng(seed)


@pytest.fixture(params=[1, 2], ids=lambda n: f"t{n}")
def threads(request):
    """The engine at 1 and at 2 threads (restored after the test)."""
    old = qlora_native.num_threads()
    qlora_native.set_num_threads(request.param)
    yield request.param
    qlora_native.set_num_threads(old)


def cpu_backends():
    return [b for b in _core.available_backends() if b.startswith("cpu:")]


def all_backends():
    """Every backend the harness runs ops on; CUDA appears as skipped with a reason when absent."""
    params = [pytest.param(b, id=b) for b in cpu_backends()]
    if "cuda" in _core.available_backends():
        params.append(pytest.param("cuda", id="cuda"))
    else:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.skip(reason=f"no CUDA backend: {_core.cuda_device_summary()}")))
    return params


@pytest.fixture(scope="module")
def lib():
    """The C API of _core through ctypes with CModel's signatures (helpers_capi.load_model_lib); a test
    module's own `lib` fixture replaces it there."""
    return load_model_lib()
