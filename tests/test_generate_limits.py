"""Sizes and arguments from the caller are checked before anything is allocated or computed (issue 14):
KV-cache overflow, the context length, strict generate argument types, a stream callback calling
generate, set_num_threads limits."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import qlora_native

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers_tiny import CFG, add_random_adapter, build_tiny  # noqa: E402

MAXPOS = CFG["max_position_embeddings"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    m = qlora_native.Model.from_pretrained(build_tiny(str(tmp_path_factory.mktemp("tiny"))), quantize=None,
                                           tokenizer=None)
    add_random_adapter(m, "a", 1)
    return m


# ---------------------------------------------------------------- KV-cache size
def test_kv_cache_overflow_is_a_value_error(model):
    """Was a segfault: batch x capacity x heads x head_dim wrapped in int64, a tiny cache was written past."""
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.generate([[1]] * 4, max_new_tokens=2**62 - 1)
    model.allow_long_context = True
    try:
        for n in (2**62 - 1, 2**64, 2**40):
            with pytest.raises(ValueError, match="max_new_tokens.*KV cache.*memory"):
                model.generate([[1]] * 4, max_new_tokens=n)
    finally:
        model.allow_long_context = False


def test_kv_cache_checked_in_the_engine(model):
    """The engine checks on its own (C API and direct core users): overflow and machine memory."""
    core = model._core
    with pytest.raises(ValueError, match="overflows"):
        core.start(4, 2**62)
    with pytest.raises(ValueError, match="overflows"):
        core.start(2**40, 2**40)
    with pytest.raises(ValueError, match="more than this machine's memory"):
        core.start(1, 2**50)
    with pytest.raises(ValueError, match=">= 1"):
        core.start(1, 0)
    core.start(2, 8)  # still usable
    assert core.cache_used == 0
    core.stop()


# ---------------------------------------------------------------- context length
def test_context_length_refused_by_default_and_opt_in(model):
    long_ids = np.ones((1, MAXPOS + 1), np.int64)
    with pytest.raises(ValueError, match=rf"{MAXPOS + 1} tokens long.*max_position_embeddings {MAXPOS}.*allow_long_context"):
        model(long_ids)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.forward_backward(long_ids, long_ids)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.eval_loss(long_ids, long_ids)
    with pytest.raises(ValueError, match=r"prompt \(250 tokens\) \+ max_new_tokens \(7\).*257"):
        model.generate([[1] * 250], max_new_tokens=7)
    assert len(model.generate([[1] * 250], max_new_tokens=6, eos_token_id=None)[0]) == 6  # exactly fits
    # Left padding does not count: only a row's real tokens take positions.
    mask = np.ones((1, MAXPOS + 20), np.int64)
    mask[0, :20] = 0
    assert model(np.ones_like(mask), mask).shape == (1, MAXPOS + 20, CFG["vocab_size"])
    model.allow_long_context = True
    try:
        assert model(long_ids).shape == (1, MAXPOS + 1, CFG["vocab_size"])
        assert np.isfinite(model.eval_loss(long_ids, long_ids)[0])
        assert len(model.generate([[1] * 250], max_new_tokens=10, eos_token_id=None)[0]) == 10
    finally:
        model.allow_long_context = False


# ---------------------------------------------------------------- argument types
BAD_GENERATE_ARGS = [
    (dict(pad_token_id=1.5), "pad_token_id"),
    (dict(pad_token_id=CFG["vocab_size"]), "pad_token_id"),
    (dict(seed=1.5), "seed"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-2**63 - 1), "seed"),
    (dict(eos_token_id=CFG["vocab_size"]), "eos_token_id"),
    (dict(eos_token_id=[2, 10**30]), "eos_token_id"),
    (dict(eos_token_id=-1), "eos_token_id"),
    (dict(eos_token_id=2.0), "eos_token_id"),
    (dict(stop=""), "stop must be a non-empty"),
    (dict(stop=["x", ""]), "stop must be a non-empty"),
    (dict(stop=3), "stop must be a non-empty"),
    (dict(temperature="1"), "temperature"),
    (dict(temperature=True), "temperature"),
    (dict(temperature=10**400), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_k=1.5), "top_k"),
    (dict(top_k=2**64), "top_k"),
    (dict(top_p="0.5"), "top_p"),
    (dict(top_p=0), "top_p"),
    (dict(repetition_penalty=None), "repetition_penalty"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(stream=3), "stream"),
]


@pytest.mark.parametrize("kw,name", BAD_GENERATE_ARGS, ids=[f"{k}={v!r}"[:40] for kw, _ in BAD_GENERATE_ARGS for k, v in kw.items()])
def test_generate_rejects_lax_arguments(model, kw, name):
    kw = dict(kw)
    kw.setdefault("max_new_tokens", 3)
    with pytest.raises(ValueError, match=name):
        model.generate([[5, 6]], **kw)


def test_generate_accepts_numpy_and_container_arguments(model):
    ref = model.generate([[5, 6]], 4, eos_token_id=None)
    assert model.generate([[5, 6]], np.int64(4), eos_token_id=None, pad_token_id=np.int32(0),
                          top_k=np.int64(0), temperature=np.float32(0.0), top_p=1) == ref
    for eos in ({2, 3}, (2,), np.array([2, 3]), np.int64(2)):
        model.generate([[5, 6]], 4, eos_token_id=eos)
    model.generate([[5, 6]], 4, temperature=0.7, seed=-1)  # int64 seeds keep working
    model.generate([[5, 6]], 4, temperature=0.7, seed=2**64 - 1)


# ---------------------------------------------------------------- re-entrant generate
def test_generate_from_its_stream_callback_works(model):
    """Each generate call runs in its own context: calling generate from its own stream callback works
    (it raised RuntimeError while the model held one KV cache, and hung before that) and gives the same
    tokens as a separate call; the outer generation is unaffected. Ran in a thread with a bound."""
    inner_ref = model.generate([[1, 2]], max_new_tokens=2, eos_token_id=None)
    seen, inner, errors = [], [], []

    def cb(row, tok):
        seen.append(tok)
        try:
            inner.append(model.generate([[1, 2]], max_new_tokens=2, eos_token_id=None))
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))
        model([[1, 2, 3]])
        model.eval_loss([[1, 2, 3]], [[1, 2, 3]])

    result = []
    t = threading.Thread(target=lambda: result.append(model.generate([[5, 6]], 3, eos_token_id=None, stream=cb)),
                         daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "generate deadlocked when its stream callback called generate"
    assert not errors, errors
    assert inner == [inner_ref] * 3
    assert result and result[0] == [seen]
    assert model.generate([[5, 6]], 3, eos_token_id=None) == result[0]  # the same as without the inner calls
    assert model.memory_footprint()["kv_cache"] == 0


# ---------------------------------------------------------------- threads
@pytest.mark.parametrize("n", [0, -1, 2000, 2**31, 2**70, 1.5, True, "2", None])
def test_set_num_threads_validates(n):
    before = qlora_native.num_threads()
    with pytest.raises(ValueError, match="number of threads"):
        qlora_native.set_num_threads(n)
    assert qlora_native.num_threads() == before


def test_set_num_threads_limit_and_numpy_int():
    before = qlora_native.num_threads()
    lim = qlora_native._core.max_threads()
    assert lim >= 64
    try:
        qlora_native.set_num_threads(np.int64(3))
        assert qlora_native.num_threads() == 3
    finally:
        qlora_native.set_num_threads(before)


def test_set_num_threads_when_the_system_refuses_threads(tmp_path):
    """Thread creation failing (address-space limit) is a clear RuntimeError; the pool keeps its size."""
    code = textwrap.dedent("""
        import resource, qlora_native as q
        q.set_num_threads(2)
        vm = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (vm + 64 * 2**20, resource.RLIM_INFINITY))
        try:
            q.set_num_threads(64)
            print("started")
        except RuntimeError as e:
            print("refused:", e)
        print("threads", q.num_threads())
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    if "started" in r.stdout:
        pytest.skip("this system started 64 threads within a 64 MiB address-space margin")
    assert "refused: cannot start 64 CPU threads" in r.stdout and "threads 2" in r.stdout, r.stdout


# ---------------------------------------------------------------- other integer inputs of the engine
def test_set_rng_state_rejects_out_of_range_integers(model):
    st = model.get_rng_state()
    for bad in (dict(st, dropout_seed=2**64), dict(st, dropout_step=-1), dict(st, dropout_step=1.5), {}):
        with pytest.raises(ValueError, match="dropout_seed|dropout_step"):
            model.set_rng_state(bad)
    model.set_rng_state(st)
    assert model.get_rng_state() == st


def test_load_tensor_shape_product_overflow(model):
    with pytest.raises(ValueError, match="overflows"):
        model._core.load_tensor("model.norm.weight", np.zeros(8, np.uint8), "F32", [2**40, 2**40])
