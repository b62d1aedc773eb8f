"""Activation memory of LoRA training with and without gradient checkpointing.

Measured two ways: the engine's counter of bytes held by the training pass's buffers
(peak_train_bytes: activations, gradients of activations, LoRA and loss scratch), checked against
the exact per-layer accounting, and the process peak RSS (VmHWM) of a subprocess that runs one
forward_backward on a larger model."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from qlora_native import LoraConfig  # noqa: E402

from test_lora_model import build  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def peak(model, ids, ckpt):
    model.gradient_checkpointing = ckpt
    model.zero_grad()
    model.forward_backward(ids, ids)
    return model.last_train_peak_bytes


def test_checkpointing_keeps_one_layer_of_activations(tmp_path, rng):
    kw = dict(hidden=64, inter=128, heads=4, kv_heads=2, vocab=100)
    T = 192
    peaks = {}
    for L in (4, 8):
        model, cfg, _ = build(tmp_path / f"L{L}", rng, layers=L, **kw)
        model.add_adapter("a", LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0), seed=0)
        ids = rng.integers(0, 100, (1, T))
        peaks[L] = {ck: peak(model, ids, ck) for ck in (True, False)}
    M, D, I, Q, K, H = T, 64, 128, 64, 32, 4
    per_layer_input = 4 * M * D                                      # xs[l]: [M, D] fp32
    per_layer_acts = 4 * (M * (3 * D + 2 * Q + 2 * K + 3 * I) + H * T)  # LayerActs (llama_train.cpp)
    # With checkpointing, 4 more layers cost only their inputs; without, inputs + all intermediates.
    assert peaks[8][True] - peaks[4][True] == 4 * per_layer_input
    assert peaks[8][False] - peaks[4][False] == 4 * (per_layer_input + per_layer_acts)
    assert peaks[8][True] < 0.4 * peaks[8][False]
    print(f"peak training bytes T={T}: " + ", ".join(
        f"L={L} ckpt={p[True]} no-ckpt={p[False]}" for L, p in peaks.items()))


SCRIPT = r"""
import json, sys
import numpy as np


def hwm_kib():  # this process's peak RSS (VmHWM; unlike ru_maxrss it is not inherited across exec)
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))


import qlora_native
from qlora_native import LoraConfig
m = qlora_native.Model.from_pretrained(sys.argv[1], quantize="nf4")
m.add_adapter("a", LoraConfig(r=8, target_modules="all-linear", lora_dropout=0.0), seed=0)
m.gradient_checkpointing = sys.argv[2] == "1"
ids = np.random.default_rng(0).integers(0, 100, (1, int(sys.argv[3])))
before = hwm_kib()
loss = m.forward_backward(ids, ids)
after = hwm_kib()
print(json.dumps({"rss_growth_kib": after - before, "counter": m.last_train_peak_bytes, "loss": loss}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="needs Linux /proc/self/status (VmHWM)")
def test_peak_rss_with_and_without_checkpointing(tmp_path, rng):
    from helpers_model import make_checkpoint

    path, _, _ = make_checkpoint(tmp_path, rng, layers=8, hidden=128, inter=256, heads=4, kv_heads=2, vocab=100,
                                 max_position_embeddings=1024)  # the sequences below are 1024 long
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = {}
    for ck in ("1", "0"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, path, ck, "1024"], capture_output=True, text=True,
                             env=env, timeout=600)
        assert out.returncode == 0, out.stderr
        res[ck] = json.loads(out.stdout.strip().splitlines()[-1])
    print("peak-RSS growth during forward_backward (KiB) / counter (bytes):", res)
    assert res["1"]["loss"] == res["0"]["loss"]
    # The counter's difference (~7 layers of intermediates, tens of MB) shows in the process RSS.
    diff_counter_kib = (res["0"]["counter"] - res["1"]["counter"]) / 1024
    assert diff_counter_kib > 20_000
    assert res["0"]["rss_growth_kib"] - res["1"]["rss_growth_kib"] > 0.5 * diff_counter_kib
