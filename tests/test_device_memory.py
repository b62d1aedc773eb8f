"""Device memory and streams (issue 10): the caching allocator (cpp/src/device_pool.hpp) and one
Exec (CUDA: stream + arena) per generation context. In steady state a decode step or a forward pass
of a shape seen before makes no raw allocation (cudaMalloc / cudaFree) and no cudaSetDevice; a
context's memory comes back to its arena, which the next context reuses (no new stream).

"cpu:devsim" runs the same pool logic over host memory, so CI proves the steady-state property
without a GPU; the "cuda" cases skip without one.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import qlora_native
from qlora_native import _core

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import build_tiny  # noqa: E402

DEVICES = ["cpu:devsim", "cuda"]


def _be(device):
    if device == "cuda" and _core.cuda_device_count() == 0:
        pytest.skip("no CUDA device: " + _core.cuda_device_summary())


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _model(tiny_dir, device, quantize=None):
    _be(device)
    return qlora_native.Model.from_pretrained(tiny_dir, backend=device, quantize=quantize, tokenizer=None)


def _delta(a, b, keys=("raw_allocs", "raw_frees", "queues_created", "set_device_calls", "invalid_frees")):
    return {k: b[k] - a[k] for k in keys}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_decode_steady_state_makes_no_raw_allocation(tiny_dir, device, quantize):
    m = _model(tiny_dir, device, quantize)
    ctx = m._core.new_context(2, 40)
    ids = np.array([[5, 6, 7, 8, 9], [0, 0, 3, 4, 5]], np.int32)
    mask = (ids != 0).astype(np.int32)
    ctx.feed(ids, mask)  # prefill
    tok = np.array([[11], [12]], np.int32)
    ctx.feed(tok)  # first decode step: its scratch shapes are new (misses allowed)
    s0 = _core.device_stats(device)
    for i in range(12):
        logits = ctx.feed((tok + i) % 60)
        assert np.isfinite(logits).all()
    s1 = _core.device_stats(device)
    assert _delta(s0, s1) == dict.fromkeys(_delta(s0, s1), 0), "decode steps allocated or set the device"
    assert s1["cache_hits"] > s0["cache_hits"]
    assert s1["live_bytes"] == s0["live_bytes"], "a decode step leaked device memory"
    ctx.close()


@pytest.mark.parametrize("device", DEVICES)
def test_forward_pass_steady_state(tiny_dir, device):
    m = _model(tiny_dir, device, "nf4")
    ids = np.arange(1, 25, dtype=np.int32).reshape(2, 12) % 60
    ref = m(ids)
    s0 = _core.device_stats(device)
    for _ in range(3):
        np.testing.assert_array_equal(m(ids), ref)
    s1 = _core.device_stats(device)
    assert _delta(s0, s1) == dict.fromkeys(_delta(s0, s1), 0)
    assert s1["live_bytes"] == s0["live_bytes"] and s1["cache_hits"] > s0["cache_hits"]


@pytest.mark.parametrize("device", DEVICES)
def test_contexts_reuse_a_closed_contexts_arena(tiny_dir, device):
    """generate opens a context per call; the next call of the same shape gets the closed one's arena
    back with its cached blocks: no cudaMalloc, no new stream."""
    m = _model(tiny_dir, device)
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    ref = m.generate(prompts, 10, eos_token_id=None)
    s0 = _core.device_stats(device)
    assert s0["execs_open"] == 0 and s0["execs_idle"] >= 1
    assert m.generate(prompts, 10, eos_token_id=None) == ref
    s1 = _core.device_stats(device)
    assert _delta(s0, s1) == dict.fromkeys(_delta(s0, s1), 0)
    assert s1["live_bytes"] == s0["live_bytes"] and s1["execs_open"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_each_context_has_its_own_stream_and_arena(tiny_dir, device):
    """Two open contexts never share scratch (a block is reused only on the stream that freed it):
    the second context's first step allocates although the first one warmed the same shapes; once
    both are warm, interleaved steps allocate nothing."""
    m = _model(tiny_dir, device)
    _core.release_cached_memory(device)  # no idle arenas with cached blocks left
    s0 = _core.device_stats(device)
    prompt, tok = np.array([[4, 5, 6, 7]], np.int32), np.array([[9]], np.int32)
    c1 = m._core.new_context(1, 32)
    first = c1.feed(prompt)
    c1.feed(tok), c1.feed(tok)
    c2 = m._core.new_context(1, 32)
    s1 = _core.device_stats(device)
    assert s1["queues_created"] - s0["queues_created"] == 2 and s1["execs_open"] == s0["execs_open"] + 2
    np.testing.assert_array_equal(c2.feed(prompt), first)
    s2 = _core.device_stats(device)
    assert s2["raw_allocs"] > s1["raw_allocs"], "the second context's step was served from another's cache"
    c2.feed(tok)
    s3 = _core.device_stats(device)
    for _ in range(3):
        c1.feed(tok), c2.feed(tok)
    s4 = _core.device_stats(device)
    assert _delta(s3, s4) == dict.fromkeys(_delta(s3, s4), 0)
    c1.close(), c2.close()


@pytest.mark.parametrize("device", DEVICES)
def test_context_memory_returns_and_errors_leave_no_leak(tiny_dir, device):
    m = _model(tiny_dir, device)
    base = _core.device_stats(device)
    ctx = m._core.new_context(1, 64)
    s = _core.device_stats(device)
    assert s["execs_open"] == base["execs_open"] + 1 and s["live_bytes"] > base["live_bytes"]  # its KV cache
    ctx.feed(np.array([[4, 5, 6]], np.int32))
    with pytest.raises(ValueError, match="out of range"):
        ctx.feed(np.array([[4, 500]], np.int32))
    after_err = _core.device_stats(device)
    assert after_err["live_bytes"] == s["live_bytes"] and after_err["invalid_frees"] == 0
    ctx.feed(np.array([[7]], np.int32))  # still usable
    ctx.close()
    end = _core.device_stats(device)
    assert end["live_bytes"] == base["live_bytes"] and end["execs_open"] == base["execs_open"]
    assert end["invalid_frees"] == 0


@pytest.mark.parametrize("device", DEVICES)
def test_release_cached_and_peaks(tiny_dir, device):
    m = _model(tiny_dir, device)
    ids = np.arange(1, 17, dtype=np.int32).reshape(1, 16)
    ref = m(ids)
    _core.release_cached_memory(device)
    s = _core.device_stats(device)
    assert s["cached_bytes"] == 0 and s["reserved_bytes"] == s["live_bytes"] and s["execs_idle"] == 0
    _core.reset_peak_memory(device)
    s = _core.device_stats(device)
    assert s["peak_live_bytes"] == s["live_bytes"] and s["peak_reserved_bytes"] == s["reserved_bytes"]
    np.testing.assert_array_equal(m(ids), ref)  # allocates again after the release, same result
    s2 = _core.device_stats(device)
    assert s2["peak_live_bytes"] > s2["live_bytes"], "the pass's scratch raised the peak"
    assert s2["peak_reserved_bytes"] >= s2["reserved_bytes"] > s2["live_bytes"]
    assert s2["raw_allocs"] > s["raw_allocs"]


def test_host_backends_report_zeros_and_bad_names():
    s = _core.device_stats("cpu")
    assert set(s.values()) == {0}
    _core.release_cached_memory("cpu")
    _core.reset_peak_memory("cpu")
    with pytest.raises(ValueError, match="unknown backend"):
        _core.device_stats("nope")
