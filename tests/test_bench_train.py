"""bench/bench_train.py's sgemm probes and ceiling line (no timing asserted): the probe an engine is judged
against runs at the engine's ISA (the avx2 one capped like the peers, which must take effect), and the
ceiling is that sgemm over the peer's effective rate, printed next to the target line."""
import json
import os
import sys

import random

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import bench_train as bt  # noqa: E402


@pytest.fixture
def peer_isa():
    old = bt.PEER_ISA
    yield
    bt.PEER_ISA = old


def test_engine_isa(peer_isa):
    bt.PEER_ISA = "avx2"
    assert [bt.engine_isa(e, "avx2") for e in ("qlora_nf4", "peft_bnb")] == ["avx2", "avx2"]
    assert bt.engine_isa("qlora_nf4", "avx512") == "native"
    bt.PEER_ISA = "native"
    assert [bt.engine_isa(e, "avx2") for e in ("qlora_nf4_bf16", "peft_fp32")] == ["avx2", "native"]


def fake_out():
    rng = random.Random()
    g = rng.uniform(50, 100)
    sg_by = {"avx2": {"numpy_gflops": g, "openblas_core": "Haswell", "numpy_gflops_runs": [g, g * 0.9],
                      "shapes": [{"M": 2048, "K": 576, "N": 1536, "numpy_gflops": 60.0}]}}
    flops = {"total": rng.uniform(1e11, 1e12), "tokens": 1024}
    res = {}
    for e, tok_s in (("qlora_nf4", rng.uniform(100, 200)), ("peft_bnb", rng.uniform(50, 150))):
        gf = flops["total"] * tok_s / flops["tokens"] / 1e9
        res[e] = {"tok_s": tok_s, "best_step_tok_s": tok_s * 1.1, "step_gflops": gf, "best_step_gflops": gf * 1.1,
                  "peak_rss_mib": 100.0, "train_peak_rss_mib": 90.0, "load_s": 1.0, "losses": [1.0, 0.9],
                  "sgemm_isa": "avx2", "share_of_isa_sgemm": gf / sg_by["avx2"]["numpy_gflops"]}
    info = {"gguf": "m.gguf", "batch": 4, "seq": 256, "r": 16, "alpha": 32.0, "threads": 2, "steps": 3,
            "loadavg_before": [0, 0, 0], "loadavg_after": [0, 0, 0], "cpus": 2}
    out = {"info": info, "results": res, "engines": list(res), "flops": flops, "flop_formula": "f",
           "sgemm": sg_by["avx2"], "sgemm_by_isa": sg_by,
           "ceiling": bt.ceiling(res["qlora_nf4"], res["peft_bnb"], sg_by, "avx2"),
           "targets": {"tok_s_vs_peft_bnb": 1.5, "peak_rss_vs_peft_bnb": 0.5}}
    return out


def test_ceiling_is_isa_sgemm_over_peer_rate_and_printed(capsys):
    out = fake_out()
    c, bnb, sg = out["ceiling"], out["results"]["peft_bnb"], out["sgemm_by_isa"]["avx2"]["numpy_gflops"]
    # At equal FLOPs: (peer step time) / (FLOPs at the sgemm rate).
    peer_step_s = out["flops"]["tokens"] / bnb["tok_s"]
    assert c["x_peer"] == pytest.approx(peer_step_s / (out["flops"]["total"] / (sg * 1e9)), rel=1e-12)
    assert c["best_x_peer"] == pytest.approx(c["x_peer"] / 1.1, rel=1e-12)
    bt.report(json.loads(json.dumps(out)))  # as --report reads it back
    text = capsys.readouterr().out
    lines = text.splitlines()
    i = next(k for k, s in enumerate(lines) if s.startswith("target: qlora_native tokens/s"))
    assert lines[i + 1].startswith("ceiling: at equal FLOPs an engine at 100% of this ISA's sgemm (avx2, ")
    assert f"would be {c['x_peer']:.2f}x the peer" in lines[i + 1]
    runs = out["sgemm_by_isa"]["avx2"]["numpy_gflops_runs"]
    assert f"avx2, OpenBLAS Haswell (before / after the engines: {runs[0]:.1f} / {runs[1]:.1f})" in text
    me = next(s for s in lines if s.startswith("qlora_native NF4"))
    assert f"{100 * out['results']['qlora_nf4']['share_of_isa_sgemm']:.0f}%" in me.split()


def test_capped_probe_runs_haswell_kernel(tmp_path, peer_isa):
    """The avx2 probe really runs under the cap: OpenBLAS reports the Haswell kernel set (where the
    uncapped one reports another), and both give a rate."""
    native = bt.openblas_core()
    if native is None:
        pytest.skip("numpy's OpenBLAS does not report its kernel set")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"threads": 1, "gemm_runs": 1}))
    got = {isa: bt.run_child("sgemm", str(spec), 1, 300, isa=isa) for isa in ("native", "avx2")}
    for isa, r in got.items():
        assert "error" not in r and r["numpy_gflops"] > 0, (isa, r)
    assert got["avx2"]["openblas_core"] == "Haswell"
    if native != "Haswell" and not os.environ.get("OPENBLAS_CORETYPE"):
        assert got["native"]["openblas_core"] == native
