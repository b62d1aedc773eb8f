"""The AMX-BF16 micro-kernel of the bf16 GEMMs (cpu/gemm_bf16_amx*.{hpp,cpp}) through the ops, on emulated
tiles (QLORA_AMX=emulate: the same kernel source, tile instructions emulated per the Intel SDM), so the
driver's AMX path (A panels re-laid after packing, two panels per call, ragged last 16-pair chunk) runs on
CPUs without AMX: the five GEMMs on odd shapes within test_bf16's float64 bound, both drivers bit-equal,
and different bits from the AVX512-BF16 kernel (another k order) within the same bound. The kernel query
(ops.bf16_gemm_kernel) follows QLORA_AMX. The real-tile kernel runs only where the CPU has AMX-BF16
(cpp/tests/test_gemm_bf16_amx.cpp)."""
import os

import numpy as np
import pytest

from qlora_native import ops

from helpers_bf16 import HAVE_BF16, check, env_fixture, strided
from test_ops_nf4_gemm import decode, random_nf4

pytestmark = pytest.mark.skipif(not HAVE_BF16, reason="no AVX512-BF16 on this CPU (the bf16 packers need it)")

B = "cpu:avx512"
BF = dict(backend=B, compute_dtype="bfloat16")


def cpu_has_amx():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


env = env_fixture("QLORA_AMX", "QLORA_BF16_GEMM", "QLORA_BF16_PACK_A")


def test_kernel_query_follows_switch(env):
    env["QLORA_AMX"] = "0"
    assert ops.bf16_gemm_kernel() == "avx512-bf16"
    env["QLORA_AMX"] = "emulate"
    assert ops.bf16_gemm_kernel() == "amx-bf16-emulated"
    env.pop("QLORA_AMX")
    # amx-bf16 needs the CPU flag (and the OS permission, granted by Linux >= 5.16)
    assert ops.bf16_gemm_kernel() in (("amx-bf16", "avx512-bf16") if cpu_has_amx() else ("avx512-bf16",))


# (M, N, K): ragged rows (one or two 16-row AMX panels per call), ragged columns, K odd, K % 32 != 0, and
# K over KC (several depth blocks, the last with a ragged 16-pair chunk).
SHAPES = [(1, 1, 1), (13, 17, 33), (29, 40, 95), (44, 65, 31), (15, 33, 2500)]


def run3(rng, env, amx, driver="shared"):
    if amx is None:
        env.pop("QLORA_AMX", None)
    else:
        env["QLORA_AMX"] = amx
    env["QLORA_BF16_GEMM"] = driver
    outs = []
    r = np.random.default_rng(5)
    for M, N, K in SHAPES:
        a, bt = strided(r, M, K), strided(r, N, K)
        bn, at = strided(r, K, N), strided(r, K, M)
        c0 = r.standard_normal((M, N)).astype(np.float32)
        y = c0.copy()
        ops.gemm_nt(a, bt, y, alpha=0.75, beta=-0.5, **BF)
        outs.append(("nt", y, a, bt.T, K, 0.75, -0.5, c0))
        outs.append(("nn", ops.gemm_nn(a, bn, **BF), a, bn, K, 1.0, 0.0, None))
        outs.append(("tn", ops.gemm_tn(at, bn, **BF), at.T, bn, K, 1.0, 0.0, None))
    return outs


@pytest.mark.parametrize("driver", ["shared", "tasks"])
def test_emulated_amx_gemms_within_bound(rng, env, driver):
    emu = run3(rng, env, "emulate", driver)
    avx = run3(rng, env, "0", driver)
    differ = 0
    for (op, y, a, b, K, alpha, beta, c0), (_, y2, *_rest) in zip(emu, avx):
        check(y, a, b, K, alpha, beta, c0)
        differ += int(np.sum(y.view(np.uint32) != y2.view(np.uint32)))
    assert differ > 0  # another k order: some bits differ, or the AMX path did not run


def test_emulated_amx_drivers_same_bits(rng, env):
    shared = run3(rng, env, "emulate", "shared")
    tasks = run3(rng, env, "emulate", "tasks")
    for s, t in zip(shared, tasks):
        assert np.array_equal(s[1].view(np.uint32), t[1].view(np.uint32)), s[0]


@pytest.mark.parametrize("driver", ["shared", "tasks"])
def test_emulated_amx_nf4(rng, env, driver):
    env["QLORA_AMX"] = "emulate"
    env["QLORA_BF16_GEMM"] = driver
    for M, N, K, bs, dq in [(29, 45, 64, 32, False), (15, 33, 2112, 64, True), (30, 7, 100, 32, True)]:
        w = random_nf4(rng, N, K, bs, dq)
        x = strided(rng, M, K)
        c0 = rng.standard_normal((M, N)).astype(np.float32)
        y = c0.copy()
        ops.nf4_gemm_nt(x, w, y, alpha=-1.5, beta=0.5, **BF)
        check(y, x, decode(w).T, K, -1.5, 0.5, c0)
        dy = strided(rng, M, N)
        check(ops.nf4_gemm_nn(dy, w, **BF), dy, decode(w), N)


@pytest.mark.parametrize("amx", ["emulate", None])
def test_amx_a_packers_same_bits(rng, env, amx):
    """The AMX path's 16-row A panels of row-major A (nt, nn, NF4) packed straight in the tile layout
    (default) and through pack_rows + re-layout (QLORA_BF16_PACK_A=rows): the same values, the same bits."""
    if amx is None:
        env.pop("QLORA_AMX", None)
        if ops.bf16_gemm_kernel() != "amx-bf16":
            pytest.skip("the AMX-BF16 kernel is not in use here")
    direct = run3(rng, env, amx, "shared")
    env["QLORA_BF16_PACK_A"] = "rows"
    rows = run3(rng, env, amx, "shared")
    for d, r in zip(direct, rows):
        assert np.array_equal(d[1].view(np.uint32), r[1].view(np.uint32)), d[0]


def test_real_amx_gemms(rng, env):
    """Only where the CPU has AMX-BF16 and the OS grants the tiles (tools/device-check runs this file when the
    host has amx_bf16): the real tiles within the bound, both drivers the same bits; how many elements differ
    in bits from the emulated tiles is printed (the emulation follows the SDM pseudo-code; real silicon may
    order the pair sums differently, which the bound allows)."""
    env.pop("QLORA_AMX", None)
    if ops.bf16_gemm_kernel() != "amx-bf16":
        why = "the AMX-BF16 kernel is not in use here (no AMX-BF16, or the OS refused the tile state)"
        if os.environ.get("QLORA_REQUIRE_AMX") == "1":  # tools/device-check on an amx_bf16 host
            pytest.fail(why + f": kernel {ops.bf16_gemm_kernel()!r}")
        pytest.skip(why)
    real = run3(rng, env, None, "shared")
    for op, y, a, b, K, alpha, beta, c0 in real:
        check(y, a, b, K, alpha, beta, c0)
    for s, t in zip(real, run3(rng, env, None, "tasks")):
        assert np.array_equal(s[1].view(np.uint32), t[1].view(np.uint32)), s[0]
    emu = run3(rng, env, "emulate", "shared")
    n = sum(int(np.sum(r[1].view(np.uint32) != e[1].view(np.uint32))) for r, e in zip(real, emu))
    print(f"real vs emulated AMX tiles: {n} of {sum(r[1].size for r in real)} elements differ in bits")
