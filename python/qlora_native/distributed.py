"""Data-parallel LoRA training over MPI (CPU ranks), loaded only when asked for.

    mpiexec -n 4 qlora-native train --model ... --data train.jsonl --output out
    mpiexec -n 4 python my_training_script.py          # Trainer(...).train(), unchanged

Each rank runs the whole model on its own shard of every global batch (per_device_train_batch_size
x world_size rows, built identically on every rank from the same seed); the engine's step
(Model.train_step, lora_setup.cpp lora_train_step) sums the counted tokens, the losses and the one
contiguous LoRA gradient buffer over the ranks, so N ranks x batch b take exactly the steps of one
process with batch N x b (up to fp32 summation order). mpi4py is an optional dependency
(pip install qlora-native[mpi]); nothing here is imported by a single-process run.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

__all__ = ["MPIComm", "launcher_world_size", "wanted", "init", "shard", "abort", "MPI_INSTALL"]

MPI_INSTALL = "pip install qlora-native[mpi]"
# (rank, size) variables set by the common MPI launchers: MPICH / Intel MPI (hydra), Open MPI, MVAPICH2.
_ENV = (("PMI_RANK", "PMI_SIZE"), ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
        ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE"))


def launcher_world_size() -> int | None:
    """The world size an MPI launcher announced in the environment (None: not launched by one)."""
    for _, size in _ENV:
        v = os.environ.get(size)
        if v is not None:
            try:
                return int(v)
            except ValueError:
                raise ValueError(f"environment variable {size}={v!r} is not an integer") from None
    return None


def wanted(flag) -> bool:
    """flag True / False: asked for / refused; None: on when a launcher started more than one rank."""
    if flag is None:
        return (launcher_world_size() or 1) > 1
    if not isinstance(flag, bool):
        raise ValueError(f"distributed must be True, False or None (auto: on under mpiexec), got {flag!r}")
    return flag


def shard(n_rows: int, rank: int, size: int) -> tuple[int, int]:
    """Rows [lo, hi) of a global batch of n_rows held by `rank`: contiguous, sizes differing by at most
    one (the first n_rows % size ranks hold one more); a rank may hold none."""
    q, r = divmod(int(n_rows), int(size))
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class MPIComm:
    """The reducer Model.train_step takes (sum_scalars / sum_grads: in-place Allreduce SUM on numpy views
    of the engine's buffers) plus what the Trainer needs (rank, size, bcast, barrier, abort).
    allreduce_seconds / allreduce_bytes accumulate the gradient all-reduces (bench_scale.py)."""

    def __init__(self, comm=None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(f"distributed training needs mpi4py and an MPI library: {MPI_INSTALL} "
                              f"(or mpi4py built against your cluster's MPI); import failed: {exc}") from exc
        self._MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        self.allreduce_seconds, self.allreduce_bytes, self.allreduce_calls = 0.0, 0, 0

    def sum_scalars(self, v) -> None:
        self.comm.Allreduce(self._MPI.IN_PLACE, v, op=self._MPI.SUM)

    def sum_grads(self, g) -> None:
        t0 = time.perf_counter()
        self.comm.Allreduce(self._MPI.IN_PLACE, g, op=self._MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - t0
        self.allreduce_bytes += g.nbytes
        self.allreduce_calls += 1

    def bcast(self, obj, root: int = 0):
        return self.comm.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        return self.comm.allgather(obj)

    def barrier(self) -> None:
        self.comm.Barrier()

    def local_size(self) -> int:
        """Ranks on this node (they share its cores)."""
        return self.comm.Split_type(self._MPI.COMM_TYPE_SHARED).Get_size()

    def abort(self, code: int = 1) -> None:
        self.comm.Abort(code)


_COMM: MPIComm | None = None


def init(flag=True) -> MPIComm | None:
    """The world communicator when distributed training is wanted (see wanted()), else None. The first
    call also sets the engine's threads to physical cores / ranks on the node, unless QLORA_NUM_THREADS
    or set_num_threads chose a count already (the engine's default is every physical core)."""
    global _COMM
    if not wanted(flag):
        return None
    if _COMM is None:
        c = MPIComm()
        if os.environ.get("QLORA_NUM_THREADS") is None:
            from . import _core

            if _core.num_threads() == min(_core.physical_cores(), _core.max_threads()):  # still the default
                _core.set_num_threads(max(1, _core.physical_cores() // c.local_size()))
        if c.size > 1:
            _abort_on_uncaught(c)
        _COMM = c
    return _COMM


def _abort_on_uncaught(comm: MPIComm) -> None:
    """An exception nobody catches on one rank (in the user's script too, outside Trainer.train) ends
    every rank, as `python -m mpi4py` does: the others may be waiting in a collective for it."""
    prev = sys.excepthook

    def hook(kind, value, tb):
        sys.stderr.write(f"[rank {comm.rank}/{comm.size}] uncaught exception, aborting all ranks:\n")
        prev(kind, value, tb)
        sys.stderr.flush()
        comm.abort(1)
    sys.excepthook = hook


def abort(comm: MPIComm, exc: BaseException) -> None:
    """Print `exc` with this rank's number and end every rank (MPI_Abort): a rank that fails while the
    others wait in a collective must not leave them hanging."""
    msg = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    sys.stderr.write(f"[rank {comm.rank}/{comm.size}] training failed, aborting all ranks:\n{msg}")
    sys.stderr.flush()
    comm.abort(1)


def raise_on_all(comm: MPIComm, fn):
    """fn() on rank 0, its result broadcast to every rank; an exception it raises is raised on every rank
    (so a bad resume argument is a clean error everywhere, not a hang)."""
    payload = None
    if comm.rank == 0:
        try:
            payload = (True, fn())
        except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
            payload = (False, exc)
    ok, val = comm.bcast(payload)
    if not ok:
        try:
            val._qlora_all_ranks = True
        except AttributeError:
            pass
        raise val
    return val


def raised_on_all(exc: BaseException) -> bool:
    """True for an exception raise_on_all raised identically on every rank."""
    return bool(getattr(exc, "_qlora_all_ranks", False))
