"""GPU data parallel over NCCL (issue 16, GPU half): qlora_native.distributed bootstraps an NCCL
communicator through MPI and Model.train_step reduces a cuda model's gradient buffer on the device
(_core.nccl.Comm). On CPU CI: the module imports without NCCL, the loader's errors name the library
and `pip install nvidia-nccl-cu13`, the reducer and device selection. With >= 2 GPUs (tools/device-check):
an all-reduce across two GPUs and 2 GPU ranks x batch b == 1 GPU x batch 2b (same derived bound as
tests/test_distributed.py). The GPU cases have never run (no GPU where they were written)."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from qlora_native import _core, distributed

HERE = os.path.dirname(os.path.abspath(__file__))


def _env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "MV2_", "PMIX_", "MPI_LOCAL", "HYDRA_", "SLURM_", "QLORA_NCCL"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the build this pytest imports
    env.update(extra)
    return env


def _py(code, timeout=60, **env):
    """Runs `code` in a fresh interpreter (NCCL loads once per process: each case needs its own)."""
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                       timeout=timeout, env=_env(**env))
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def _need_compiled():
    if not _core.nccl.compiled():
        pytest.skip("this build has no NCCL support (CUDA off or no nccl.h at build time)")


# ---------------------------------------------------------------- CPU: loading
def test_module_imports_without_loading_nccl():
    """Importing qlora_native and qlora_native.distributed loads neither libnccl nor the wheel's package."""
    out = _py("""
        import sys
        import qlora_native, qlora_native.distributed
        from qlora_native import _core
        maps = open("/proc/self/maps").read()
        print(_core.nccl.loaded(), "libnccl" in maps, "nvidia.nccl" in sys.modules, "mpi4py" in sys.modules)
    """)
    assert out.split() == ["False", "False", "False", "False"], out


def test_missing_library_is_a_clear_import_error():
    missing = "/nonexistent/dir/libnccl.so.2"
    out = _py("""
        from qlora_native import _core, distributed
        try:
            distributed.load_nccl()
        except ImportError as e:
            print("IMPORTERROR", e)
        print("LOADED", _core.nccl.loaded())
    """, QLORA_NCCL_LIBRARY=missing)
    assert "IMPORTERROR" in out and "LOADED False" in out, out
    assert "pip install nvidia-nccl-cu13" in out, out
    if _core.nccl.compiled():  # the explicit path is the only one tried, with the loader's reason
        assert missing in out and "No such file" in out and "QLORA_NCCL_LIBRARY" in out, out
    else:
        assert "lacks" in out, out


def test_not_an_nccl_library_is_refused(tmp_path):
    """A shared library without NCCL's functions, and a file that is no library at all: ImportError naming
    each path and why, nothing loaded."""
    _need_compiled()
    junk = tmp_path / "libnccl.so.2"
    junk.write_text("not an ELF file\n")
    out = _py(f"""
        from qlora_native import _core
        try:
            _core.nccl.load(["libm.so.6", {str(junk)!r}])
        except ImportError as e:
            print("IMPORTERROR", e)
        print("LOADED", _core.nccl.loaded())
    """)
    assert "IMPORTERROR" in out and "LOADED False" in out, out
    assert "libm.so.6: not an NCCL 2.14+ library (missing ncclGetVersion" in out, out
    assert f"{junk}:" in out and "pip install nvidia-nccl-cu13" in out, out


def test_wheel_library_loads_without_a_gpu():
    """With the nvidia-nccl-cu13 wheel (CI installs it for the CUDA build) the search finds its library:
    dlopen and ncclGetVersion need no GPU."""
    _need_compiled()
    pytest.importorskip("nvidia.nccl", reason="the nvidia-nccl-cu13 wheel is not installed")
    out = _py("""
        from qlora_native import distributed
        cands = distributed.nccl_library_candidates()
        path, version = distributed.load_nccl()
        print(path == cands[0], "nvidia/nccl/lib" in path, version >= 21400, cands[-1])
    """)
    assert out.split() == ["True", "True", "True", "libnccl.so.2"], out


def test_candidates_order(monkeypatch):
    monkeypatch.setenv("QLORA_NCCL_LIBRARY", "/opt/x/libnccl.so.2")
    assert distributed.nccl_library_candidates() == ["/opt/x/libnccl.so.2"]  # explicit: only it
    monkeypatch.delenv("QLORA_NCCL_LIBRARY")
    monkeypatch.setitem(sys.modules, "nvidia.nccl", None)  # no wheel: the system loader only
    assert distributed.nccl_library_candidates() == ["libnccl.so.2"]


