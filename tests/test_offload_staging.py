"""Pinned host staging of activation offload (issue 11): Backend::host_alloc goes through a
HostStagingPool (cpp/src/device_pool.hpp; CUDA: cudaHostAlloc, slow and device-synchronizing, only on
a miss). A training step with offloaded checkpoints makes no host allocation in steady state, also
for a new model of the same shape, and release_cached_memory gives the staging back. "cpu:devsim"
runs the same pool over malloc, so CI checks it without a GPU; the "cuda" cases skip without one.
"""
import gc

import numpy as np
import pytest

from qlora_native import _core

from helpers_tiny import build_tiny
from helpers_train import adapter_model

HAVE_GPU = _core.cuda_device_count() > 0
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not HAVE_GPU, reason=f"no CUDA GPU: {_core.cuda_device_summary()}"))
HOST = ("host_raw_allocs", "host_raw_frees")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")), num_hidden_layers=3)


def _model(path, backend):
    m = adapter_model(path, backend)
    m.gradient_checkpointing = True
    m.offload_checkpoints = True
    return m


def _batch(B=2, T=12, V=64):
    ids = np.random.default_rng(0).integers(3, V, size=(B, T)).astype(np.int32)
    return ids, ids.copy(), np.ones_like(ids)


def _delta(a, b, keys=HOST + ("raw_allocs", "raw_frees")):
    return {k: b[k] - a[k] for k in keys}


@pytest.mark.parametrize("backend", ["cpu:devsim", CUDA])
def test_offload_staging_steady_state(tiny, backend):
    _core.release_cached_memory(backend)
    ids, labels, mask = _batch()
    m = _model(tiny, backend)
    s0 = _core.device_stats(backend)
    m.zero_grad()
    loss0 = m.forward_backward(ids, labels, mask)
    s1 = _core.device_stats(backend)
    staging = 3 * ids.size * m.config.hidden_size * 4  # one [tokens, hidden] fp32 slot per layer
    assert _delta(s0, s1, HOST) == {"host_raw_allocs": 1, "host_raw_frees": 0}  # the first pass: one block
    assert s1["host_reserved_bytes"] - s0["host_reserved_bytes"] == staging
    for _ in range(3):  # steady state: no host or device allocation at all
        m.zero_grad()
        assert m.forward_backward(ids, labels, mask) == loss0
    s2 = _core.device_stats(backend)
    assert _delta(s1, s2) == {k: 0 for k in HOST + ("raw_allocs", "raw_frees")}
    # an optimizer step too
    m.configure_optimizer(lr=1e-3)
    m.train_step([(ids, labels, mask)], lr=1e-3)
    s3 = _core.device_stats(backend)
    m.train_step([(ids, labels, mask)], lr=1e-3)
    assert _delta(s3, _core.device_stats(backend), HOST) == {"host_raw_allocs": 0, "host_raw_frees": 0}

    # a new model of the same shape reuses the staging its predecessor gave back (no cudaHostAlloc)
    del m
    gc.collect()
    s4 = _core.device_stats(backend)
    assert s4["host_cached_bytes"] >= staging
    m2 = _model(tiny, backend)
    m2.zero_grad()
    assert m2.forward_backward(ids, labels, mask) == loss0
    s5 = _core.device_stats(backend)
    assert _delta(s4, s5, HOST) == {"host_raw_allocs": 0, "host_raw_frees": 0}
    del m2
    gc.collect()
    # release_cached_memory gives the cached staging back
    _core.release_cached_memory(backend)
    s6 = _core.device_stats(backend)
    assert s6["host_cached_bytes"] == 0 and s6["host_reserved_bytes"] == 0
    assert s6["host_raw_frees"] - s5["host_raw_frees"] >= 1


def test_host_stats_are_zero_on_the_cpu_backend():
    s = _core.device_stats("cpu")
    assert all(s[k] == 0 for k in HOST + ("host_reserved_bytes", "host_cached_bytes"))
