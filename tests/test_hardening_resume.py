"""Trainer checkpoints against corrupt or hand-edited files (the session-16 fuzz sweep): every
case here resumed silently with a wrong position, counter or optimizer value (a run 'finished' at
step 10^18, an epoch skipped, a negative train_loss, Adam moments cast from int32), or failed with
a bare KeyError / AttributeError / pybind11 'Unable to cast' RuntimeError naming nothing.
Now each is a ValueError (FormatError for the files) naming the file and the field."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from helpers_tiny import build_tiny

from qlora_native import FormatError, LoraConfig, Model
from qlora_native import io as qio
from qlora_native.data import IGNORE_INDEX, Example
from qlora_native.trainer import Trainer, TrainingArguments

CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


def _args(out, **kw):
    d = dict(output_dir=str(out), learning_rate=0.01, max_steps=4, per_device_train_batch_size=2, logging_steps=1,
             disable_tqdm=True, seed=7, max_seq_len=16, save_steps=2)
    d.update(kw)
    return TrainingArguments(**d)


def _examples():
    rng = np.random.default_rng(0)
    out = []
    for i in range(12):
        ids = rng.integers(3, 64, 8).tolist()
        out.append(Example(ids, [IGNORE_INDEX] * 3 + ids[3:], line=i + 1))
    return out


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    mdir = build_tiny(str(root / "model"))
    Trainer(Model.from_pretrained(mdir, tokenizer=None), CFG, _examples(), None, _args(root / "base")).train()
    return mdir, root / "base" / "checkpoint-2"


def _resume(mdir, ckpt, out):
    t = Trainer(Model.from_pretrained(mdir, tokenizer=None), CFG, _examples(), None, _args(out))
    return t.train(resume_from_checkpoint=str(ckpt))


def _copy(base, tmp_path):
    d = tmp_path / "ck"
    shutil.copytree(base[1], d)
    return d


def _edit_json(path, fn):
    obj = json.loads(path.read_text())
    new = fn(obj)  # a replacement document, or None / a popped value after an edit in place
    path.write_text(json.dumps(new if isinstance(new, (list, dict)) else obj))


def test_untouched_checkpoint_resumes(base, tmp_path):
    assert _resume(base[0], base[1], tmp_path / "o")["global_step"] == 4


STATE = [
    ("global_step", 10**18, r"'global_step' must be an int in \[0, 4\], got 1000000000000000000"),
    ("global_step", 2.5, r"'global_step' must be an int"),
    ("global_step", True, r"'global_step' must be an int"),
    ("epoch", 10**9, r"'epoch' must be an int in \[0, 2\]"),
    ("batch_in_epoch", -1, r"'batch_in_epoch' must be an int in \[0, 6\], got -1"),
    ("batch_in_epoch", 10**9, r"'batch_in_epoch' must be an int in \[0, 6\]"),
    ("tokens_seen", -5, r"'tokens_seen' must be an int"),
    ("loss_tokens", -1, r"'loss_tokens' must be an int"),
    ("loss_sum", -1e8, r"'loss_sum' must be a finite number >= 0"),
    ("loss_sum", "1.0", r"'loss_sum' must be a finite number >= 0"),
    ("rng", 3, r"'rng' must be an object"),
    ("log_history", [1, "x"], r"'log_history' must be a list of objects"),
]


@pytest.mark.parametrize("key,value,match", STATE, ids=[f"{k}={v!r}"[:30] for k, v, _ in STATE])
def test_bad_trainer_state_field_is_named(base, tmp_path, key, value, match):
    d = _copy(base, tmp_path)
    _edit_json(d / "trainer_state.json", lambda s: s.__setitem__(key, value))
    with pytest.raises(FormatError, match=match) as e:
        _resume(base[0], d, tmp_path / "o")
    assert str(d / "trainer_state.json") in str(e.value)


def test_trainer_state_that_is_not_an_object(base, tmp_path):
    d = _copy(base, tmp_path)
    (d / "trainer_state.json").write_text("[1]")
    with pytest.raises(FormatError, match="expected a JSON object, got list"):
        _resume(base[0], d, tmp_path / "o")


SKELETON = [
    ("a list", lambda k: [], r"optimizer.json: the optimizer state must be an object"),
    ("__dict__ not an object", lambda k: {"__dict__": 5}, r"an object must hold '__dict__'"),
    ("__tuple__ not a list", lambda k: {"__tuple__": 5}, r"'__tuple__' must be a list"),
    ("step None", lambda k: k["__dict__"].__setitem__("step", None), r"optimizer state: 'step' must be an int"),
    ("step 10^30", lambda k: k["__dict__"].__setitem__("step", 10**30), r"'step' must be an int below 2\^63"),
    ("step missing", lambda k: k["__dict__"].pop("step"), r"optimizer state: missing key 'step'"),
    ("betas scalar", lambda k: k["__dict__"].__setitem__("betas", 0.9), r"'betas' must be a pair of numbers, got 0.9"),
    ("eps string", lambda k: k["__dict__"].__setitem__("eps", "x"), r"'eps' must be a number, got 'x'"),
    ("lr nan", lambda k: k["__dict__"].__setitem__("lr", float("nan")), r"'lr' must be a finite number >= 0"),
    ("dropout_seed 2.5", lambda k: k["__dict__"].__setitem__("dropout_seed", 2.5), r"'dropout_seed' must be an int"),
    ("dropout_step inf", lambda k: k["__dict__"].__setitem__("dropout_step", float("inf")), r"'dropout_step' must be an int"),
]


@pytest.mark.parametrize("edit,match", [c[1:] for c in SKELETON], ids=[c[0] for c in SKELETON])
def test_bad_optimizer_json_is_named(base, tmp_path, edit, match):
    d = _copy(base, tmp_path)
    _edit_json(d / "optimizer.json", edit)
    with pytest.raises(ValueError, match=match):
        _resume(base[0], d, tmp_path / "o")


def test_integer_optimizer_moments_are_refused(base, tmp_path):
    d = _copy(base, tmp_path)
    f = qio.safe_open(d / "optimizer.safetensors")
    t = {k: np.array(f[k]) for k in f.keys()}
    first = sorted(t)[0]
    t[first] = t[first].astype(np.int32)  # was cast back to float32: the moments truncated to integers
    del f
    (d / "optimizer.safetensors").unlink()
    qio.save_safetensors(d / "optimizer.safetensors", t)
    with pytest.raises(FormatError, match=f"tensor '{first}' is int32, not a float type"):
        _resume(base[0], d, tmp_path / "o")


def test_refused_optimizer_state_leaves_the_model_as_it_was(base, tmp_path):
    """The engine refuses the checkpoint's optimizer state (beta1 1.5) after its adapter weights were
    read: the resume fails naming it and puts back the weights (and optimizer) the model had, instead
    of leaving the checkpoint's weights under this run's optimizer."""
    d = _copy(base, tmp_path)
    _edit_json(d / "optimizer.json", lambda k: k["__dict__"].__setitem__("betas", {"__tuple__": [1.5, 0.999]}))
    m = Model.from_pretrained(base[0], tokenizer=None)
    t = Trainer(m, CFG, _examples(), None, _args(tmp_path / "o"))
    name = t.adapter
    before = {k: v.copy() for k, v in m.get_adapter_state_dict(name).items()}
    with pytest.raises(ValueError, match="beta"):
        t.train(resume_from_checkpoint=str(d))
    after = m.get_adapter_state_dict(name)
    ckpt = qio.safe_open(d / "adapter_model.safetensors")
    assert any(not np.array_equal(np.asarray(ckpt[k]), before[k]) for k in ckpt.keys() if k in before)
    for k, v in before.items():
        np.testing.assert_array_equal(after[k], v, err_msg=k)
    opt = m.get_optimizer_state()  # the run's own, as train() configured it before the resume
    assert opt["step"] == 0 and tuple(opt["betas"]) == (0.9, 0.999)
    assert all(not np.any(a) for a in opt["exp_avg"])


@pytest.mark.parametrize("bad", ["int32", "bool", "shape", "nan"])
def test_set_adapter_state_dict_is_all_or_nothing(tmp_path, bad):
    """A bad tensor in the last layer (an integer / bool array, a wrong shape, NaN) is refused and the
    adapter is as it was: the earlier layers used to stay overwritten, and integer arrays were cast to
    float32 silently."""
    m = Model.from_pretrained(build_tiny(str(tmp_path / "m")), tokenizer=None)
    m.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj"]))
    m.set_active_adapter("a")
    before = m.get_adapter_state_dict("a")
    t = {k: v + 1.0 for k, v in before.items()}
    last = sorted(t)[-1]
    t[last] = {"int32": lambda v: (v * 100).astype(np.int32), "bool": lambda v: v > 0,
               "shape": lambda v: v[:, :-1], "nan": lambda v: np.where(v > 0, np.nan, v)}[bad](t[last])
    match = {"int32": last.replace(".", r"\.") + "' is int32", "bool": last.replace(".", r"\.") + "' is bool",
             "shape": "B must have shape", "nan": "layer 1 q_proj: LoRA: B contains NaN or Inf"}[bad]
    with pytest.raises(ValueError, match=match):
        m.set_adapter_state_dict("a", t)
    for k, v in m.get_adapter_state_dict("a").items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    good = {k: v + 1.0 for k, v in before.items()}
    m.set_adapter_state_dict("a", good)  # a float64 dict is still taken (as PEFT's state dicts are)
    for k, v in m.get_adapter_state_dict("a").items():
        np.testing.assert_array_equal(v, good[k].astype(np.float32), err_msg=k)


def test_set_optimizer_state_refuses_integer_moments(tmp_path):
    """Adam moments given as integers (a hand-made or mis-saved state) were cast to float32 silently."""
    m = Model.from_pretrained(build_tiny(str(tmp_path / "m")), tokenizer=None)
    m.add_adapter("a", LoraConfig(r=4, target_modules=["q_proj"]))
    m.set_active_adapter("a")
    m.configure_optimizer(lr=1e-3)
    st = m.get_optimizer_state()
    bad = dict(st, exp_avg_sq=[np.asarray(a).astype(np.int64) for a in st["exp_avg_sq"]])
    with pytest.raises(ValueError, match=r"exp_avg_sq\[0\] is int64, not a float type"):
        m.set_optimizer_state(bad)
    m.set_optimizer_state(st)  # the float32 state is still taken
