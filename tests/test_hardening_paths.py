"""Paths whose bytes are not UTF-8 (legal on Linux; Python gives them as str with lone surrogates,
os.fsdecode). Before: every binding taking a path refused them with pybind11's TypeError
"incompatible function arguments" (the C API took them), an engine message naming one became a
UnicodeDecodeError, and a str path with an embedded NUL opened the file named by its first part.
Now every _core parameter naming a file takes str (os.fsencode's rule), bytes and os.PathLike
(python/bindings/fs_path.hpp; qlora_native.fspath.core_path is the same rule) and the engine's
messages come back decoded with surrogateescape: the path in them is the str the caller passed."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers_tiny import build_tiny

from qlora_native import FormatError, LoraConfig, Model, _core
from qlora_native import io as qio
from qlora_native.data import IGNORE_INDEX, Example
from qlora_native.fspath import core_path, text_of_path

NAME = os.fsdecode(b"m\xffdir")  # the directory name is the bytes b"m\xffdir"
CFG = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def mdir(tmp_path_factory):
    """The tiny model with a byte-level BPE tokenizer in a directory named b"m\\xffdir"."""
    from helpers_tokenizer import build_hf_tokenizer_dir

    root = tmp_path_factory.mktemp("paths")
    if os.fsencode(NAME) != b"m\xffdir":
        pytest.skip(f"the file system encoding ({os.sys.getfilesystemencoding()}) does not map b'\\xff' to '\\udcff'")
    d = os.path.join(str(root), NAME)
    try:
        os.mkdir(d)
    except OSError as e:  # e.g. a file system that insists on UTF-8 names (EILSEQ)
        pytest.skip(f"the file system refuses a non-UTF-8 name: {e}")
    tok = build_hf_tokenizer_dir(root / "tok", "llama3", vocab_size=300)
    build_tiny(str(root / "src"), vocab_size=320)
    for src in (tok, root / "src"):
        for f in os.listdir(src):
            if f != "config.json" or src != tok:
                shutil.copy(os.path.join(src, f), os.path.join(d, f))
    return d


def test_model_and_tokenizer_load(mdir):
    m = Model.from_pretrained(mdir, quantize=None)
    assert m.name_or_path == mdir and m.tokenizer is not None and m.tokenizer.source == mdir
    ids = m.tokenizer.encode("hello world")
    assert m(np.array([ids])).shape == (1, len(ids), 320)
    t = _core.Tokenizer(core_path(mdir))  # the C++ tokenizer: same ids, its source is the str given
    assert t.source == mdir and list(t.encode("hello world", True, False)) == list(ids)
    b = Model.from_pretrained(os.fsencode(mdir), quantize=None)  # the bytes of the name work too
    assert b.name_or_path == mdir and b.tokenizer.encode("hello world") == ids


def test_adapter_save_and_load(mdir):
    m = Model.from_pretrained(mdir, tokenizer=None)
    m.add_adapter("a", CFG, seed=3)
    rng = np.random.default_rng(0)
    m.set_adapter_state_dict("a", {k: rng.standard_normal(v.shape).astype(np.float32)
                                   for k, v in m.get_adapter_state_dict("a").items()})
    out = os.path.join(mdir, "adapter")
    m.save_adapter(out)
    m.load_adapter(out, "b")
    a, b = m.get_adapter_state_dict("a"), m.get_adapter_state_dict("b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    with open(os.path.join(out, "adapter_config.json"), encoding="utf-8") as f:  # valid UTF-8 JSON
        saved = json.load(f)["base_model_name_or_path"]
    assert saved == text_of_path(mdir) and saved.endswith("m\\xffdir")


def test_safetensors_and_json(mdir):
    p = os.path.join(mdir, "x.safetensors")
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    qio.save_safetensors(p, {"w": w}, metadata={"k": "v"})
    with qio.safe_open(p) as f:
        assert f.path == p and np.array_equal(f["w"], w) and f.metadata() == {"k": "v"}
    assert _core.io.SafetensorsFile(core_path(p)).path == p  # the engine's own path, decoded as given
    cfg = os.path.join(mdir, "config.json")
    with open(cfg, encoding="utf-8") as f:
        want = json.load(f)
    assert qio.json_load(cfg) == want and qio.read_json(cfg) == want


@pytest.mark.parametrize("call", ["safe_open", "json_load", "from_pretrained", "load_adapter", "tokenizer"])
def test_missing_file_is_file_not_found_naming_it(mdir, call):
    from qlora_native import Tokenizer
    from qlora_native.adapter_io import load_adapter

    p = os.path.join(mdir, "missing")
    fn = {"safe_open": qio.safe_open, "json_load": qio.json_load, "load_adapter": load_adapter,
          "from_pretrained": lambda q: Model.from_pretrained(q + ".gguf", tokenizer=None),  # the engine's reader
          "tokenizer": lambda q: _core.Tokenizer(core_path(q))}[call]
    with pytest.raises(FileNotFoundError) as e:
        fn(p)
    assert p in str(e.value) or e.value.filename in (p, p + ".gguf")
    with pytest.raises(FileNotFoundError, match="missing"):
        Tokenizer.from_pretrained(p)


def test_corrupt_files_keep_their_exception_class_and_name_the_path(mdir):
    bad = os.path.join(mdir, "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(FormatError) as e:  # was UnicodeDecodeError
        qio.safe_open(bad)
    assert bad in str(e.value)
    bad_json = os.path.join(mdir, "bad.json")
    with open(bad_json, "w") as f:
        f.write('{"a": 1, "a": 2}')
    with pytest.raises(FormatError) as e:
        qio.json_load(bad_json)
    assert bad_json in str(e.value)
    with pytest.raises(NotADirectoryError) as e:  # a file where the adapter directory goes
        from qlora_native.adapter_io import load_adapter

        load_adapter(bad_json)
    assert bad_json in str(e.value) or e.value.filename == bad_json


def test_embedded_nul_is_refused(mdir):
    cfg = os.path.join(mdir, "config.json")
    for call in (qio.json_load, qio.safe_open, lambda p: qio.save_safetensors(p, {})):
        with pytest.raises(ValueError, match="null byte"):  # was: the file named up to the NUL
            call(cfg + "\0.safetensors")
    with pytest.raises(TypeError):
        core_path(3)


def test_gguf_export_and_load(mdir):
    m = Model.from_pretrained(mdir, quantize=None)
    p = os.path.join(mdir, "model.gguf")
    m.export_gguf(p, "f32")
    from qlora_native.gguf_check import check_gguf

    assert check_gguf(p).path == p
    g = Model.from_pretrained(p, quantize=None)
    ids = np.array([[1, 5, 9, 11]])
    np.testing.assert_allclose(g(ids), m(ids), rtol=0, atol=1e-4)
    assert g.tokenizer is not None and g.tokenizer.encode("hello") == m.tokenizer.encode("hello")
    m.add_adapter("a", CFG, seed=3)  # a llama.cpp LoRA file there too
    lp = os.path.join(mdir, "lora.gguf")
    m.export_gguf_lora(lp)
    m.load_adapter(lp, "b")
    a, b = m.get_adapter_state_dict("a"), m.get_adapter_state_dict("b")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_save_pretrained_and_reload(mdir):
    m = Model.from_pretrained(mdir, quantize=None)
    out = os.path.join(mdir, "saved-model")  # atomic_io.save_dir's staging and swap under such a name
    m.save_pretrained(out)
    m.save_pretrained(out)  # again: the old save is replaced as a unit
    r = Model.from_pretrained(out, quantize=None)
    ids = np.array([[1, 5, 9, 11]])
    np.testing.assert_array_equal(r(ids), m(ids))
    assert r.tokenizer.encode("hello world") == m.tokenizer.encode("hello world")
    assert sorted(os.listdir(mdir)) == sorted(set(os.listdir(mdir)))  # nothing left beside it
    assert not [f for f in os.listdir(mdir) if "qlora-tmp" in f or "qlora-old" in f]


def test_trainer_checkpoint_save_and_resume(mdir):
    from qlora_native.trainer import Trainer, TrainingArguments

    rng = np.random.default_rng(0)
    ex = [Example(ids, [IGNORE_INDEX] * 2 + ids[2:], line=i + 1)
          for i, ids in enumerate(rng.integers(3, 320, (8, 8)).tolist())]
    out = os.path.join(mdir, "run")

    def args():
        return TrainingArguments(output_dir=out, learning_rate=0.01, max_steps=4, per_device_train_batch_size=2,
                                 logging_steps=1, disable_tqdm=True, seed=7, max_seq_len=16, save_steps=2)

    first = Trainer(Model.from_pretrained(mdir, tokenizer=None), CFG, ex, None, args())
    first.train()
    assert os.path.isdir(os.path.join(out, "checkpoint-2")) and os.path.isdir(os.path.join(out, "checkpoint-4"))
    t = Trainer(Model.from_pretrained(mdir, tokenizer=None), CFG, ex, None, args())
    t.train(resume_from_checkpoint=os.path.join(out, "checkpoint-2"))
    assert t.global_step == 4
    a, b = first.model.get_adapter_state_dict(), t.model.get_adapter_state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)  # the resumed run ends where the straight one did


def test_sentencepiece_tokenizer_and_save_pretrained(mdir, tmp_path):
    from helpers_tokenizer import sentencepiece_dir, train_sentencepiece

    from qlora_native import Tokenizer

    model = train_sentencepiece(tmp_path, vocab_size=600, n_lines=600)
    d = str(sentencepiece_dir(os.path.join(mdir, "sp"), model))
    t = Tokenizer.from_pretrained(d)  # sentencepiece took only UTF-8 names
    want = Tokenizer.from_pretrained(str(sentencepiece_dir(tmp_path / "plain", model)))
    assert t.source == d and t.encode("hello world 123") == want.encode("hello world 123")
    out = os.path.join(mdir, "saved")
    Tokenizer.from_pretrained(mdir).save_pretrained(out)
    assert Tokenizer.from_pretrained(out).encode("hello world") == Tokenizer.from_pretrained(mdir).encode("hello world")
    with open(os.path.join(d, "tokenizer.model"), "wb") as f:
        f.write(b"not a model")
    with pytest.raises(FormatError) as e:
        Tokenizer.from_pretrained(d)
    assert os.path.join(d, "tokenizer.model") in str(e.value)


@pytest.mark.parametrize("encoding", ["utf-8:strict", "ascii:strict"])
def test_cli_prints_such_a_path_under_a_strict_stdout(mdir, encoding):
    """Under a locale whose stdout is strict (en_US.UTF-8, not C / POSIX) printing such a path raised
    UnicodeEncodeError after the command's work (exit 1). Now its bytes go out as the OS has them (what
    a script's $(qlora-native model-path DIR) needs); other characters the encoding lacks as escapes."""
    env = dict(os.environ, PYTHONIOENCODING=encoding, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-m", "qlora_native", "model-path", mdir], capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == os.fsencode(os.path.abspath(mdir)) + b"\n"
    other = os.path.join(os.path.dirname(mdir), "caf\u00e9")  # encodable in UTF-8, not in ASCII
    os.makedirs(other, exist_ok=True)
    out = subprocess.run([sys.executable, "-m", "qlora_native", "model-path", other], capture_output=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    want = os.path.abspath(other).encode("utf-8" if encoding.startswith("utf-8") else "ascii", "backslashreplace")
    assert out.stdout == want + b"\n"


# ---------------------------------------------------------------- the engine's own path parameters
# Before: only the package's calls worked (fspath.core_path hands _core bytes); _core called directly
# with the str os.listdir / os.fsdecode give for such a name raised pybind11's TypeError, and a
# PathLike was refused. Now every _core parameter that names a file takes str (os.fsencode's rule:
# surrogateescape), bytes and os.PathLike through one converter (python/bindings/fs_path.hpp).
def _core_calls(mdir):
    """(name, fn(path form of `where`), where): each _core binding that takes a path, on a file of mdir."""
    import pathlib

    def adapter_items():  # layer 0's q_proj / v_proj factors (CFG: r = 4)
        z = {"A": np.zeros((4, 64), np.float32), "B": np.zeros((64, 4), np.float32)}
        return [(f"base_model.model.model.layers.0.self_attn.{m}.lora_{k}.weight", "F32", z[k].shape,
                 z[k].reshape(-1).view(np.uint8)) for m in ("q_proj", "v_proj") for k in "AB"]

    cfg = CFG.peft_config_json(None)
    return [
        ("SafetensorsFile", lambda p: _core.io.SafetensorsFile(p).path, "model.safetensors"),
        ("save_safetensors", lambda p: _core.io.save_safetensors(p, [], {}), "written.safetensors"),
        ("json_load_file", lambda p: _core.io.json_load_file(p)["vocab_size"], "config.json"),
        ("write_peft_adapter", lambda p: _core.io.write_peft_adapter(p, adapter_items(), cfg), "core-adapter"),
        ("read_peft_adapter", lambda p: len(_core.io.read_peft_adapter(p)[1]), "core-adapter"),
        ("load_hf_model", lambda p: _core.config.load_hf_model(p, "cpu", False) is not None, "."),
        ("Tokenizer", lambda p: _core.Tokenizer(p).source, "."),
    ], pathlib.Path


@pytest.mark.parametrize("form", ["str", "bytes", "PathLike"])
def test_core_path_parameters_take_str_bytes_and_pathlike(mdir, form):
    calls, Path = _core_calls(mdir)
    conv = {"str": lambda s: s, "bytes": os.fsencode, "PathLike": Path}[form]
    for name, fn, where in calls:
        p = os.path.normpath(os.path.join(mdir, where))
        assert os.fsencode(p).count(b"\xff") == 1 and isinstance(p, str)  # the non-UTF-8 name, as a str
        got = fn(conv(p))  # was TypeError "incompatible function arguments" for the str and the Path
        if name in ("SafetensorsFile", "Tokenizer"):
            assert got == p, name  # the engine's path comes back as the str os.fsdecode gives
    with pytest.raises(ImportError):  # the NCCL loader's candidates (no NCCL here: ImportError, not TypeError)
        _core.nccl.load([conv(os.path.join(mdir, "libnccl.so.2"))])


def test_core_path_parameters_refuse_nul_and_other_types(mdir):
    calls, _ = _core_calls(mdir)
    for name, fn, where in calls:
        p = os.path.join(mdir, where)
        for bad in (p + "\0x", os.fsencode(p) + b"\0x"):
            with pytest.raises(ValueError, match="null byte"):  # not the file named up to the NUL
                fn(bad)
        with pytest.raises(TypeError, match="str, bytes or os.PathLike"):
            fn(3)
    with pytest.raises(ValueError, match="null byte"):
        _core.nccl.load([os.path.join(mdir, "lib\0nccl")])


def test_safetensors_source_takes_what_the_package_takes(mdir):
    """SafetensorsSource(path) took only str / PathLike: a bytes path raised os.path.join's "Can't mix
    strings and bytes" TypeError. Now it goes through the engine's path rule (fspath.core_path)."""
    import pathlib

    from qlora_native.model import SafetensorsSource

    want = SafetensorsSource(mdir)
    for p in (os.fsencode(mdir), pathlib.Path(mdir)):
        src = SafetensorsSource(p)
        assert src.names() == want.names() and src.files["model.safetensors"].path == os.path.join(mdir, "model.safetensors")
    with pytest.raises(ValueError, match="null byte"):
        SafetensorsSource(os.fsencode(mdir) + b"\0x")
    with pytest.raises(TypeError, match="str, bytes or os.PathLike"):
        SafetensorsSource(3)
    with pytest.raises(FileNotFoundError, match="no model.safetensors") as e:  # names the directory as os.fsdecode gives it
        SafetensorsSource(os.fsencode(os.path.join(mdir, "missing")))
    assert e.value.filename == os.path.join(mdir, "missing")
