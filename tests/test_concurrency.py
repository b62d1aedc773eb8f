"""A request keeps the adapter it started with (issue 14): switching or deleting adapters while other
threads run forward / generate / forward_backward / eval_loss never mixes adapters in one output and
never frees an adapter mid-pass.

The threaded scenarios run in a subprocess (a use-after-free would kill pytest itself) with a
generous wall-clock bound; every output must equal, bit for bit, the single-threaded output of one
adapter (or of the base model).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import qlora_native

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from helpers_tiny import add_random_adapter, build_tiny  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny(str(tmp_path_factory.mktemp("tiny")))


def _model(tiny_dir):
    m = qlora_native.Model.from_pretrained(tiny_dir, quantize=None, tokenizer=None)
    add_random_adapter(m, "a", 1)
    add_random_adapter(m, "b", 2)
    m.set_active_adapter("a")
    return m


# ---------------------------------------------------------------- single-threaded, deterministic
def test_generate_keeps_adapter_switched_and_deleted_in_stream(tiny_dir):
    """The stream callback switches to adapter b and deletes a after the first token: the rest of
    the generation still uses a (it started with a)."""
    m = _model(tiny_dir)
    prompt = [[3, 4, 5, 6]]
    ref = {}
    for name in (None, "a", "b"):
        m.set_active_adapter(name)
        ref[name] = m.generate(prompt, 12, eos_token_id=None)
    assert len({str(v) for v in ref.values()}) == 3, "the adapters must change the greedy output"
    m.set_active_adapter("a")
    seen = []

    def cb(row, tok):
        if not seen:
            m.set_active_adapter("b")
            m.delete_adapter("a")
        seen.append(tok)

    out = m.generate(prompt, 12, eos_token_id=None, stream=cb)
    assert out == ref["a"]
    assert m.adapters == ["b"] and m.active_adapter == "b"
    assert m.generate(prompt, 12, eos_token_id=None) == ref["b"]  # new requests get the new active adapter


def test_delete_active_adapter_frees_it_and_base_is_used(tiny_dir):
    m = _model(tiny_dir)
    ids = np.array([[5, 6, 7, 8]])
    m.set_active_adapter(None)
    base = m(ids)
    m.set_active_adapter("a")
    before = m.memory_footprint()["lora_adapters"]
    m.delete_adapter("a")
    assert m.active_adapter is None
    assert m.memory_footprint()["lora_adapters"] < before
    np.testing.assert_array_equal(m(ids), base)
    with pytest.raises(ValueError, match="no adapter named 'a'"):
        m.set_active_adapter("a")


# ---------------------------------------------------------------- threads
SCRIPT = textwrap.dedent(r'''
    import sys, threading, time
    import numpy as np
    sys.path.insert(0, HERE)
    from test_concurrency import _model
    from helpers_tiny import add_random_adapter

    mode, tiny_dir, adir, iters = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    m = _model(tiny_dir)
    add_random_adapter(m, "c", 3)
    m.save_adapter(adir, "c")  # re-added from disk: complete before the model sees it
    ids = np.array([[3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13, 14]])
    prompts = [[3, 4, 5], [6, 7, 8, 9]]
    ref = {}
    for name in (None, "a", "b", "c"):
        m.set_active_adapter(name)
        ref[name] = dict(fwd=m(ids), gen=m.generate(prompts, 6, eos_token_id=None), loss=m.eval_loss(ids, ids),
                         fb=m.forward_backward(ids, ids) if name else None)
    for k in ("gen", "loss"):
        assert len({str(r[k]) for r in ref.values()}) == 4, k
    m.set_active_adapter("a")

    bad, done, used, refused, errors = [], threading.Event(), set(), [0], []

    def match(kind, out):
        for name, r in ref.items():
            if (np.array_equal(out, r[kind]) if kind == "fwd" else out == r[kind]):
                used.add(name)
                return
        bad.append(kind)

    def worker(kind):
        try:
            n, deadline = 0, time.time() + 60
            while n < iters and time.time() < deadline:
                n += 1
                if kind == "fwd":
                    match("fwd", m(ids))
                elif kind == "gen":
                    match("gen", m.generate(prompts, 6, eos_token_id=None))
                elif kind == "loss":
                    match("loss", m.eval_loss(ids, ids))
                elif kind == "fb":
                    try:
                        loss = m.forward_backward(ids, ids)
                    except ValueError as e:  # the active adapter was just deleted: refused cleanly
                        assert "no active adapter" in str(e), e
                        refused[0] += 1
                        n -= 1  # not a request: does not count
                        time.sleep(0.0005)
                        continue
                    match("fb", loss)
        except Exception as e:  # noqa: BLE001
            errors.append(repr(e))

    def switcher():
        i = 0
        try:
            while not done.is_set():
                step = i % 6
                if step == 0:
                    m.set_active_adapter("b")
                elif step == 1:
                    m.set_active_adapter("c")
                elif step == 2:
                    m.delete_adapter("c")          # possibly in use right now
                elif step == 3:
                    m.load_adapter(adir, "c")      # active when none is
                elif step == 4:
                    m.set_active_adapter(None if i % 12 == 4 else "a")
                else:
                    m.set_active_adapter("c")
                i += 1
                time.sleep(0.0002)
        except Exception as e:  # noqa: BLE001
            errors.append("switcher: " + repr(e))

    kinds = {"forward": ["fwd", "fwd", "fwd"], "generate": ["gen", "gen", "fwd"], "train": ["fb", "loss", "fwd"]}[mode]
    ts = [threading.Thread(target=worker, args=(k,)) for k in kinds]
    sw = threading.Thread(target=switcher)
    t0 = time.time()
    sw.start()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    done.set()
    sw.join()
    print("mode", mode, "outputs by adapter seen:", sorted(map(str, used)), "bad", len(bad), "refused", refused[0],
          "errors", errors[:3], "s", round(time.time() - t0, 1))
    assert not errors, errors
    assert not bad, bad
    print("OK")
''').replace("HERE", repr(HERE))


@pytest.mark.parametrize("mode,iters", [("forward", 300), ("generate", 100), ("train", 150)])
def test_threads_switch_and_delete_adapters(tiny_dir, tmp_path, mode, iters):
    env = dict(os.environ)
    r = subprocess.run([sys.executable, "-c", SCRIPT, mode, tiny_dir, str(tmp_path / "c"), str(iters)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
