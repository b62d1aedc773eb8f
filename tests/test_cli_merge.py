"""`qlora-native merge` on tiny random models: the saved checkpoint equals the in-process merge, the
drift table is printed, NF4 / bf16 / eval text options, combinations, and one-line errors."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

import qlora_native
from qlora_native import LoraConfig
from qlora_native.cli import main

from helpers_tiny import add_random_adapter, build_tiny

IDS = np.array([[1, 5, 9, 33, 2, 17, 60, 4, 8, 21, 44, 3]], np.int32)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("climerge")
    base = build_tiny(str(tmp / "base"))
    adapters = []
    for seed in (1, 2):
        m = qlora_native.Model.from_pretrained(base)
        add_random_adapter(m, "a", seed)
        m.save_adapter(str(tmp / f"ad{seed}"))
        adapters.append(str(tmp / f"ad{seed}"))
    return tmp, base, adapters


def _in_process(base, adapter, **kw):
    m = qlora_native.Model.from_pretrained(base)
    m.load_adapter(adapter)
    return m, m.merge_and_unload(**kw)


def test_merge_single_adapter_fp32(setup, capsys):
    tmp, base, (ad, _) = setup
    out = tmp / "out_fp32"
    assert main(["merge", "--model", base, "--adapter", ad, "--output", str(out)]) == 0
    cap = capsys.readouterr()
    assert "merge" in cap.err and "2/2" in cap.err  # the tqdm bar over layers
    assert f"merged adapter '{ad}' -> float32" in cap.out and "perplexity" in cap.out
    conf = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in conf and conf["torch_dtype"] == "float32"
    ref, report = _in_process(base, ad, eval_ids=IDS)
    saved = qlora_native.Model.from_pretrained(out, quantize=None)
    np.testing.assert_array_equal(saved(IDS), ref(IDS))  # same fp32 weights, same logits
    assert "random token ids" in cap.out  # no tokenizer: the fixed random sample


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_nf4_and_no_progress(setup, capsys, dtype):
    tmp, base, (ad, _) = setup
    out = tmp / f"out_nf4_{dtype}"
    assert main(["merge", "--model", base, "--adapter", ad, "--output", str(out), "--quantize", "nf4",
                 "--dtype", dtype, "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert "NF4 (re-quantized)" in cap.out and "merge:" not in cap.err
    conf = json.loads((out / "config.json").read_text())
    assert conf["quantization_config"]["bnb_4bit_quant_type"] == "nf4" and conf["torch_dtype"] == dtype
    ref, report = _in_process(base, ad, quantize="nf4", dtype=dtype)
    assert f"{report['loss_merged']:.5f}" in cap.out  # the printed numbers are the measured ones
    saved = qlora_native.Model.from_pretrained(out)
    for l in range(2):  # the re-quantized projections are saved as they are
        for p in ("self_attn.q_proj", "mlp.down_proj"):
            a, b = saved.nf4_weight(f"model.layers.{l}.{p}"), ref.nf4_weight(f"model.layers.{l}.{p}")
            for k in ("packed", "absmax", "nested_absmax"):
                np.testing.assert_array_equal(a[k], b[k])
    if dtype == "float32":  # bfloat16 also rounds the embeddings / norms on save
        np.testing.assert_array_equal(saved(IDS), ref(IDS))


def test_merge_eval_text_with_tokenizer(tmp_path, capsys):
    from helpers_tokenizer import build_hf_tokenizer_dir

    base = build_tiny(str(tmp_path / "base"), vocab_size=320)
    tok = build_hf_tokenizer_dir(tmp_path / "tok", vocab_size=300)
    for f in os.listdir(tok):
        if f.startswith("tokenizer"):
            os.replace(tok / f, os.path.join(base, f))
    m = qlora_native.Model.from_pretrained(base)
    add_random_adapter(m, "a", 3)
    m.save_adapter(str(tmp_path / "ad"))
    text = tmp_path / "eval.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 3, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["merge", "--model", base, "--adapter", str(tmp_path / "ad"), "--output", str(out),
                 "--eval-text", str(text), "--quantize", "nf4", "--no-progress"]) == 0
    cap = capsys.readouterr()
    n = len(m.tokenizer.encode(text.read_text()))
    assert f"drift on {n} tokens of eval_text" in cap.out
    assert (out / "tokenizer.json").is_file()


def test_merge_weighted_combination(setup, capsys):
    tmp, base, (a1, a2) = setup
    if not hasattr(qlora_native.Model, "add_weighted_adapter"):
        pytest.skip("add_weighted_adapter is not available")
    out = tmp / "out_mix"
    assert main(["merge", "--model", base, "--adapter", a1, "--adapter", a2, "--weights", "0.7,0.3",
                 "--combination", "linear", "--output", str(out), "--no-progress"]) == 0
    cap = capsys.readouterr()
    assert f"linear(0.7*{a1}, 0.3*{a2})" in cap.out
    ref = qlora_native.Model.from_pretrained(base)
    ref.load_adapter(a1, "x")
    ref.load_adapter(a2, "y")
    ref.add_weighted_adapter(["x", "y"], [0.7, 0.3], "mix", combination_type="linear")
    ref.set_active_adapter("mix")
    ref.merge_and_unload(eval_ids=IDS)
    saved = qlora_native.Model.from_pretrained(out, quantize=None)
    np.testing.assert_array_equal(saved(IDS), ref(IDS))


def test_merge_gguf(setup, capsys):
    tmp, base, (ad, _) = setup
    if not hasattr(qlora_native.Model, "export_gguf"):
        pytest.skip("export_gguf is not available")
    out = tmp / "out_gguf"
    assert main(["merge", "--model", base, "--adapter", ad, "--output", str(out), "--gguf", "f32",
                 "--no-progress"]) == 0
    assert (out / "model.f32.gguf").stat().st_size > 0


@pytest.mark.parametrize("extra, status, msg", [
    (["--weights", "0.5,0.5"], 2, "--weights has 2 value(s) for 1 adapter(s)"),
    (["--weights", "a"], 2, "--weights must be comma-separated numbers"),
    (["--adapter", "{ad}"], 2, "--weights: 2 adapters need one weight each"),
    (["--density", "0.5"], 2, "--density / --svd-rank apply to a combination"),
    (["--gguf", "q4_k"], 2, "--gguf must be f32, f16, bf16 or q8_0"),
    (["--dtype", "int8"], 2, "invalid choice: 'int8'"),
    (["--eval-text", "{missing}"], 1, "No such file or directory"),
    (["--eval-text", "{binary}"], 1, "not UTF-8 text"),
    (["--eval-text", "{text}"], 1, "eval_text needs the model's tokenizer"),
    (["--output", "{file}"], 1, "exists and is not a directory"),
])
def test_merge_errors_one_line(setup, capsys, extra, status, msg):
    tmp, base, (ad, _) = setup
    (tmp / "bin.txt").write_bytes(b"\xff\xfe\x00abc")
    (tmp / "ok.txt").write_text("hello world", encoding="utf-8")
    (tmp / "afile").write_text("x")
    fill = {"ad": ad, "missing": str(tmp / "nope.txt"), "binary": str(tmp / "bin.txt"), "text": str(tmp / "ok.txt"),
            "file": str(tmp / "afile")}
    args = ["merge", "--model", base, "--adapter", ad, "--output", str(tmp / "err_out"), "--no-progress"]
    args += [e.format(**fill) for e in extra]
    if status == 2:
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2
    else:
        assert main(args) == 1
    err = capsys.readouterr().err
    assert msg in err
    if status == 1:
        lines = [ln for ln in err.splitlines() if ln.startswith("qlora-native merge: error:")]
        assert len(lines) == 1
    assert not (tmp / "err_out").exists()  # nothing written


def test_merge_adapter_for_another_base(setup, tmp_path, capsys):
    tmp, base, _ = setup
    other = build_tiny(str(tmp_path / "other"), hidden_size=48)
    m = qlora_native.Model.from_pretrained(other)
    m.add_adapter("a", LoraConfig(r=2, target_modules=["q_proj"]))
    m.save_adapter(str(tmp_path / "ad_other"))
    assert main(["merge", "--model", base, "--adapter", str(tmp_path / "ad_other"), "--output",
                 str(tmp_path / "o"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "qlora-native merge: error:" in err and "shape" in err
    assert not (tmp_path / "o").exists()
