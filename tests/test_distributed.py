"""Data-parallel LoRA training over MPI (qlora_native.distributed, issue 16): 2 ranks x batch b train the
adapter of 1 rank x batch 2b; resume across a change of rank count; a failing rank ends every rank;
a plain run never imports mpi4py. Each 2-rank run is `mpiexec -n 2 python tests/dist_worker.py`.

The equivalence bound, derived from the fp32 reduction order (not tuned). Both runs compute the same
real-number sums; they differ only in the order of fp32 additions: one rank sums the per-token terms
of a gradient element in one GEMM, two ranks sum each shard and add the two partial sums (the
all-reduce). Two orders of a sum of n fp32 terms differ by at most 2 (n-1) u sum|t| (u = 2^-24,
Higham, Accuracy and Stability, 4.2); with n = the step's counted tokens and sum|t| <= n max|t| and the
per-token term bounded by the step's gradient norm (stated assumption: no token's term exceeds the
whole gradient's 2-norm), the gradient difference of step s is at most e_s = 2 (n_s - 1) u n_s |g_s|.
AdamW maps it to the parameters with a derivative at most 2 lr / eps per element when |g| << eps
(update lr m / (sqrt(v) + eps); the test uses eps = 10 so that this holds: with the default eps = 1e-8 the
update is ~lr sign(g) and a rounding flip of a tiny g moves that element by 2 lr, so no elementwise
bound exists). Summed over the steps (first order: the feedback of the parameter difference into
later gradients is of relative size lr / eps x curvature, negligible here): |dtheta| <= sum_s 2 (lr /
eps) e_s. The loss of step s differs by at most 2 (n_s - 1) u L_s + |g_s| sqrt(P) |dtheta_{s-1}|."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

from qlora_native.data import IGNORE_INDEX

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "dist_worker.py")
ROOT = os.path.dirname(HERE)
U = 2.0 ** -24


def _mpiexec():
    exe = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return exe if os.path.exists(exe) else shutil.which("mpiexec")


def _need_mpi():
    pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install qlora-native[mpi]; CI installs it)")
    if _mpiexec() is None:
        pytest.skip("no mpiexec on PATH (pip install mpich)")


def _env():
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PMI_", "OMPI_", "MV2_", "PMIX_", "MPI_LOCAL", "HYDRA_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)  # the build this pytest imports
    return env


def _run(spec, tmp, name, n=None, timeout=120, check=True):
    spec_path = os.path.join(tmp, f"{name}.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    cmd = [sys.executable, WORKER, spec_path]
    if n is not None:
        cmd = [_mpiexec(), "-n", str(n)] + cmd
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)
    p.seconds = time.perf_counter() - t0
    if check:
        assert p.returncode == 0, f"{name}: exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-5000:]}"
    return p


def _result(out_dir):
    with np.load(os.path.join(out_dir, "result.npz")) as z:
        ab = {k: z[k] for k in z.files}
    with open(os.path.join(out_dir, "summary.json")) as f:
        summary = json.load(f)
    return ab, summary, None


def _examples(rng, n, V, lo=4, hi=14):
    """Rows of varied length with -100 prompt labels (uneven counted tokens per row and shard)."""
    out = []
    for _ in range(n):
        L = int(rng.integers(lo, hi + 1))
        ids = rng.integers(0, V, L).tolist()
        p = int(rng.integers(1, L - 1))
        out.append([ids, [IGNORE_INDEX] * p + ids[p:]])
    return out


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint

    tmp = tmp_path_factory.mktemp("dist")
    rng = np.random.default_rng(16)
    path, _, _ = make_checkpoint(tmp, rng, vocab=64, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    # 13 rows, global batch 6: batches of 6, 6, 1 rows (the last: 1 row on rank 0, none on rank 1)
    return tmp, str(path), _examples(rng, 13, 64)


LR, EPS = 0.5, 10.0  # lr / eps = 0.05: AdamW ~ SGD with step 0.05 (|g| << eps)


def _spec(setup, out, per_device, dropout=0.0, **kw):
    tmp, path, ex = setup
    args = dict(output_dir=os.path.join(tmp, out), learning_rate=LR, max_steps=-1, num_train_epochs=2,
                per_device_train_batch_size=per_device, gradient_accumulation_steps=2, logging_steps=1,
                save_steps=2, disable_tqdm=True, seed=5, max_seq_len=16, lr_scheduler_type="constant",
                adam_epsilon=EPS, max_grad_norm=None)
    args.update(kw.pop("args", {}))
    lora = dict(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear")
    return dict(model=path, examples=ex, args=args, lora=lora, **kw)


def _bounds(log):
    """Per-step loss bounds and the final parameter bound (module docstring) from the reference run's
    log: counted tokens n_s, loss L_s and gradient norm |g_s| of every step."""
    dtheta, loss_tol = 0.0, []
    for r in log:
        n, L, g = r["tokens"], r["loss"], r["grad_norm"]
        loss_tol.append(2 * (n - 1) * U * L + g * r["sqrt_p"] * dtheta)
        e = 2 * (n - 1) * U * n * g
        dtheta += 2 * (LR / EPS) * e
    return loss_tol, dtheta


def _log_steps(out_dir, n_params):
    """Per-step loss, gradient norm and counted tokens (logging_steps=1)."""
    with open(os.path.join(out_dir, "trainer_log.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [r for r in log if "loss" in r and "final" not in r]
    return [{"loss": r["loss"], "grad_norm": r["grad_norm"], "tokens": r["loss_tokens"],
             "sqrt_p": n_params ** 0.5} for r in steps]


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _check_equal_runs(ref_dir, dp_dir):
    ab1, s1, _ = _result(ref_dir)
    ab2, s2, _ = _result(dp_dir)
    assert s1["global_step"] == s2["global_step"] and s1["train_tokens"] == s2["train_tokens"], (s1, s2)
    n_params = sum(v.size for v in ab1.values())
    l1, l2 = _log_steps(ref_dir, n_params), _log_steps(dp_dir, n_params)
    assert len(l1) == len(l2) == s1["global_step"]
    assert [r["tokens"] for r in l1] == [r["tokens"] for r in l2]
    loss_tol, theta_tol = _bounds(l1)
    for s, (a, b, tol) in enumerate(zip(l1, l2, loss_tol)):
        assert abs(a["loss"] - b["loss"]) <= tol, f"step {s + 1}: loss {a['loss']} vs {b['loss']} (bound {tol:.3g})"
    d = _max_diff(ab1, ab2)
    print(f"{dp_dir}: max |dA/dB| {d:.3g}, derived bound {theta_tol:.3g}")
    assert d <= theta_tol, f"final A/B differ by {d:.3g} > derived bound {theta_tol:.3g}"
    # the bound is far below what training moved (B starts at 0): it can tell a wrong step apart
    moved = max(float(np.max(np.abs(v))) for k, v in ab1.items() if "lora_B" in k)
    assert moved > 100 * theta_tol, (moved, theta_tol)
    return s1, s2


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_two_ranks_equal_one_rank_with_double_batch(setup, dropout):
    """13 rows, global batch 6 (2 ranks x 3 or 1 x 6), accumulation 2, 2 epochs -> 4 steps; the last
    batch of each epoch is 1 row: rank 1 holds nothing of it. -100 prompt labels, ragged rows."""
    _need_mpi()
    tmp = setup[0]
    one = _spec(setup, f"one{dropout}", per_device=6, dropout=dropout)
    two = _spec(setup, f"two{dropout}", per_device=3, dropout=dropout)
    _run(one, tmp, f"one{dropout}")
    _run(two, tmp, f"two{dropout}", n=2)
    s1, s2 = _check_equal_runs(one["args"]["output_dir"], two["args"]["output_dir"])
    assert s1["world_size"] == 1 and s2["world_size"] == 2 and s1["global_step"] == 4
    assert not s1["mpi4py_loaded"], "a plain (one-process) run imported mpi4py"
    assert s2["mpi4py_loaded"]


def test_resume_across_a_change_of_rank_count(setup):
    """checkpoint-2 of the 2-rank run resumed by 1 rank, and of the 1-rank run by 2 ranks, both equal the
    uninterrupted run; a different global batch is refused naming both."""
    _need_mpi()
    tmp = setup[0]
    ref = _spec(setup, "one0.0", per_device=6)
    if not os.path.exists(os.path.join(ref["args"]["output_dir"], "result.npz")):
        _run(ref, tmp, "one0.0")
        _run(_spec(setup, "two0.0", per_device=3), tmp, "two0.0", n=2)
    for src, per_device, n, name in (("two0.0", 6, None, "r21"), ("one0.0", 3, 2, "r12")):
        out = os.path.join(tmp, name)
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(os.path.join(tmp, src, "checkpoint-2"), os.path.join(out, "checkpoint-2"))
        spec = _spec(setup, name, per_device=per_device, resume=True)
        _run(spec, tmp, name, n=n)
        _check_equal_runs(ref["args"]["output_dir"], out)
    bad = _spec(setup, "r21", per_device=4, resume=os.path.join(tmp, "two0.0", "checkpoint-2"))
    p = _run(bad, tmp, "bad", check=False, timeout=60)
    assert p.returncode != 0
    assert "global batch of 6 rows (2 rank(s) x 3)" in p.stderr and "this run has 4" in p.stderr, p.stderr[-2000:]


def test_failing_rank_ends_every_rank(setup):
    _need_mpi()
    tmp = setup[0]
    spec = _spec(setup, "fail", per_device=3, fail_rank=1)
    t0 = time.perf_counter()
    p = _run(spec, tmp, "fail", n=2, check=False, timeout=60)
    dt = time.perf_counter() - t0
    assert p.returncode != 0
    assert "[rank 1/2]" in p.stderr and "injected failure on rank 1" in p.stderr, p.stderr[-3000:]
    assert dt < 30, f"the ranks took {dt:.1f}s to end"


def test_plain_run_never_imports_mpi4py_and_missing_mpi4py_is_named(tmp_path):
    """distributed=True without mpi4py: ImportError naming the extra; the default (no launcher): no import."""
    code = r"""
