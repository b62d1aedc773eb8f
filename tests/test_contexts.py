"""Generation contexts (issue 8): every generate / model(...) call runs in its own context (KV cache +
the adapter it started with) over the shared weights, so calls from several threads run at once and
each gets exactly its single-threaded tokens; adapter_name= picks a call's adapter; PEFT's
set_adapter / disable_adapter.

The threaded scenario runs in a subprocess (a use-after-free would kill pytest itself) with a generous
wall-clock bound. Overlap is proven, not assumed: two generations wait inside their stream callbacks
for each other (they timed out while the model held one KV cache and serialized generate).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402
from helpers_capi import CModel, load_model_lib  # noqa: E402

PROMPTS = [[3, 4, 5], [6, 7, 8, 9]]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _model(tiny_dir, quantize=None):
    m = qlora_native.Model.from_pretrained(tiny_dir, quantize=quantize, tokenizer=None)
    for i, name in enumerate(("a", "b", "c")):
        add_random_adapter(m, name, i + 1)
    m.set_adapter("a")
    return m


# ---------------------------------------------------------------- adapter_name per call
def test_adapter_name_selects_the_call_adapter(tiny_dir):
    m = _model(tiny_dir)
    ids = np.array([[5, 6, 7, 8]])
    ref_gen, ref_fwd = {}, {}
    for name in (None, "a", "b", "c"):
        m.set_adapter(name)
        ref_gen[name] = m.generate(PROMPTS, 8, eos_token_id=None)
        ref_fwd[name] = m(ids)
    assert len({str(v) for v in ref_gen.values()}) == 4, "the adapters must change the greedy output"
    m.set_adapter("a")
    for name in ("a", "b", "c"):
        assert m.generate(PROMPTS, 8, eos_token_id=None, adapter_name=name) == ref_gen[name]
        np.testing.assert_array_equal(m(ids, adapter_name=name), ref_fwd[name])
    assert m.generate(PROMPTS, 8, eos_token_id=None, adapter_name="__base__") == ref_gen[None]
    np.testing.assert_array_equal(m(ids, adapter_name="__base__"), ref_fwd[None])
    assert m.generate(PROMPTS, 8, eos_token_id=None, adapter_name=None) == ref_gen["a"]  # None: the active one
    assert m.active_adapter == "a"  # a per-call choice does not change the active adapter


@pytest.mark.parametrize("bad,match", [("zz", r"no adapter named 'zz' \(loaded: 'a', 'b', 'c'"),
                                       (3, "adapter_name must be"), (["a"], "adapter_name must be")])
def test_adapter_name_bad(tiny_dir, bad, match):
    m = _model(tiny_dir)
    with pytest.raises(ValueError, match=match):
        m.generate(PROMPTS, 2, adapter_name=bad)
    with pytest.raises(ValueError, match=match):
        m([[1, 2]], adapter_name=bad)
    assert m.memory_footprint()["kv_cache"] == 0


def test_adapter_name_refuses_a_merged_adapter(tiny_dir):
    m = _model(tiny_dir)
    m.merge_adapter("a")
    with pytest.raises(ValueError, match="merged into the weights"):
        m.generate(PROMPTS, 2, adapter_name="a")
    m.unmerge_adapter()


# ---------------------------------------------------------------- contexts in the engine
def test_context_memory_merge_guard_and_close(tiny_dir):
    m = _model(tiny_dir)
    core = m._core
    assert m.memory_footprint()["kv_cache"] == 0
    c1 = core.new_context(2, 16, "b")
    one = m.memory_footprint()["kv_cache"]
    assert one > 0 and core.open_contexts == 1
    c2 = core.new_context(2, 16, None)
    assert m.memory_footprint()["kv_cache"] == 2 * one and core.open_contexts == 2
    # an open context holds the weights: merging is refused until it is closed
    with pytest.raises(ValueError, match="generation is running on this model"):
        m.merge_adapter("a")
    ids = np.array([[3, 4, 5], [0, 6, 7]], np.int32)
    mask = np.array([[1, 1, 1], [0, 1, 1]], np.int32)
    lb = c1.feed(ids, mask)
    la = c2.feed(ids, mask)
    assert c1.used == 3 and c1.batch == 2 and c1.capacity == 16
    assert not np.array_equal(la, lb)
    m.set_adapter("c")  # c2 keeps "a", the adapter active when it was made
    np.testing.assert_array_equal(c2.feed(np.array([[9], [9]], np.int32)),
                                  core.new_context(2, 16, "a").feed(np.array([[3, 4, 5, 9], [0, 6, 7, 9]], np.int32),
                                                                    np.array([[1, 1, 1, 1], [0, 1, 1, 1]], np.int32)))
    c1.close()
    c1.close()  # idempotent
    with pytest.raises(ValueError, match="context is closed"):
        c1.feed(ids, mask)
    with pytest.raises(ValueError, match="batch differs"):
        c2.feed(ids[:1], mask[:1])
    del c2
    import gc
    gc.collect()
    assert m.memory_footprint()["kv_cache"] == 0 and core.open_contexts == 0
    m.merge_adapter("a")  # nothing open: allowed
    assert m.merged_adapter == "a"


# ---------------------------------------------------------------- threads
SCRIPT = textwrap.dedent(r'''
    import sys, threading, time
    import numpy as np
    sys.path.insert(0, HERE)
    import qlora_native
    from helpers_tiny import add_random_adapter
    PROMPTS = [[3, 4, 5], [6, 7, 8, 9]]

    def _model(tiny_dir, quantize):
        m = qlora_native.Model.from_pretrained(tiny_dir, quantize=quantize, tokenizer=None)
        for i, name in enumerate(("a", "b", "c")):
            add_random_adapter(m, name, i + 1)
        m.set_adapter("a")
        return m

    tiny_dir, quantize = sys.argv[1], (None if sys.argv[2] == "none" else sys.argv[2])
    m = _model(tiny_dir, quantize)
    ids = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    names = ["a", "b", "c", "__base__"]
    ref = {n: m.generate(PROMPTS, 24, eos_token_id=None, adapter_name=n) for n in names}
    ref_fwd = {n: m(ids, adapter_name=n) for n in names}
    assert len({str(v) for v in ref.values()}) == 4

    # 1. Overlap: two generations wait for each other inside their stream callbacks.
    arrived = [threading.Event(), threading.Event()]
    peak, errors, results = [0], [], {}

    def overlapping(i, name):
        def cb(row, tok):
            if not arrived[i].is_set():
                arrived[i].set()
                if not arrived[1 - i].wait(60):
                    raise RuntimeError("the other generation never ran at the same time")
                peak[0] = max(peak[0], m._core.open_contexts)
        try:
            results[i] = m.generate(PROMPTS, 24, eos_token_id=None, adapter_name=name, stream=cb)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    ts = [threading.Thread(target=overlapping, args=(i, n)) for i, n in enumerate(("b", "c"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    assert peak[0] == 2, peak
    assert results == {0: ref["b"], 1: ref["c"]}, results

    # 2. Four generating threads with different adapters and one forward thread, all at once.
    bad, errors, counts = [], [], {}
    go = threading.Barrier(5)

    def gen_worker(name):
        try:
            go.wait(60)
            for _ in range(ITERS):
                out = m.generate(PROMPTS, 24, eos_token_id=None, adapter_name=name)
                if out != ref[name]:
                    bad.append(name)
                counts[name] = counts.get(name, 0) + 1
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def fwd_worker():
        try:
            go.wait(60)
            for i in range(4 * ITERS):
                n = names[i % 4]
                if not np.array_equal(m(ids, adapter_name=n), ref_fwd[n]):
                    bad.append("fwd " + n)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    t0 = time.time()
    ts = [threading.Thread(target=gen_worker, args=(n,)) for n in names] + [threading.Thread(target=fwd_worker)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(240)
    assert not any(t.is_alive() for t in ts), "a thread hung"
    assert not errors, errors
    assert not bad, bad
    assert counts == {n: ITERS for n in names}, counts
    fp = m.memory_footprint()
    assert fp["kv_cache"] == 0 and m._core.open_contexts == 0, fp
    print("OK", round(time.time() - t0, 1), "s")
''').replace("HERE", repr(HERE)).replace("ITERS", "6")


@pytest.mark.parametrize("quantize", ["none", "nf4"])
def test_threads_generate_with_different_adapters(tiny_dir, quantize):
    r = subprocess.run([sys.executable, "-c", SCRIPT, tiny_dir, quantize], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ))
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])


def test_capi_generate_from_two_threads_at_once(tiny_dir):
    """qlora_generate runs each call in its own context: two threads overlap (each waits inside its token
    callback for the other; this timed out while the C API serialized calls on a model) and each gets
    its single-threaded tokens."""
    cm = CModel(load_model_lib(), tiny_dir)
    try:
        prompts = [[3, 4, 5], [7, 1, 9, 2]]
        ref = [cm.generate(p, 12) for p in prompts]
        arrived = [threading.Event(), threading.Event()]
        out, errors = {}, []

        def worker(i):
            def cb(tok):
                if not arrived[i].is_set():
                    arrived[i].set()
                    if not arrived[1 - i].wait(30):
                        errors.append("no overlap")
                return 0
            try:
                out[i] = cm.generate(prompts[i], 12, stream=cb)
            except Exception as e:  # noqa: BLE001
                errors.append(repr(e))

        ts = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(90)
        assert not any(t.is_alive() for t in ts), "qlora_generate hung"
        assert not errors, errors
        assert [out[0], out[1]] == ref
    finally:
        cm.close()


# ---------------------------------------------------------------- PEFT names
def test_set_adapter_is_set_active_adapter(tiny_dir):
    m = _model(tiny_dir)
    m.set_adapter("b")
    assert m.active_adapter == "b"
    m.set_active_adapter("c")  # the old name keeps working
    assert m.active_adapter == "c"
    m.set_adapter(None)
    assert m.active_adapter is None
    with pytest.raises(ValueError, match="no adapter named 'zz'"):
        m.set_adapter("zz")


def test_disable_adapter_runs_the_base_and_restores(tiny_dir):
    m = _model(tiny_dir)
    ids = np.array([[5, 6, 7, 8]])
    base = m(ids, adapter_name="__base__")
    with_b = m(ids, adapter_name="b")
    m.set_adapter("b")
    with m.disable_adapter():
        assert m.active_adapter is None
        np.testing.assert_array_equal(m(ids), base)
    assert m.active_adapter == "b"
    np.testing.assert_array_equal(m(ids), with_b)
    with pytest.raises(KeyError, match="boom"):
        with m.disable_adapter():
            raise KeyError("boom")
    assert m.active_adapter == "b"  # restored on an exception too
    with m.disable_adapter():  # the previous adapter deleted inside: nothing to restore
        m.delete_adapter("b")
    assert m.active_adapter is None
