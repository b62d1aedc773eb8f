"""tools/device-check on a machine without a GPU (issues 10, 11): the global budget, the step order, the
statuses and the report files. The script runs here end to end: it fails at the `gpu` step in
seconds, skips every GPU step with the reason, and still writes device-check.json / .txt / .log.
The build is skipped (QLORA_CHECK_SKIP_BUILD=1) and the test hooks QLORA_CHECK_TEST_DRY /
QLORA_CHECK_TEST_HANG stand in for the GPU steps and for a step that hangs, so this stays fast."""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "device-check")
STEPS = ["env", "gpu", "wheels", "build", "module", "tests", "nccl", "bench", "bench_train", "bench_cuda"]
GPU_STEPS = ["module", "tests", "nccl", "bench", "bench_train", "bench_cuda"]

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="bash script")


def _fake_nvidia_smi(folder, gpu: bool):
    """An nvidia-smi on PATH: a driver that fails (no GPU) or one H100 (compute capability 9.0)."""
    os.makedirs(folder, exist_ok=True)
    p = os.path.join(folder, "nvidia-smi")
    if gpu:
        body = ('case "$*" in *-L*) echo "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-0)";;\n'
                '*compute_cap*) echo "9.0";; *) echo "NVIDIA H100 80GB HBM3, 9.0, 81559 MiB, 580.00";; esac\n')
    else:
        body = 'echo "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2\nexit 9\n'
    with open(p, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(p, 0o755)


def run_check(tmp_path, gpu=False, timeout=60, **env):
    out = tmp_path / "out"
    fake = tmp_path / "bin"
    _fake_nvidia_smi(str(fake), gpu)
    e = dict(os.environ, PATH=f"{fake}{os.pathsep}{os.environ.get('PATH', '')}", PYTHON=sys.executable,
             QLORA_BENCH_OUT=str(out), QLORA_CHECK_SKIP_BUILD="1", QLORA_WHEELS=str(tmp_path / "no-wheels"),
             QLORA_DEVICE_BUILD=str(tmp_path / "no-build"), QLORA_CHECK_AMX="0")  # step amx: its own test
    e.update({k: str(v) for k, v in env.items()})
    t = time.monotonic()
    r = subprocess.run(["bash", SCRIPT], env=e, capture_output=True, text=True, timeout=timeout)
    wall = time.monotonic() - t
    rep = json.loads((out / "device-check.json").read_text()) if (out / "device-check.json").exists() else None
    return r, rep, wall, out


def by_step(rep):
    return {s["step"]: s for s in rep["steps"]}


def test_no_gpu_fails_fast_and_reports_every_step(tmp_path):
    r, rep, wall, out = run_check(tmp_path)
    assert rep is not None, r.stdout + r.stderr
    assert [s["step"] for s in rep["steps"]] == STEPS  # every step listed, in the order of their value
    s = by_step(rep)
    assert s["gpu"]["status"] == "failed"
    assert s["build"]["status"].startswith("skipped (QLORA_CHECK_SKIP_BUILD")
    for name in GPU_STEPS:
        assert s[name]["status"] == "skipped (no GPU)", s[name]
        assert s[name]["seconds"] == 0
    assert all(x["status"] for x in rep["steps"])
    assert rep["total_seconds"] <= rep["budget_s"] == 450
    assert wall < 30, wall  # "fails fast": no build, no test run
    assert rep["expected_total_s"] <= 6 * 60  # the estimates keep a cold run within 6 minutes
    txt = (out / "device-check.txt").read_text()
    assert "| gpu | failed |" in txt and "| bench_train | skipped (no GPU) |" in txt
    assert "NVIDIA-SMI has failed" in (out / "device-check.log").read_text()
    assert r.returncode == 1  # a failed step


def test_budget_cuts_a_hanging_step_and_skips_the_rest(tmp_path):
    # A "GPU" where every step is a no-op but the CUDA tests hang: the tests step is cut at the budget
    # (less the reserve), the benches are not started, and the report is still written in time.
    budget, reserve = 8, 3
    r, rep, wall, out = run_check(tmp_path, gpu=True, QLORA_CHECK_TEST_DRY=1, QLORA_CHECK_TEST_HANG="tests",
                                  QLORA_CHECK_TEST_MIN_S=1, QLORA_CHECK_BUDGET_S=budget, QLORA_CHECK_RESERVE_S=reserve)
    assert rep is not None, r.stdout + r.stderr
    assert [x["step"] for x in rep["steps"]] == STEPS
    s = by_step(rep)
    assert s["gpu"]["status"] == "ok" and s["module"]["status"] == "ok", rep["steps"]
    assert s["tests"]["status"] == "timeout", s["tests"]
    assert s["tests"]["limit_s"] <= budget - reserve
    assert s["nccl"]["status"].startswith("skipped (needs 2 GPUs")
    for name in ("bench", "bench_train", "bench_cuda"):
        assert s[name]["status"] == "skipped (budget)", s[name]
    assert rep["total_seconds"] <= budget
    assert wall < budget + 5, wall
    assert "skipped (budget)" in (out / "device-check.txt").read_text()
    assert r.returncode == 1


def test_all_steps_pass_in_a_dry_run(tmp_path):
    r, rep, wall, out = run_check(tmp_path, gpu=True, QLORA_CHECK_TEST_DRY=1)
    s = by_step(rep)
    assert all(s[n]["status"] == "ok" for n in ("env", "gpu", "wheels", "module", "tests", "bench", "bench_train",
                                               "bench_cuda")), rep["steps"]
    assert rep["arch"] == "sm_90"
    assert r.returncode == 2  # nothing failed, but the build was skipped (QLORA_CHECK_SKIP_BUILD)


def test_report_merges_both_test_runs(tmp_path):
    # the tests step writes two junit files (the CUDA files, then the CUDA cases of the mixed files):
    # the report adds their counts and lists the failures of both
    stub = tmp_path / "stub.sh"
    case = '<testcase classname="{c}" name="{n}"{body}'
    stub.write_text('#!/bin/sh\n[ "$1" = tests ] || exit 0\n'
                    "cat > \"$work/tests.xml\" <<'EOF'\n"
                    '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
                    + case.format(c="test_cuda_backend", n="test_a", body="/>")
                    + case.format(c="test_cuda_backend", n="test_b", body="><failure/></testcase>")
                    + '</testsuite></testsuites>\nEOF\n'
                    "cat > \"$work/tests_cuda_cases.xml\" <<'EOF'\n"
                    '<testsuites><testsuite tests="2" failures="0" errors="1" skipped="0">'
                    + case.format(c="test_head_q8", n="test_c[cuda]", body="><error/></testcase>")
                    + '</testsuite></testsuites>\nEOF\nexit 1\n')
    stub.chmod(0o755)
    r, rep, wall, out = run_check(tmp_path, gpu=True, QLORA_CHECK_TEST_DRY=1, QLORA_CHECK_TEST_STUB=stub)
    assert by_step(rep)["tests"]["status"] == "failed"
    assert rep["tests"] == {"tests": 5, "failures": 1, "errors": 1, "skipped": 1}
    assert rep["failed_tests"] == ["test_cuda_backend::test_b", "test_head_q8::test_c[cuda]"]
    txt = (out / "device-check.txt").read_text()
    assert "tests: 5 run, 1 failed, 1 errors, 1 skipped" in txt and "FAILED test_head_q8::test_c[cuda]" in txt
    assert r.returncode == 1


def test_bad_budget_is_refused(tmp_path):
    r, rep, _, _ = run_check(tmp_path, QLORA_CHECK_BUDGET_S="7m")
    assert r.returncode == 1 and rep is None
    assert "QLORA_CHECK_BUDGET_S must be a whole number" in r.stderr


def test_amx_step_follows_the_tests_where_listed(tmp_path):
    # hosts with amx_bf16 (QLORA_CHECK_AMX=1 stands in for one) run the bf16 GEMMs on real AMX tiles after the tests
    r, rep, wall, out = run_check(tmp_path, gpu=True, QLORA_CHECK_TEST_DRY=1, QLORA_CHECK_AMX=1)
    steps = [x["step"] for x in rep["steps"]]
    assert steps == STEPS[:STEPS.index("tests") + 1] + ["amx"] + STEPS[STEPS.index("tests") + 1:]
    assert by_step(rep)["amx"]["status"] == "ok"