def test_comm_needs_a_cuda_backend():
    if not _core.nccl.compiled():
        with pytest.raises(ImportError, match="not compiled"):
            _core.nccl.Comm("cpu", b"\0" * 128, 0, 1)
        return
    with pytest.raises(ValueError, match="backend 'cpu' is not a CUDA backend"):
        _core.nccl.Comm("cpu", b"\0" * _core.nccl.unique_id_bytes(), 0, 1)


def test_timeout_env(monkeypatch):
    monkeypatch.setenv("QLORA_NCCL_TIMEOUT", "soon")
    with pytest.raises(ValueError, match="QLORA_NCCL_TIMEOUT"):
        distributed._nccl_timeout()
    monkeypatch.setenv("QLORA_NCCL_TIMEOUT", "-1")
    with pytest.raises(ValueError, match=">= 0"):
        distributed._nccl_timeout()
    monkeypatch.setenv("QLORA_NCCL_TIMEOUT", "0")
    assert distributed._nccl_timeout() == 0.0


# ---------------------------------------------------------------- CPU: selection
def _fake_mpi(rank=0, size=2, gathered=None):
    c = object.__new__(distributed.MPIComm)
    c.rank, c.size = rank, size
    c.allreduce_seconds, c.allreduce_bytes, c.allreduce_calls = 0.0, 0, 0
    c.allgather = (lambda obj: gathered) if gathered is not None else (lambda obj: [obj] * size)
    return c


def test_reducer_selection(monkeypatch):
    """MPI for host backends, one NCCLComm per cuda backend (made once, on the first step)."""
    made = []

    class FakeNCCL:
        def __init__(self, mpi, backend):
            made.append((mpi, backend))
    monkeypatch.setattr(distributed, "NCCLComm", FakeNCCL)
    c = _fake_mpi()
    for be in ("cpu", "cpu:avx2", "cpu:devsim"):
        assert c.reducer_for(types.SimpleNamespace(backend=be)) is c
    assert made == []
    r1 = c.reducer_for(types.SimpleNamespace(backend="cuda:1"))
    r2 = c.reducer_for(types.SimpleNamespace(backend="cuda:1"))
    assert isinstance(r1, FakeNCCL) and r1 is r2 and made == [(c, "cuda:1")]
    assert distributed.uses_nccl("cuda") and not distributed.uses_nccl("cpu:devsim")


def test_nccl_comm_refuses_host_backend_and_other_model():
    with pytest.raises(ValueError, match="cuda backend"):
        distributed.NCCLComm(_fake_mpi(), "cpu")
    n = object.__new__(distributed.NCCLComm)
    n.backend = "cuda:0"
    with pytest.raises(ValueError, match="'cuda:0', the model on 'cuda:1'"):
        n.reducer_for(types.SimpleNamespace(backend="cuda:1"))
    with pytest.raises(RuntimeError, match="on the device"):
        n.sum_grads(np.zeros(3, np.float32))


def test_failure_on_another_rank_raises_here():
    """A rank that cannot load NCCL makes every rank raise (no rank left waiting for the unique id)."""
    c = _fake_mpi(rank=0, gathered=[None, ("ImportError", "libnccl.so.2: cannot open")])
    with pytest.raises(ImportError, match="loading NCCL failed on rank 1 of 2: libnccl.so.2: cannot open") as e:
        distributed._on_every_rank(c, lambda: ("x", 1), "loading NCCL")
    assert distributed.raised_on_all(e.value)
    assert distributed._on_every_rank(_fake_mpi(), lambda: 7, "x") == 7


def test_local_rank_and_backend(monkeypatch):
    for k in list(os.environ):
        if k.startswith(("PMI_", "OMPI_", "MV2_", "MPI_LOCAL", "SLURM_")):
            monkeypatch.delenv(k)
    assert distributed.local_backend("cuda", device_count=4) == "cuda"  # no launcher: unchanged
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert distributed.local_rank() == 1
    assert distributed.local_backend("cuda", device_count=2) == "cuda:1"
    assert distributed.local_backend("cuda:0", device_count=2) == "cuda:0"  # chosen by the user
    assert distributed.local_backend("cpu", device_count=2) == "cpu"
    with pytest.raises(ValueError, match="local index 1 has no GPU of its own: this node has 1"):
        distributed.local_backend("cuda", device_count=1)
    monkeypatch.delenv("MPI_LOCALRANKID")
    monkeypatch.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "x")
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_LOCAL_RANK"):
        distributed.local_rank()


