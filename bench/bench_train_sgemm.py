"""bench_train.py's sgemm probes (child side): the machine's fp32 GEMM rate that each engine's effective
GFLOP/s and the ceiling are judged against, once before and after the engines (sgemm) and, in interleaved
runs, once after each round (sgemm_rounds), each in a child with the engine's ISA cap."""
import ctypes
import glob
import os
import time

import _rounds
from _common import SGEMM_SHAPES  # (M, K, N): Y[M, N] = X[M, K] · W[N, K]ᵀ


def openblas_core():
    """The kernel set numpy's OpenBLAS picked (e.g. 'SkylakeX', or 'Haswell' under the AVX2 cap), or None:
    says in the result that a cap took effect."""
    import numpy as np

    libs = os.path.join(os.path.dirname(np.__file__), os.pardir, "numpy.libs")
    for path in glob.glob(os.path.join(libs, "*openblas*")):
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_get_corename64_", "scipy_openblas_get_corename", "openblas_get_corename64_",
                     "openblas_get_corename"):
            f = getattr(lib, name, None)
            if f is not None:
                f.restype = ctypes.c_char_p
                return f().decode()
    return None


def sgemm(spec):
    """GFLOP/s of fp32 GEMM Y = X · Wᵀ: numpy (OpenBLAS) and qlora_native.ops.gemm_nt, best of a few runs."""
    import numpy as np

    out = {"engine": "sgemm", "shapes": [], "numpy_gflops": None, "ours_gflops": None}
    rng = np.random.default_rng(1)
    ops = None
    try:
        import qlora_native
        from qlora_native import ops

        qlora_native.set_num_threads(spec["threads"])
    except Exception as e:  # the numpy rate alone still says what the machine does
        out["ours_error"] = f"{type(e).__name__}: {e}"

    def best(fn, n):
        fn()
        b = float("inf")
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            b = min(b, time.perf_counter() - t0)
        return b

    for (M, K, N) in SGEMM_SHAPES:
        x = rng.standard_normal((M, K)).astype(np.float32)
        w = rng.standard_normal((N, K)).astype(np.float32)
        y = np.empty((M, N), np.float32)
        flop = 2.0 * M * N * K
        row = {"M": M, "K": K, "N": N, "numpy_gflops": flop / best(lambda: np.matmul(x, w.T, out=y), spec["gemm_runs"]) / 1e9}
        if ops is not None:
            row["ours_gflops"] = flop / best(lambda: ops.gemm_nt(x, w, y), spec["gemm_runs"]) / 1e9
        out["shapes"].append(row)
    out["numpy_gflops"] = max(r["numpy_gflops"] for r in out["shapes"])
    out["openblas_core"] = openblas_core()
    if ops is not None:
        out["ours_gflops"] = max(r["ours_gflops"] for r in out["shapes"])
    return out


def sgemm_rounds(spec, chan):
    """Interleaved runs: numpy's sgemm rate (best over SGEMM_SHAPES, best of 3 each) once per round, between
    the engines' steps, so each round's ceiling uses that round's rate."""
    import numpy as np

    if chan is None:
        raise SystemExit("sgemm_round runs only under the round protocol")
    rng = np.random.default_rng(1)
    arrays = [(rng.standard_normal((M, K)).astype(np.float32), rng.standard_normal((N, K)).astype(np.float32),
               np.empty((M, N), np.float32)) for M, K, N in SGEMM_SHAPES]

    def probe():
        best = 0.0
        for x, w, y in arrays:
            for _ in range(3):
                t0 = time.perf_counter()
                np.matmul(x, w.T, out=y)
                best = max(best, 2.0 * x.shape[0] * x.shape[1] * w.shape[0] / (time.perf_counter() - t0) / 1e9)
        return best

    probe()  # warm-up (page faults, BLAS threads)
    chan.send("READY", {})
    _, rates, idle_cpu = _rounds.serve_steps(chan, probe)
    return {"engine": "sgemm_round", "numpy_gflops": rates, "openblas_core": openblas_core(), "idle_cpu_s": idle_cpu}
