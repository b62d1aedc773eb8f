"""bench/bench_cuda_train.py's plumbing on the CPU (--quick --device cpu: tiny shapes, the same code
paths the device check takes on a GPU): --offload on / both, the Q8_0 head, the memory model's estimate
beside each qlora run, the run order under a budget, and the table."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "bench", "bench_cuda_train.py")


def run(tmp_path, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python")] + sys.path))
    r = subprocess.run([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--steps", "1", "--reference", "none",
                        "--out", str(tmp_path), *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    return json.load(open(tmp_path / "bench_cuda_train-quick-cpu.json")), r.stdout


def test_offload_both_q8_head_with_estimates(tmp_path):
    from qlora_native import memory_model

    out, stdout = run(tmp_path, "--offload", "both", "--head-format", "q8_0", "--no-smollm2")
    runs = out["runs"]
    assert out["offload"] == "both" and out["head_format"] == "q8_0"
    # offloaded runs first (the ones judged against the targets), then the same batches without
    assert [(r["batch"], r["offload_checkpoints"]) for r in runs] == [(1, True), (2, True), (1, False), (2, False)]
    for r in runs:
        assert "error" not in r, r
        assert r["head_format"] == "q8_0"
        shape = out["shape_8b"]
        want = memory_model.train_step_bytes(shape, r["batch"], out["seq"], out["r"], head_format="q8_0",
                                             offload=r["offload_checkpoints"])["total"] / 2 ** 20
        assert r["estimate_mib"] == pytest.approx(want)
    by = {(r["batch"], r["offload_checkpoints"]): r for r in runs}
    assert by[(1, True)]["estimate_mib"] < by[(1, False)]["estimate_mib"]  # offload keeps fewer checkpoints
    assert by[(1, True)]["train_peak_bytes"] < by[(1, False)]["train_peak_bytes"]
    table = "\n".join(out["table"])
    assert "memory model MiB" in table and "+offload" in table


def test_bare_offload_and_budget_order(tmp_path):
    # bare --offload = on; a budget of 0 s skips every run, in the priority order, and still writes the table
    out, _ = run(tmp_path, "--offload", "--budget-s", "0")
    assert out["offload"] == "on" and out["runs"] == []
    assert [s.split(" (")[0] for s in out["skipped"]] == ["qlora_cuda batch 1", "qlora_cuda batch 2",
                                                          "qlora_cuda batch 4"]  # b1, b2, then SmolLM2
    assert os.path.exists(tmp_path / "bench_cuda_train-quick-cpu.txt")


def test_head_format_choices_come_from_the_engine(tmp_path):
    from qlora_native import memory_model

    r = subprocess.run([sys.executable, SCRIPT, "--help"], capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python")] + sys.path)))
    assert r.returncode == 0
    for f in memory_model.HEAD_FORMATS:
        assert f in r.stdout
    r = subprocess.run([sys.executable, SCRIPT, "--head-format", "int4"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "int4" in r.stderr


def test_json_written_after_every_run(tmp_path):
    """The JSON and table are rewritten after each engine run, so a run stopped at the device check's
    limit keeps the runs that finished."""
    import time

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python")] + sys.path))
    p = subprocess.Popen([sys.executable, SCRIPT, "--quick", "--device", "cpu", "--steps", "1", "--reference", "none",
                          "--offload", "both", "--out", str(tmp_path)], env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    txt = tmp_path / "bench_cuda_train-quick-cpu.txt"  # written after the JSON
    try:
        t = time.monotonic()
        while not txt.exists() and time.monotonic() - t < 120:
            time.sleep(0.02)
        first = json.loads((tmp_path / "bench_cuda_train-quick-cpu.json").read_text())
    finally:
        p.kill()
        p.wait()
    assert len(first["runs"]) == 1 and first["runs"][0]["batch"] == 1 and "table" in first
