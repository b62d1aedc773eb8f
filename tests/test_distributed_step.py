"""The data-parallel hook of the engine's train step (lora_setup.cpp lora_train_step with a reducer;
Model.train_step(comm=, row_offsets=)), driven in one process: each "rank" is a thread with its own
Model and the reducer sums through a barrier, so these tests need no MPI (the real MPI runs are in
test_distributed.py). 2 ranks x their shards must take the step of 1 rank x the whole batch.

Bound (derived from the fp32 summation order, see test_distributed.py): one step from identical
parameters computes the same real sums in two orders; the loss is a sum of n positive per-token terms
(relative difference <= 2 (n-1) u), and a gradient element a sum of at most n per-token terms, each at
most the gradient's 2-norm |g| (stated assumption), so it differs by at most 2 (n-1) u n |g|."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from qlora_native import LoraConfig

U = 2.0 ** -24


class ThreadGroup:
    """In-place sums over `n` threads (rank order, so every rank gets the bit-identical sum)."""

    def __init__(self, n):
        self.n, self.bar, self.parts = n, threading.Barrier(n, timeout=60), [None] * n

    def comm(self, rank):
        g = self

        class Comm:
            calls = []

            def _sum(self, v):
                g.parts[rank] = v.copy()
                g.bar.wait()
                total = g.parts[0].copy()
                for p in g.parts[1:]:
                    total += p
                g.bar.wait()
                v[...] = total

            def sum_scalars(self, v):
                self.calls.append(("scalars", v.dtype, v.size))
                self._sum(v)

            def sum_grads(self, v):
                self.calls.append(("grads", v.dtype, v.size))
                self._sum(v)
        return Comm()


def run_ranks(fns, timeout=120):
    out, err = [None] * len(fns), [None] * len(fns)

    def wrap(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001
            err[i] = e
    ts = [threading.Thread(target=wrap, args=(i,)) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a rank hangs"
    for e in err:
        if e is not None:
            raise e
    return out


@pytest.fixture(scope="module")
def load(tmp_path_factory):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint
    from qlora_native import Model

    tmp = tmp_path_factory.mktemp("dstep")
    path, _, _ = make_checkpoint(tmp, np.random.default_rng(3), vocab=64, hidden=32, inter=64, layers=2, heads=4,
                                 kv_heads=2)

    def make(dropout=0.0):
        m = Model.from_pretrained(path, quantize="nf4", tokenizer=None)
        m.add_adapter("a", LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear"), seed=9)
        m.configure_optimizer(lr=1e-2, eps=1e-8)
        return m
    return make


def batch(rng, B, T, V=64):
    ids = rng.integers(0, V, (B, T)).astype(np.int32)
    labels = ids.copy()
    mask = np.ones((B, T), np.int32)
    for b in range(B):  # -100 prompt prefixes and right padding of different lengths per row
        p, L = int(rng.integers(0, T - 3)), int(rng.integers(T // 2, T + 1))
        labels[b, :p] = -100
        labels[b, L:] = -100
        mask[b, L:] = 0
    return ids, labels, mask


def shards(mb, bounds):
    ids, labels, mask = mb
    return [(ids[lo:hi], labels[lo:hi], mask[lo:hi]) if hi > lo else None for lo, hi in bounds]


def two_rank_steps(load, micro, bounds, steps, dropout=0.0, offsets=True):
    """bounds[i] = [(lo, hi) of rank 0, (lo, hi) of rank 1] for micro-batch i."""
    g = ThreadGroup(2)
    models = [load(dropout), load(dropout)]
    res = [[], []]

    def rank_fn(r):
        def f():
            c = g.comm(r)
            for _ in range(steps):
                mbs = [shards(mb, b)[r] for mb, b in zip(micro, bounds)]
                rows0 = [b[r][0] for b in bounds] if offsets else None
                res[r].append(models[r].train_step(mbs, max_grad_norm=1.0, comm=c, row_offsets=rows0))
            return c
        return f
    comms = run_ranks([rank_fn(0), rank_fn(1)])
    return models, res, comms


def one_rank_steps(load, micro, steps, dropout=0.0):
    m = load(dropout)
    return m, [m.train_step(micro, max_grad_norm=1.0) for _ in range(steps)]


def grad_bound(g, n):
    """2 (n-1) u n |g| (module docstring)."""
    norm = float(np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in g.values())))
    return 2 * (n - 1) * U * n * norm


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_two_ranks_take_the_step_of_the_whole_batch(load, dropout):
    rng = np.random.default_rng(1)
    micro = [batch(rng, 3, 12), batch(rng, 1, 12)]      # accumulation 2; shards 2/1 and 1/0 rows
    bounds = [[(0, 2), (2, 3)], [(0, 1), (1, 1)]]
    m1, r1 = one_rank_steps(load, micro, 1, dropout)
    models, r2, comms = two_rank_steps(load, micro, bounds, 1, dropout)
    for r in r2:
        assert r[0]["count"] == r1[0]["count"] and r[0]["stepped"]
        # step 1: same parameters, the same per-token terms; only the order of the fp32 sums differs
        assert abs(r[0]["loss"] - r1[0]["loss"]) <= 2 * r1[0]["count"] * U * r1[0]["loss"]
    assert r2[0][0]["grad_norm"] == r2[1][0]["grad_norm"]  # every rank holds the same summed gradient
    assert models[0].get_adapter_state_dict().keys() == m1.get_adapter_state_dict().keys()
    for k, v in models[0].get_adapter_state_dict().items():
        np.testing.assert_array_equal(models[1].get_adapter_state_dict()[k], v)  # ranks agree bit for bit
    g1, g2 = m1.get_adapter_gradients(), models[0].get_adapter_gradients()
    # gradient (after clipping by the same global norm): fp32 sums over n counted tokens in two orders
    tol = grad_bound(g1, r1[0]["count"])
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=0, atol=tol)
    # one all-reduce of the one gradient buffer per step, after the counts and the losses
    kinds = [c[0] for c in comms[0].calls]
    assert kinds == ["scalars", "scalars", "grads"]
    assert comms[0].calls[2][1] == np.float32
    assert comms[0].calls[2][2] == sum(v.size for v in g1.values())
    # the micro_step (dropout key) counter advanced alike on both ranks (rank 1 had no row in micro 2)
    assert models[0].get_rng_state() == models[1].get_rng_state() == m1.get_rng_state()


def test_dropout_masks_follow_the_row_not_the_rank(load):
    """Without the global row offsets the shards would draw rank-local masks (rows 0.. on every rank)
    and the step would differ from the one-process step by far more than rounding."""
    rng = np.random.default_rng(2)
    micro = [batch(rng, 4, 10)]
    bounds = [[(0, 2), (2, 4)]]
    m1, _ = one_rank_steps(load, micro, 1, 0.5)
    models, _, _ = two_rank_steps(load, micro, bounds, 1, 0.5)
    g1, g2 = m1.get_adapter_gradients(), models[0].get_adapter_gradients()
    tol = grad_bound(g1, int((micro[0][1][:, 1:] != -100).sum()))
    for k in g1:
        np.testing.assert_allclose(g2[k], g1[k], rtol=0, atol=tol)
    models_bad, _, _ = two_rank_steps(load, micro, bounds, 1, 0.5, offsets=False)
    gb = models_bad[0].get_adapter_gradients()
    assert max(float(np.max(np.abs(gb[k] - g1[k]))) for k in g1) > 100 * tol


def test_nonfinite_loss_on_one_rank_stops_every_rank(load):
    rng = np.random.default_rng(4)
    micro = [batch(rng, 2, 8), batch(rng, 2, 8)]
    bounds = [[(0, 1), (1, 2)], [(0, 1), (1, 2)]]
    g = ThreadGroup(2)
    models = [load(), load()]
    # rank 1 overflows: every way factors or a scale come in refuses huge ones (lora_check), so one
    # lone AdamW step at lr 1e30 (an update of about lr per element) makes them ~1e30
    models[1].train_step([micro[0]], lr=1e30)
    assert max(float(np.max(np.abs(v))) for v in models[1].get_adapter_state_dict().values()) > 1e29
    before = [m.get_adapter_state_dict() for m in models]

    def f(r):
        return lambda: models[r].train_step([shards(mb, b)[r] for mb, b in zip(micro, bounds)], max_grad_norm=1.0,
                                            comm=g.comm(r), row_offsets=[b[r][0] for b in bounds])
    res = run_ranks([f(0), f(1)])
    assert res[0]["bad_micro"] == res[1]["bad_micro"] == 0 and not res[0]["stepped"] and not res[1]["stepped"]
    for m, b in zip(models, before):  # no rank stepped
        for k, v in m.get_adapter_state_dict().items():
            np.testing.assert_array_equal(v, b[k])


def test_bad_comm_and_none_micro_batch_are_refused(load):
    m = load()
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="sum_scalars and sum_grads"):
        m.train_step([batch(rng, 1, 6)], comm=object())
    with pytest.raises(ValueError, match="only a data-parallel step"):
        m.train_step([None, batch(rng, 1, 6)])
    with pytest.raises(ValueError, match="row_offsets"):
        m.train_step([batch(rng, 1, 6)], comm=ThreadGroup(1).comm(0), row_offsets=[-1])
    with pytest.raises(ValueError, match="row offset .* out of range"):  # row0 x T would overflow
        m.train_step([batch(rng, 1, 6)], comm=ThreadGroup(1).comm(0), row_offsets=[2 ** 62])
    with pytest.raises(ValueError, match="no counted tokens"):  # was a PyCapsule error (empty view)
        m.train_step([], comm=ThreadGroup(1).comm(0))

    class Failing:  # the communication fails (e.g. MPI): the error comes out of train_step as raised
        def sum_scalars(self, v):
            pass

        def sum_grads(self, v):
            raise RuntimeError("link down")
    before = m.get_adapter_state_dict()
    with pytest.raises(RuntimeError, match="link down"):
        m.train_step([batch(rng, 1, 6)], comm=Failing())

    class Corrupting(Failing):  # a reducer that returns NaN gradients: the norm check refuses the step
        def sum_grads(self, v):
            v[:] = np.nan
    r = m.train_step([batch(rng, 1, 6)], comm=Corrupting())
    assert not r["stepped"] and not np.isfinite(r["grad_norm"])
    for k, v in m.get_adapter_state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_shard_bounds():
    from qlora_native.distributed import shard

    assert [shard(7, r, 3) for r in range(3)] == [(0, 3), (3, 5), (5, 7)]
    assert [shard(1, r, 2) for r in range(2)] == [(0, 1), (1, 1)]
    for n in range(0, 12):
        for size in range(1, 5):
            b = [shard(n, r, size) for r in range(size)]
            assert b[0][0] == 0 and b[-1][1] == n and all(b[i][1] == b[i + 1][0] for i in range(size - 1))
            assert max(h - lo for lo, h in b) - min(h - lo for lo, h in b) <= 1


def test_one_rank_reducer_is_bit_identical_to_none(load):
    """A world of one (sums are identities) takes exactly the step of comm=None, dropout included: the
    hook adds no arithmetic of its own to a single process."""
    rng = np.random.default_rng(6)
    micro = [batch(rng, 2, 9), batch(rng, 3, 9)]
    m1, r1 = one_rank_steps(load, micro, 2, 0.3)
    m2, c = load(0.3), ThreadGroup(1).comm(0)
    r2 = [m2.train_step(micro, max_grad_norm=1.0, comm=c, row_offsets=[0, 0]) for _ in range(2)]
    assert [(r["loss"], r["grad_norm"]) for r in r1] == [(r["loss"], r["grad_norm"]) for r in r2]
    for k, v in m1.get_adapter_state_dict().items():
        np.testing.assert_array_equal(m2.get_adapter_state_dict()[k], v)


def test_resume_refuses_another_global_batch_and_a_corrupt_one(tmp_path, load):
    """One process: a checkpoint written with a global batch of 4 rows does not resume with 2 (ValueError
    naming both); a corrupt global_batch_size is a FormatError naming the file and field."""
    import json

    from qlora_native import FormatError
    from qlora_native.data import Example
    from qlora_native.trainer import Trainer, TrainingArguments

    rng = np.random.default_rng(8)
    ex = [Example(list(map(int, rng.integers(0, 64, 8))), list(map(int, rng.integers(0, 64, 8))), line=i + 1)
          for i in range(8)]
    cfg = LoraConfig(r=2, target_modules=["q_proj"])

    def args(bs):
        return TrainingArguments(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=bs,
                                 save_steps=1, disable_tqdm=True, logging_steps=1, max_seq_len=16)
    Trainer(load(), cfg, ex, None, args(4)).train()
    with pytest.raises(ValueError, match=r"global batch of 4 rows \(1 rank\(s\) x 4\), this run has 2"):
        Trainer(load(), cfg, ex, None, args(2)).train(resume_from_checkpoint=str(tmp_path / "o" / "checkpoint-1"))
    st_path = tmp_path / "o" / "checkpoint-1" / "trainer_state.json"
    st = json.loads(st_path.read_text())
    st["global_batch_size"] = "4"
    st_path.write_text(json.dumps(st))
    with pytest.raises(FormatError, match="trainer_state.json: 'global_batch_size' must be a positive int"):
        Trainer(load(), cfg, ex, None, args(4)).train(resume_from_checkpoint=str(tmp_path / "o" / "checkpoint-1"))
