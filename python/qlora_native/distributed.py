"""Data-parallel LoRA training over MPI (CPU ranks), loaded only when asked for.

    mpiexec -n 4 qlora-native train --model ... --data train.jsonl --output out
    mpiexec -n 4 python my_training_script.py          # Trainer(...).train(), unchanged

Each rank runs the whole model on its own shard of every global batch (per_device_train_batch_size
x world_size rows, built identically on every rank from the same seed); the engine's step
(Model.train_step, lora_setup.cpp lora_train_step) sums the counted tokens, the losses and the one
contiguous LoRA gradient buffer over the ranks, so N ranks x batch b take exactly the steps of one
process with batch N x b (up to fp32 summation order). mpi4py is an optional dependency
(pip install qlora-native[mpi]); nothing here is imported by a single-process run.

GPU ranks (a model on a cuda backend, one GPU per rank: local_backend() gives cuda:<local rank>) reduce
the gradient buffer with NCCL on the device instead (NCCLComm; MPIComm.reducer_for picks it), bootstrapped
through MPI as llm.c does: rank 0 makes the NCCL unique id, MPI broadcasts it, every rank joins. NCCL is
loaded only then (dlopen of libnccl.so.2: $QLORA_NCCL_LIBRARY, the nvidia-nccl-cu13 wheel, the system).
"""
from __future__ import annotations

import os
import sys
import time
import traceback

__all__ = ["MPIComm", "NCCLComm", "launcher_world_size", "wanted", "init", "shard", "abort", "MPI_INSTALL",
           "NCCL_INSTALL", "local_rank", "local_backend", "uses_nccl", "load_nccl", "nccl_library_candidates"]