def test_cli_backend_one_gpu_per_rank(monkeypatch):
    from qlora_native.cli_train import resolve_backend

    for k in list(os.environ):
        if k.startswith(("PMI_", "OMPI_", "MV2_", "MPI_LOCAL", "SLURM_")):
            monkeypatch.delenv(k)
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 2)
    assert resolve_backend("auto") == "cuda"
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("MPI_LOCALRANKID", "1")
    assert resolve_backend("auto") == "cuda:1" and resolve_backend("cuda") == "cuda:1"
    assert resolve_backend("cpu") == "cpu"
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 0)
    assert resolve_backend("auto") == "cpu"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from helpers_model import make_checkpoint
    from qlora_native import LoraConfig, Model

    rng = np.random.default_rng(3)
    path, _, _ = make_checkpoint(tmp_path_factory.mktemp("nccl"), rng, vocab=32, hidden=16, inter=32, layers=1,
                                 heads=2, kv_heads=1)
    m = Model.from_pretrained(str(path), tokenizer=None)
    m.add_adapter("a", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    m.configure_optimizer(lr=1e-3)
    ids = rng.integers(0, 32, (1, 6)).astype(np.int32)
    return m, [(ids, ids.copy(), None)]


class _OneRank:
    """A one-rank reducer (sums are the identity) that records reducer_for."""

    def __init__(self, nccl=None):
        self.seen, self.nccl = [], nccl

    def sum_scalars(self, v):
        pass

    def sum_grads(self, g):
        pass

    def reducer_for(self, model):
        self.seen.append(model.backend)
        return self


def test_train_step_asks_the_comm_for_the_model_reducer(tiny):
    m, mb = tiny
    c = _OneRank()
    r = m.train_step(mb, comm=c)
    assert r["stepped"] and c.seen == [m.backend]


def test_train_step_refuses_a_bad_nccl_attribute(tiny):
    m, mb = tiny
    with pytest.raises(ValueError, match="comm.nccl must be None or a qlora_native._core.nccl.Comm"):
        m.train_step(mb, comm=_OneRank(nccl="not a communicator"))


# ---------------------------------------------------------------- GPU: two ranks on two GPUs
def _need_two_gpus():
    """Skips without 2 GPUs; tools/device-check sets QLORA_REQUIRE_NCCL on a machine with them, where a
    missing mpi4py, NCCL build or library is then a failure, not a skip."""
    from test_distributed import _need_mpi

    if _core.cuda_device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {_core.cuda_device_count()} visible (tools/device-check runs it on such a machine)")
    try:
        _need_mpi()
        _need_compiled()
        try:
            _py("from qlora_native import distributed; distributed.load_nccl()")
        except AssertionError as e:
            pytest.skip(f"NCCL cannot be loaded: {str(e)[-300:]}")
    except pytest.skip.Exception as e:
        if os.environ.get("QLORA_REQUIRE_NCCL"):
            pytest.fail(f"QLORA_REQUIRE_NCCL: {e}")
        raise


def test_allreduce_two_gpus(tmp_path):
    _need_two_gpus()
    from test_distributed import _mpiexec

    script = tmp_path / "ar.py"
    script.write_text(textwrap.dedent("""
        import numpy as np
        from qlora_native import distributed
        comm = distributed.init(True)
        be = distributed.local_backend("cuda")
        n = distributed.NCCLComm(comm, be)
        x = np.arange(1 << 20, dtype=np.float32) * (comm.rank + 1)
        y = n.nccl.all_reduce_host(x)
        assert np.array_equal(y, np.arange(1 << 20, dtype=np.float32) * 3), (comm.rank, y[:4])
        assert n.allreduce_calls == 1 and n.allreduce_bytes == 4 << 20
        n.close()
        print("rank", comm.rank, be, "ok")
    """))
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=180, env=_env())
    assert p.returncode == 0, p.stderr[-4000:]
    assert "rank 0 cuda:0 ok" in p.stdout and "rank 1 cuda:1 ok" in p.stdout, p.stdout


def test_two_gpu_ranks_equal_one_gpu_with_double_batch(tmp_path):
    """tests/test_distributed.py's equivalence on GPUs: 2 ranks (cuda:0, cuda:1, NCCL) x batch 3 against 1
    GPU x batch 6 (ragged rows, -100 labels, a last batch rank 1 holds nothing of), fp32 compute, the
    bound derived from the fp32 reduction order."""
    _need_two_gpus()
    import test_distributed as td
    from helpers_model import make_checkpoint

    rng = np.random.default_rng(16)  # test_distributed's setup fixture
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=64, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    setup = (tmp_path, str(path), td._examples(rng, 13, 64))
    tmp = setup[0]
    one = td._spec(setup, "gpu_one", per_device=6, backend="cuda")
    two = td._spec(setup, "gpu_two", per_device=3, backend="cuda")
    td._run(one, tmp, "gpu_one", timeout=300)
    td._run(two, tmp, "gpu_two", n=2, timeout=300)
    s1, s2 = td._check_equal_runs(one["args"]["output_dir"], two["args"]["output_dir"])
    assert s1["world_size"] == 1 and s2["world_size"] == 2
