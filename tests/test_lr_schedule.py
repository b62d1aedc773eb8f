"""qlora_native._core.train.lr_at vs transformers' schedulers (LambdaLR driven as Trainer does:
the lr read before optimizer step k is the schedule at k). The formulas are evaluated in the same
double-precision order, so values must be equal, not just close."""
from types import SimpleNamespace

import pytest

from qlora_native import _core
from qlora_native.trainer import LR_SCHEDULES

train = _core.train
NAMES = list(LR_SCHEDULES)


def _transformers_warmup(warmup, total):
    transformers = pytest.importorskip("transformers")
    return transformers.TrainingArguments.get_warmup_steps(SimpleNamespace(warmup_steps=warmup), total)


def _transformers_lrs(name, base_lr, warmup, total, extra=5):
    torch = pytest.importorskip("torch")
    from transformers import get_scheduler

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=base_lr)
    sched = get_scheduler(name, opt, num_warmup_steps=_transformers_warmup(warmup, total), num_training_steps=total)
    lrs = []
    for _ in range(total + extra):  # a few steps past the end: the formulas run on
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("warmup,total", [(0, 40), (1, 40), (7, 40), (2.9, 40),  # 2.9 steps -> int() = 2
                                          (0.07, 100),  # 100 * 0.07 = 7.000000000000001 -> ceil = 8
                                          (0.1, 30),
                                          (0.05, 37), (0.5, 9), (0.999, 11),
                                          (50, 40),    # warmup longer than training
                                          (3, 3), (0, 1), (0.2, 1)])
def test_schedule_equals_transformers(rng, name, warmup, total):
    base_lr = float(10 ** rng.uniform(-5, -2))
    want = _transformers_lrs(name, base_lr, warmup, total)
    got = [train.lr_at(name, k, base_lr, warmup, total) for k in range(len(want))]
    assert got == want
    if name != "constant" and _transformers_warmup(warmup, total) > 0:
        assert got[0] == 0.0  # step 0 of a warmup trains with lr 0, as transformers does


@pytest.mark.parametrize("warmup,total", [(0.1, 30), (0.05, 37), (0.3, 10), (0.07, 100), (0.0, 5), (1, 5),
                                          (2.5, 5), (12, 5), (0.999, 1000), (0.33, 0)])
def test_warmup_steps_equals_trainingarguments(warmup, total):
    assert train.warmup_steps(warmup, total) == _transformers_warmup(warmup, total)


def test_ratio_rounding_is_ceil_in_double():
    # 100 * 0.07 is 7.000000000000001 in double, so transformers warms up 8 steps, not 7
    assert train.warmup_steps(0.07, 100) == 8
    assert train.warmup_steps(0.1, 30) == 3
    assert train.lr_at("linear", 7, 1.0, 0.07, 100) == 7 / 8
    assert train.lr_at("linear", 8, 1.0, 0.07, 100) == 1.0


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="supported: constant, constant_with_warmup, linear, cosine"):
        train.lr_at("polynomial", 0, 1e-3, 0, 10)
    with pytest.raises(ValueError, match="base_lr"):
        train.lr_at("linear", 0, float("nan"), 0, 10)
    with pytest.raises(ValueError, match="base_lr"):
        train.lr_at("linear", 0, -1e-3, 0, 10)
    with pytest.raises(ValueError, match="step"):
        train.lr_at("linear", -1, 1e-3, 0, 10)
    with pytest.raises(ValueError, match="warmup"):
        train.lr_at("linear", 0, 1e-3, -0.1, 10)
    with pytest.raises(ValueError, match="warmup"):
        train.lr_at("cosine", 0, 1e-3, float("nan"), 10)
    with pytest.raises(ValueError, match="total_steps"):
        train.lr_at("cosine", 0, 1e-3, 0, -1)


def test_python_names_are_the_engines():
    """TrainingArguments and `qlora-native train --scheduler` offer exactly the schedules the engine
    knows (one Python list, trainer.LR_SCHEDULES, checked against the engine's own refusal)."""
    import argparse
    import re

    from qlora_native import cli_train

    with pytest.raises(ValueError) as e:
        train.lr_at("nope", 0, 1e-3, 0, 10)
    engine = re.search(r"supported: ([\w, ]+)\)", str(e.value)).group(1).split(", ")
    assert sorted(engine) == sorted(LR_SCHEDULES)
    p = argparse.ArgumentParser()
    cli_train.add_parser(p.add_subparsers())
    sub = p._subparsers._group_actions[0].choices["train"]
    assert tuple(next(a for a in sub._actions if a.dest == "scheduler").choices) == LR_SCHEDULES