MPI_INSTALL = "pip install qlora-native[mpi]"
NCCL_INSTALL = "pip install nvidia-nccl-cu13 (or qlora-native[nccl])"
# A rank's index among the ranks of its node, as the launchers announce it: MPICH / Intel MPI (hydra),
# Open MPI, MVAPICH2, Slurm's srun.
_LOCAL_ENV = ("MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
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

    def local_rank(self) -> int:
        """This rank's index among the ranks of its node (MPI's shared-memory split)."""
        return self.comm.Split_type(self._MPI.COMM_TYPE_SHARED).Get_rank()

    def reducer_for(self, model):
        """The reducer of a step of `model`: this communicator (MPI on host arrays) for CPU backends; for a
        model on a cuda backend an NCCLComm over the same ranks (made on the first call, which every rank
        makes together: Model.train_step calls it)."""
        backend = str(getattr(model, "backend", "cpu"))
        if not uses_nccl(backend):
            return self
        cache = self.__dict__.setdefault("_nccl", {})
        if backend not in cache:
            cache[backend] = NCCLComm(self, backend)
        return cache[backend]

    def abort(self, code: int = 1) -> None:
        # A moment for the launcher to forward this rank's last stderr lines: MPICH's hydra can kill every
        # rank and exit before it relays them (seen once under load in CI: an abort with empty stderr).
        time.sleep(0.5)
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


# ---------------------------------------------------------------- GPU ranks: NCCL
def uses_nccl(backend: str) -> bool:
    """True for the backends whose gradient buffer lives on a GPU (reduced over NCCL)."""
    return isinstance(backend, str) and (backend == "cuda" or backend.startswith("cuda:"))


def local_rank(comm: MPIComm | None = None) -> int:
    """This rank's index among the ranks of its node: the launcher's variable (MPI_LOCALRANKID,
    OMPI_COMM_WORLD_LOCAL_RANK, MV2_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID), else MPI's shared-memory split of
    `comm` (default: init()'s), else 0 outside a launcher."""
    for var in _LOCAL_ENV:
        v = os.environ.get(var)
        if v is not None:
            try:
                r = int(v)
            except ValueError:
                raise ValueError(f"environment variable {var}={v!r} is not an integer") from None
            if r < 0:
                raise ValueError(f"environment variable {var}={v!r} is negative")
            return r
    if comm is None:
        comm = init(None)
    return 0 if comm is None else comm.local_rank()


def local_backend(name: str = "cuda", comm: MPIComm | None = None, device_count: int | None = None) -> str:
    """The backend a rank uses: "cuda" under a launcher with several ranks is cuda:<local rank>, one GPU
    per rank (ValueError when the node runs more ranks than it has GPUs); any other name is returned as
    given ("cuda:N" too: the user chose the device)."""
    if name != "cuda" or not wanted(None):
        return name
    if device_count is None:
        from . import _core

        device_count = _core.cuda_device_count()
    lr = local_rank(comm)
    if lr >= device_count:
        raise ValueError(f"rank with local index {lr} has no GPU of its own: this node has {device_count} visible "
                         f"GPU(s); run at most one rank per GPU (mpiexec -n <GPUs>) or choose the backend per rank")
    return f"cuda:{lr}"


def nccl_library_candidates() -> list[str]:
    """Where libnccl is looked for, in order: $QLORA_NCCL_LIBRARY (then only it), the nvidia-nccl-cu13
    wheel's lib directory, the system loader path (libnccl.so.2)."""
    env = os.environ.get("QLORA_NCCL_LIBRARY")
    if env:
        return [env]
    out = []
    try:
        import nvidia.nccl as wheel  # the nvidia-nccl-cu13 wheel (a namespace package: no __file__)

        for d in list(getattr(wheel, "__path__", [])):
            p = os.path.join(d, "lib", "libnccl.so.2")
            if os.path.exists(p):
                out.append(p)
    except ImportError:
        pass
    out.append("libnccl.so.2")
    return out


def load_nccl() -> tuple[str, int]:
    """Loads libnccl once (dlopen; never linked into the module): (path, version). ImportError naming the
    paths tried and `pip install nvidia-nccl-cu13` when it cannot be loaded, or saying that this build
    of qlora_native has no NCCL support."""
    from . import _core

    if not _core.nccl.compiled():
        raise ImportError("GPU data-parallel training needs NCCL support, which this build of qlora_native lacks: "
                          f"build it with the CUDA backend and nccl.h present ({NCCL_INSTALL}, then reinstall; "
                          "CMake option QLORA_NCCL=ON makes a missing header an error)")
    path, version = _core.nccl.load(nccl_library_candidates())
    return str(path), int(version)


def _nccl_timeout() -> float:
    v = os.environ.get("QLORA_NCCL_TIMEOUT", "600")
    try:
        t = float(v)
    except ValueError:
        raise ValueError(f"environment variable QLORA_NCCL_TIMEOUT={v!r} is not a number of seconds") from None
    if not t >= 0 or t == float("inf"):
        raise ValueError(f"environment variable QLORA_NCCL_TIMEOUT={v!r} must be >= 0 seconds (0: no limit)")
    return t


def _on_every_rank(mpi: MPIComm, fn, what: str):
    """fn() on every rank; when it raises on any rank, every rank raises (the first failing rank's exception
    type and message, naming that rank) instead of the others waiting in the next collective."""
    try:
        val, err = fn(), None
    except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
        val, err = None, exc
    errs = mpi.allgather(None if err is None else (type(err).__name__, str(err)))
    bad = [(r, e) for r, e in enumerate(errs) if e is not None]
    if bad:
        r, (kind, msg) = bad[0]
        cls = {"ImportError": ImportError, "ValueError": ValueError}.get(kind, RuntimeError)
        exc = cls(f"{what} failed on rank {r} of {mpi.size}: {msg}")
        exc._qlora_all_ranks = True
        raise exc from err
    return val


class NCCLComm:
    """The reducer of GPU ranks: sum_grads on the device through NCCL (Model.train_step hands `nccl`, a
    _core.nccl.Comm, to the engine's step, which all-reduces the adapter's contiguous gradient buffer in
    place on the model's stream without the GIL); sum_scalars and everything else through the MPI
    communicator. Made by MPIComm.reducer_for on every rank together: each rank loads NCCL (all raise if
    one cannot), ranks must sit on distinct GPUs, rank 0 makes the unique id, MPI broadcasts it, every
    rank joins (waits longer than QLORA_NCCL_TIMEOUT seconds, default 600, abort and raise)."""

    def __init__(self, mpi: MPIComm, backend: str):
        import socket

        from . import _core

        if not uses_nccl(backend):
            raise ValueError(f"NCCLComm needs a model on a cuda backend, got backend {backend!r}")
        self.mpi, self.rank, self.size, self.backend = mpi, mpi.rank, mpi.size, backend
        timeout = _nccl_timeout()
        self.library = _on_every_rank(mpi, load_nccl, "loading NCCL")
        dev = int(backend.split(":", 1)[1]) if ":" in backend else 0
        where = mpi.allgather((socket.gethostname(), dev))
        for r, w in enumerate(where):
            if w in where[:r]:
                raise ValueError(f"ranks {where.index(w)} and {r} both use GPU {w[1]} of host {w[0]}: NCCL needs one "
                                 f"GPU per rank (load each rank's model on distributed.local_backend('cuda'))")
        uid = raise_on_all(mpi, _core.nccl.unique_id)  # llm.c's bootstrap: rank 0's id over MPI
        self.nccl = _core.nccl.Comm(backend, uid, self.rank, self.size, timeout)
        # Freed while the CUDA runtime is still up (not at module teardown), without waiting for peers.
        import atexit

        atexit.register(self.nccl.abort)

    @property
    def allreduce_seconds(self) -> float:
        return float(self.nccl.seconds)

    @property
    def allreduce_bytes(self) -> int:
        return int(self.nccl.bytes)

    @property
    def allreduce_calls(self) -> int:
        return int(self.nccl.calls)

    def sum_scalars(self, v) -> None:
        self.mpi.sum_scalars(v)

    def sum_grads(self, g) -> None:
        raise RuntimeError("NCCLComm.sum_grads: the gradient buffer of a cuda model is reduced on the device "
                           "through .nccl by the engine's step, not from a host array")

    def reducer_for(self, model):
        if str(getattr(model, "backend", "")) != self.backend:
            raise ValueError(f"this NCCL communicator runs on backend {self.backend!r}, the model on "
                             f"{getattr(model, 'backend', None)!r}")
        return self

    def bcast(self, obj, root: int = 0):
        return self.mpi.bcast(obj, root=root)

    def allgather(self, obj) -> list:
        return self.mpi.allgather(obj)

    def barrier(self) -> None:
        self.mpi.barrier()

    def abort(self, code: int = 1) -> None:
        self.nccl.abort()
        self.mpi.abort(code)

    def close(self) -> None:
        """Frees the NCCL communicator (every rank together)."""
        self.nccl.close()