import sys
sys.modules["mpi4py"] = None  # as if not installed
import qlora_native
from qlora_native.trainer import TrainingArguments
from qlora_native import distributed
assert distributed.wanted(None) is False  # no launcher in the environment
try:
    distributed.init(True)
except ImportError as e:
    print("ERR", e)
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=_env())
    assert p.returncode == 0, p.stderr
    assert "ERR distributed training needs mpi4py" in p.stdout and "pip install qlora-native[mpi]" in p.stdout
    env = _env()
    env["PMI_SIZE"], env["PMI_RANK"] = "2", "0"  # a launcher said 2 ranks: auto mode wants MPI
    code2 = "from qlora_native import distributed; print(distributed.wanted(None), distributed.launcher_world_size())"
    p = subprocess.run([sys.executable, "-c", code2], capture_output=True, text=True, timeout=60, env=env)
    assert p.stdout.split() == ["True", "2"], p.stderr


def test_cli_train_under_mpiexec(tmp_path, setup):
    """`mpiexec -n 2 qlora-native train ...` needs no flag: 2 ranks train, rank 0 alone reports and saves."""
    _need_mpi()
    from helpers_model import make_checkpoint
    from helpers_tokenizer import train_sentencepiece

    rng = np.random.default_rng(7)
    sp = train_sentencepiece(tmp_path, vocab_size=1000)
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=1000, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    shutil.copy(sp, os.path.join(path, "tokenizer.model"))
    words = ["the old house", "a red fox", "blue water", "green hills", "quiet night"]
    data = tmp_path / "d.jsonl"
    with open(data, "w") as f:
        for _ in range(20):
            f.write(json.dumps({"prompt": words[int(rng.integers(5))] + " ->",
                                "completion": " " + words[int(rng.integers(5))]}) + "\n")
    out = tmp_path / "out"
    cmd = [_mpiexec(), "-n", "2", sys.executable, "-m", "qlora_native", "train", "--model", path, "--data", str(data),
           "--output", str(out), "--max-steps", "3", "--batch-size", "2", "--save-steps", "3", "--r", "4",
           "--eval-fraction", "0.2", "--target-modules", "q_proj,v_proj", "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.count("3 steps,") == 1, p.stdout  # one summary: rank 0's
    with open(out / "checkpoint-3" / "trainer_state.json") as f:
        st = json.load(f)
    assert st["world_size"] == 2 and st["global_batch_size"] == 4
    assert os.path.exists(out / "adapter_model.safetensors")


def test_uncaught_error_outside_the_trainer_ends_every_rank(tmp_path):
    """After distributed.init, an exception no code catches on rank 1 (while rank 0 waits in a collective)
    ends both ranks."""
    _need_mpi()
    script = tmp_path / "s.py"
    script.write_text("from qlora_native import distributed\n"
                      "c = distributed.init(True)\n"
                      "if c.rank == 1:\n    raise ValueError('bad input on rank 1')\n"
                      "c.barrier()\n")
    t0 = time.perf_counter()
    p = subprocess.run([_mpiexec(), "-n", "2", sys.executable, str(script)], capture_output=True, text=True,
                       timeout=60, env=_env(), cwd=ROOT)
    assert p.returncode != 0 and "bad input on rank 1" in p.stderr and "[rank 1/2]" in p.stderr, p.stderr
    assert time.perf_counter() - t0 < 30


def test_ranks_that_disagree_are_refused(setup):
    """A rank started with another seed (another adapter init and data order): a ValueError on every rank
    naming the difference, before any step, instead of mixing two models' gradients."""
    _need_mpi()
    spec = _spec(setup, "disagree", per_device=3, rank_args={"1": {"seed": 6}})
    p = _run(spec, setup[0], "disagree", n=2, check=False, timeout=60)
    assert p.returncode != 0
    assert "data-parallel ranks disagree on adapter A/B" in p.stderr, p.stderr[-3000:]
    assert not os.path.exists(os.path.join(spec["args"]["output_dir"], "checkpoint-2"))
