"""bench/bench_lora_gemm.py: its shape table is the LoRA work of one SmolLM2-135M step (the FLOPs of
bench_train's formula: forward 2·tok·r·S_lora, backward twice that, S_lora = sum of in + out), and a
one-shape run writes its JSON."""
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "bench"))
import bench_lora_gemm as blg  # noqa: E402


def test_shapes_are_one_step_of_lora_work():
    D, I, KV, r, tok, L = 576, 1536, 192, 16, 1024, 30
    proj = {"q": (D, D), "k": (KV, D), "v": (KV, D), "o": (D, D), "gate": (I, D), "up": (I, D), "down": (D, I)}
    s_lora = sum(o + i for o, i in proj.values())
    fwd = bwd = 0.0
    for name, _lay, m, n, k, _beta, count in blg.SHAPES:
        fl = 2.0 * m * n * k * count
        if name.startswith(("shrink", "expand")):
            assert count % (2 * L - 1) == 0, name  # forward + checkpoint recompute of all but the last layer
            fwd += fl / (2 * L - 1)
        else:
            assert count % L == 0, name
            bwd += fl / L
    assert fwd == 2.0 * tok * r * s_lora
    assert bwd == 4.0 * tok * r * s_lora


def test_one_shape_run_writes_json(tmp_path):
    out = tmp_path / "r.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, os.path.join(HERE, "..", "bench", "bench_lora_gemm.py"), "--samples", "1",
                    "--calls", "1", "--only", "dx o", "--out", str(out)], check=True, env=env, capture_output=True)
    res = json.loads(out.read_text())
    assert [s["name"] for s in res["shapes"]] == ["dx o"]
    assert res["shapes"][0]["ms"]["None"][0] > 0 and res["step_ms"]["None"] > 0
