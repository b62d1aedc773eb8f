"""bench/bench_cuda.py --dry-run: the CUDA benchmark's every code path on tiny shapes on the CPU
(kernel timings through _core.bench_nf4_gemm, the in-memory random NF4 Llama through load_nf4,
prefill through GenerationContext.feed_sample, transformers on the same shape when importable),
so its Python does not rot between GPU runs; JSON and table written atomically to --out."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bench_cuda_dry_run(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_cuda.py"), "--dry-run", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.load(open(tmp_path / "bench_cuda.json"))
    assert res["dry_run"] and res["backend"] == "cpu" and not res["errors"]
    assert len(res["gemm"]) == 6 and all(g["ours_tflops"] > 0 for g in res["gemm"])
    assert len(res["gemv"]) == 4 and all(g["ours_gbps"] > 0 for g in res["gemv"]) and res["gemv"][3]["stacked"]
    m = res["ours_model"]
    assert m["prefill_tok_s"] > 0 and m["decode_tok_s"] > 0 and m["decode_step_bytes"] > 0
    names = [t["name"] for t in res["targets"]]
    assert len(names) == 5 and all("target" in t for t in res["targets"])
    txt = (tmp_path / "bench_cuda.txt").read_text()
    assert "| target | value | goal | met |" in txt and "NF4 GEMM" in txt
    assert sorted(os.listdir(tmp_path)) == ["bench_cuda.json", "bench_cuda.txt"]  # no temporary left
    for mod in ("torch", "transformers"):
        pytest.importorskip(mod, reason="torch/transformers not importable: the baseline paths were skipped")
    assert res["hf_bf16"]["decode_tok_s"] > 0 and all("ratio" in g for g in res["gemm"])
    assert res["targets"][0]["value"] is not None


def test_bench_cuda_ms_option(tmp_path):
    """--ms picks the GEMM rows' token counts (the device check can size the run); bad values refused."""
    script = os.path.join(ROOT, "bench", "bench_cuda.py")
    r = subprocess.run([sys.executable, script, "--dry-run", "--no-hf", "--ms", "8", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    res = json.load(open(tmp_path / "bench_cuda.json"))
    assert [g["M"] for g in res["gemm"]] == [8, 8, 8] and not res["errors"]
    for bad in ("0", "a,b", ","):
        r = subprocess.run([sys.executable, script, "--dry-run", "--ms", bad], capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 2 and "--ms must be" in r.stderr, (bad, r.stderr)


def test_bench_cuda_writes_after_each_part(tmp_path):
    """A run stopped mid-way (the device check's step limit) leaves the parts that finished: the JSON
    is written after every part, naming the parts not finished yet."""
    import time

    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "bench", "bench_cuda.py"), "--dry-run", "--no-hf",
                          "--out", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env=dict(os.environ))
    txt = tmp_path / "bench_cuda.txt"  # written after the JSON
    try:
        t = time.monotonic()
        while not txt.exists() and time.monotonic() - t < 120:
            time.sleep(0.02)
        first = json.loads((tmp_path / "bench_cuda.json").read_text())  # the write after the kernels part
        table = txt.read_text()
    finally:
        p.kill()
        p.wait()
    assert len(first["gemm"]) == 6 and first["not_finished"] == ["ours_model"]
    assert "not finished (the run was stopped before): ours_model" in table
