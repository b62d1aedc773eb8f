"""The op harness (_core.backend_op: each op on every backend, arrays copied into sentinel-guarded
buffers, a write outside an output raises) as the op tests use it: the backends, the GPU skip, the
fp32-bound comparison, and the lora_segments(_many) cases with float64 references. Shared by
test_cuda_backend.py, test_cuda_backward_ops.py and test_cuda_serving.py."""
from __future__ import annotations

import numpy as np
import pytest

from qlora_native import _core

EPS32 = float(np.finfo(np.float32).eps)
HAVE_GPU = _core.cuda_device_count() > 0
# the CPU levels run everywhere (cpu:devsim: the CPU kernels behind CUDA's device face and op table)
HARNESS_BACKENDS = ["cpu:scalar", "cpu", "cpu:devsim", "cuda"]


def be(name):
    """The backend name; skips the test for "cuda" without a GPU."""
    if name == "cuda" and not HAVE_GPU:
        pytest.skip(f"no CUDA GPU: {_core.cuda_device_summary()}")
    return name


def run(backend, op, arrays, ints=None, floats=None):
    return _core.backend_op(backend, op, arrays, ints or {}, floats or {})


def within(got, ref, tol, what):
    """|got - ref| <= tol elementwise (tol broadcast); NaN in got or ref fails."""
    err = np.abs(np.asarray(got, np.float64) - ref)
    tol = np.broadcast_to(np.asarray(tol, np.float64), err.shape)
    bad = ~(err <= tol)
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.size} elements off, worst err {np.nanmax(err):.3g} "
                           f"(tol there {tol.flat[np.argmax(np.where(bad, err - tol, -np.inf))]:.3g})")


def lora_case(rng, problems, M, pad=(3, 1)):
    """problems: [(in, out, [(row0, rows, r, alpha), ...])], M rows; x / y get `pad` extra columns
    (row strides in + pad[0], out + pad[1]) that the op must leave alone.

    Returns (arrays, ints, floats, refs) with refs = [(p, in, out, ref, bound, y, segs)]: ref the
    float64 result over y's first `out` columns, bound the sum of absolute terms (for rounding
    tolerances), y the input y (its padding columns must come back unchanged)."""
    arrays, ints, floats, refs = {}, {"np": len(problems)}, {}, []
    tmax = 1
    for p, (inp, out, segs) in enumerate(problems):
        ldx, ldy = inp + pad[0], out + pad[1]
        x = rng.standard_normal((M, ldx)).astype(np.float32)
        y = rng.standard_normal((M, ldy)).astype(np.float32)
        arrays[f"x_{p}"], arrays[f"y_{p}"] = x, y
        ints.update({f"in_{p}": inp, f"out_{p}": out, f"ldx_{p}": ldx, f"ldy_{p}": ldy, f"nseg_{p}": len(segs)})
        ref = y[:, :out].astype(np.float64)
        bound = np.abs(ref)
        for s, (row0, rows, r, alpha) in enumerate(segs):
            A = rng.standard_normal((r, inp)).astype(np.float32)
            Bm = rng.standard_normal((out, r)).astype(np.float32)
            key = f"{p}_{s}"
            arrays[f"A_{key}"], arrays[f"B_{key}"] = A, Bm
            ints.update({f"row0_{key}": row0, f"rows_{key}": rows, f"r_{key}": r})
            floats[f"alpha_{key}"] = alpha
            if rows and alpha:
                xs = x[row0:row0 + rows, :inp].astype(np.float64)
                ref[row0:row0 + rows] += alpha * (xs @ A.T.astype(np.float64)) @ Bm.T.astype(np.float64)
                bound[row0:row0 + rows] += abs(alpha) * (np.abs(xs) @ np.abs(A.T)) @ np.abs(Bm.T)
            tmax = max(tmax, rows * r)
        refs.append((p, inp, out, ref, bound, y, segs))
    arrays["t"] = np.zeros(tmax, np.float32)  # the op's [rows, r] scratch
    return arrays, ints, floats, refs
