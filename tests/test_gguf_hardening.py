"""GGUF loading against hostile or broken files (issue 14): every count, length and offset is
checked before anything is parsed or allocated; config fields are typed and range-checked; a
corpus of mutants of a tiny GGUF each gives a clean exception (or loads, if harmless)."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from helpers_gguf import HIDDEN, VOCAB, Field, map_gguf, put, write_tiny_gguf

import qlora_native
from qlora_native import FormatError, Model, Tokenizer

MiB = 1 << 20


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import gguf

    T = gguf.GGUFValueType
    # a byte array too: the gguf package's reader loops forever on one whose count runs past the end
    p = write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf",
                        kv_overrides={"test.bytes": ([1, 2, 3], T.ARRAY, T.UINT8)})
    data = p.read_bytes()
    return p, data, map_gguf(data)


def _field(m, label) -> Field:
    return next(f for f in m.fields if f.label == label)


def _write(tmp_path, data, name="m.gguf"):
    p = tmp_path / name
    p.write_bytes(bytes(data))
    return p


def _run_isolated(code: str, timeout: float = 60, mem_gib: float = 2.0) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter with an address-space limit (an unbounded allocation
    fails there instead of taking this machine down) and a wall-clock bound."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({int(mem_gib * (1 << 30))}, {int(mem_gib * (1 << 30))}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout, env=env)


# ------------------------------------------------------------------ item 1: counts bounded before parsing
@pytest.mark.parametrize("loader", ["Model", "Tokenizer"])
@pytest.mark.parametrize("elem", ["UINT8", "INT32"])
def test_huge_array_count_is_refused_before_parsing(tiny, tmp_path, loader, elem):
    """token_type claiming 2^40 elements: the gguf package's reader looped past the end of the file,
    allocating until out of memory (UINT8: a bare MemoryError after ~15 s under this test's 2 GiB
    limit; the OOM killer without one). Now refused at once, naming the file and the key."""
    _, data, m = tiny
    if elem == "UINT8":
        T = _T()
        data = write_tiny_gguf(tmp_path / "u8.gguf", kv_overrides={
            "tokenizer.ggml.token_type": ([1] * VOCAB, T.ARRAY, T.UINT8)}).read_bytes()
        m = map_gguf(data)
    p = _write(tmp_path, put(data, _field(m, "count of tokenizer.ggml.token_type"), 1 << 40))
    r = _run_isolated(f"""
        import time, qlora_native
        t = time.time()
        try:
            qlora_native.{loader}.from_pretrained({str(p)!r})
        except qlora_native.FormatError as e:
            print("FormatError", time.time() - t, e)
    """)
    assert r.returncode == 0 and r.stdout.startswith("FormatError"), (r.returncode, r.stdout, r.stderr[-2000:])
    assert str(p) in r.stdout and "tokenizer.ggml.token_type" in r.stdout
    assert float(r.stdout.split()[1]) < 5  # refused up front, not after parsing


def test_every_string_and_count_is_bounded_by_the_file(tiny, tmp_path):
    _, data, m = tiny
    for label in ["tensor_count", "kv_count", "key", "value of tokenizer.ggml.model", "tokenizer.ggml.tokens[1]",
                  "count of tokenizer.ggml.tokens", "tensor name"]:
        p = _write(tmp_path, put(data, _field(m, label), (1 << 64) - 1))
        with pytest.raises(FormatError, match="not a readable GGUF file") as ei:
            qlora_native.gguf_check.check_gguf(p)
        assert str(p) in str(ei.value), label


def test_out_of_memory_while_loading_is_one_memory_error_naming_the_file(tiny, tmp_path):
    """A real out-of-memory: a valid file whose 1M-element metadata array the gguf package's reader
    (used by the tokenizer) turns into ~1 GB of Python objects, under a tight address-space limit.
    Before: a MemoryError inside the reader came out as FormatError "not a readable GGUF file"
    (weights) or as a bare MemoryError with no file (tokenizer)."""
    import gguf

    p = write_tiny_gguf(tmp_path / "big_meta.gguf",
                        kv_overrides={"general.padding": (list(range(1 << 20)), gguf.GGUFValueType.ARRAY,
                                                          gguf.GGUFValueType.UINT32)})
    r = _run_isolated(f"""
        import resource, qlora_native
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (used + 300 * 2**20, hard))
        try:
            qlora_native.Model.from_pretrained({str(p)!r})
            print("LOADED")
        except MemoryError as e:
            print("MemoryError", repr(e.__context__), repr(e.__cause__), e)
    """, mem_gib=4)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("MemoryError None None"), r.stdout
    assert str(p) in r.stdout


def test_memory_error_from_any_stage_names_the_file(tiny, monkeypatch):
    p = tiny[0]

    def boom(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(qlora_native._core.gguf, "load_model", boom)  # the C++ loader (bad_alloc)
    with pytest.raises(MemoryError, match=f"{p}: out of memory while loading") as ei:
        Model.from_pretrained(p, tokenizer=None)
    assert ei.value.__context__ is None and ei.value.__cause__ is None


# ------------------------------------------------------------------ item 2: overlapping / out-of-file data
def test_tensors_sharing_an_offset_are_refused(tiny, tmp_path):
    _, data, m = tiny
    (a, _, rel_a, _), (b, pos_b, _, _) = m.tensor_offsets[3], m.tensor_offsets[7]
    p = _write(tmp_path, put(data, Field(pos_b, "Q", "offset", ""), rel_a))
    with pytest.raises(FormatError, match=f"{a}.*overlap|overlap.*{a}") as ei:
        Model.from_pretrained(p)
    assert str(p) in str(ei.value) and b in str(ei.value)


def test_partially_overlapping_tensors_are_refused(tiny, tmp_path):
    _, data, m = tiny
    (a, _, rel_a, n_a), (b, pos_b, _, _) = m.tensor_offsets[0], m.tensor_offsets[1]  # token_embd: 20400 bytes
    assert 32 * 10 < n_a  # b now starts inside a
    p = _write(tmp_path, put(data, Field(pos_b, "Q", "offset", ""), rel_a + 32 * 10))
    with pytest.raises(FormatError, match="overlap") as ei:
        Model.from_pretrained(p)
    assert str(p) in str(ei.value) and a in str(ei.value) and b in str(ei.value)


def test_tensor_data_past_the_end_of_the_file_is_refused(tiny, tmp_path):
    _, data, m = tiny
    name, pos, _, _ = m.tensor_offsets[-1]
    p = _write(tmp_path, data[: m.data_end - 1])
    with pytest.raises(FormatError, match="runs past the end of the file"):
        Model.from_pretrained(p)
    p = _write(tmp_path, put(data, Field(pos, "Q", "offset", ""), m.size - m.data_offset), "far.gguf")
    with pytest.raises(FormatError, match=f"tensor {name}: data .* runs past the end"):
        Model.from_pretrained(p)


# ------------------------------------------------------------------ item 3: typed config fields
def _T():
    import gguf

    return gguf.GGUFValueType


@pytest.mark.parametrize("key,value,vtype", [
    ("llama.attention.head_count", 4.5, "FLOAT32"),
    ("llama.attention.head_count", True, "BOOL"),
    ("llama.block_count", "2", "STRING"),
    ("llama.embedding_length", 64.0, "FLOAT64"),
    ("llama.attention.head_count_kv", 2.0, "FLOAT32"),
    ("llama.context_length", [256], "ARRAY"),
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", "STRING"),
    ("llama.rope.freq_base", True, "BOOL"),
    ("tokenizer.ggml.eos_token_id", 2.5, "FLOAT32"),
    ("general.architecture", 7, "UINT32"),
])
def test_config_fields_must_have_their_type(tmp_path, key, value, vtype):
    T = _T()
    kv = (value, T.ARRAY, T.UINT32) if vtype == "ARRAY" else (value, getattr(T, vtype))
    p = write_tiny_gguf(tmp_path / "t.gguf", kv_overrides={key: kv})
    with pytest.raises(ValueError, match=f"{key} must be") as ei:
        Model.from_pretrained(p, tokenizer=None)
    assert str(p) in str(ei.value)


def test_bool_bytes_other_than_0_and_1_are_refused(tiny, tmp_path):
    _, data, m = tiny
    f = _field(m, "type of tokenizer.ggml.add_bos_token")
    p = _write(tmp_path, bytearray(data[: f.offset + 4]) + b"\x07" + data[f.offset + 5:])
    with pytest.raises(FormatError, match="add_bos_token is a BOOL holding 7"):
        Model.from_pretrained(p)


# ------------------------------------------------------------------ item 4: clear errors
@pytest.mark.parametrize("key", ["llama.block_count", "llama.attention.head_count", "llama.embedding_length",
                                 "llama.feed_forward_length"])
def test_missing_required_field_is_named(tmp_path, key):
    p = write_tiny_gguf(tmp_path / "t.gguf", drop_keys=[key])
    with pytest.raises(FormatError, match=f"{p}: GGUF metadata {key} is missing"):
        Model.from_pretrained(p, tokenizer=None)


def test_missing_rope_scaling_factor_is_named(tmp_path):
    p = write_tiny_gguf(tmp_path / "t.gguf", kv_overrides={"llama.rope.scaling.type": ("linear", _T().STRING)})
    with pytest.raises(FormatError, match="llama.rope.scaling.factor is missing"):
        Model.from_pretrained(p, tokenizer=None)


@pytest.mark.parametrize("key,value,match", [
    ("llama.attention.head_count_kv", 0, r"head_count_kv = 0 is outside \[1, 4\]"),
    ("llama.attention.head_count_kv", 3, "not a multiple of"),
    ("llama.attention.head_count", 0, r"head_count = 0 is outside"),
    ("llama.block_count", 2**31, r"block_count = 2147483648 is outside"),
    ("llama.embedding_length", 2**40, r"embedding_length = 1099511627776 is outside"),
    ("llama.context_length", 2**62, r"context_length = \d+ is outside"),
    ("llama.vocab_size", 0, r"vocab_size = 0 is outside"),
    ("llama.rope.dimension_count", 0, r"dimension_count = 0 is outside"),
    ("tokenizer.ggml.eos_token_id", 5000, "outside the vocabulary"),
])
def test_out_of_range_integers_are_named(tmp_path, key, value, match):
    p = write_tiny_gguf(tmp_path / "t.gguf", kv_overrides={key: (value, _T().UINT64)})
    with pytest.raises(FormatError, match=match) as ei:
        Model.from_pretrained(p, tokenizer=None)
    assert str(p) in str(ei.value)


def test_non_finite_or_negative_floats_are_named(tmp_path):
    for v in (float("nan"), float("inf"), -1.0, 0.0):
        p = write_tiny_gguf(tmp_path / "t.gguf",
                            kv_overrides={"llama.attention.layer_norm_rms_epsilon": (v, _T().FLOAT32)})
        with pytest.raises(FormatError, match="layer_norm_rms_epsilon = .* must be a positive finite number"):
            Model.from_pretrained(p, tokenizer=None)


def test_zero_dimension_names_the_tensor(tiny, tmp_path):
    _, data, m = tiny
    p = _write(tmp_path, put(data, _field(m, "dim 0 of blk.1.ffn_norm.weight"), 0))
    with pytest.raises(FormatError, match="tensor blk.1.ffn_norm.weight has a zero dimension"):
        Model.from_pretrained(p)


def test_output_weight_of_the_wrong_shape_is_reported_as_such(tmp_path):
    p = write_tiny_gguf(tmp_path / "t.gguf", tensor_overrides={"output.weight": np.zeros((VOCAB - 4, HIDDEN))})
    with pytest.raises(ValueError, match=r"lm_head.weight.*shape \[296, 64\], expected \[300, 64\]"):
        Model.from_pretrained(p, tokenizer=None)


def test_wrong_shape_is_reported_before_anything_is_dequantized(tmp_path):
    p = write_tiny_gguf(tmp_path / "t.gguf", tensor_overrides={"blk.1.attn_q.weight": np.zeros((HIDDEN, 8))})
    with pytest.raises(ValueError, match=r"model.layers.1.self_attn.q_proj.weight.*shape \[64, 8\]"):
        Model.from_pretrained(p, tokenizer=None)


def test_symlink_to_dev_null_or_empty_file(tmp_path):
    link = tmp_path / "null.gguf"
    os.symlink("/dev/null", link)
    with pytest.raises(FormatError, match=f"{link}: not a regular file"):
        Model.from_pretrained(link)
    with pytest.raises(FormatError, match=f"{link}: not a regular file"):
        qlora_native.Tokenizer.from_pretrained(link)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(FormatError, match=f"{empty}: empty file"):
        Model.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Model.from_pretrained(tmp_path / "missing.gguf")


@pytest.mark.parametrize("label,value,match", [
    ("type of llama.block_count", 13, "unknown value type 13"),
    ("type of llama.block_count", 2**32 - 1, "unknown value type"),
    ("element type of tokenizer.ggml.scores", 9, "array of arrays"),
    ("element type of tokenizer.ggml.scores", 99, "array of unknown value type 99"),
    ("type of blk.0.attn_norm.weight", 4, "unknown GGML type 4"),  # Q4_2, removed from GGML
    ("n_dims of blk.0.attn_norm.weight", 5, "5 dimensions"),
    ("n_dims of blk.0.attn_norm.weight", 0, "0 dimensions"),
    ("type of blk.0.attn_norm.weight", 20, "unsupported GGUF type IQ4_NL"),
])
def test_unknown_types_are_refused(tiny, tmp_path, label, value, match):
    _, data, m = tiny
    p = _write(tmp_path, put(data, _field(m, label), value))
    with pytest.raises(ValueError if "unsupported" in match else FormatError, match=match):  # a valid but
        Model.from_pretrained(p)  # unsupported type is not corruption


def test_tiny_gguf_loads_and_generates(tiny):
    model = Model.from_pretrained(tiny[0])
    assert model.config.vocab_size == VOCAB and model.config.num_hidden_layers == 2
    out = model.generate("the cat", max_new_tokens=4)
    assert len(out[0]) == 4


# ------------------------------------------------------------------ item 5: the mutation corpus
_CHILD = r"""
import json, resource, sys, time
limit = int(sys.argv[2])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import qlora_native
jobs = json.load(open(sys.argv[1]))
for path, must_fail in jobs:
    print(json.dumps({"path": path, "start": True}), flush=True)
    t = time.perf_counter()
    try:
        qlora_native.Model.from_pretrained(path)
        res = {"outcome": "loaded"}
    except (ValueError, MemoryError, OSError) as e:  # FormatError is a ValueError
        # running out of memory must say so (and name the file), not pass for a corrupt file
        ok = path in str(e) if isinstance(e, MemoryError) else "MemoryError" not in str(e)
        res = {"outcome": "clean" if ok else "unclean", "type": type(e).__name__, "names_file": path in str(e),
               "msg": str(e)[:300]}
    except BaseException as e:
        res = {"outcome": "unclean", "type": type(e).__name__, "msg": str(e)[:300]}
    res.update(path=path, must_fail=must_fail, seconds=time.perf_counter() - t)
    print(json.dumps(res), flush=True)
"""


def _mutants(data: bytes, m, rng):
    """(label, bytes, must_fail) for truncations, byte flips, huge numbers, overlaps, unknown types."""
    out = []
    meta_end = m.data_offset
    # truncations: at every structure boundary and field, and at random points in the data
    cuts = {0, 3, 4, 8, 16, 24} | {b + d for b in m.boundaries for d in (0, 1)}
    cuts |= {f.offset + d for f in rng.choice(m.fields, 30, replace=False) for d in (0, 5)}
    cuts |= {int(c) for c in rng.integers(0, m.data_end, 60)}
    for c in sorted(x for x in cuts if 0 <= x < m.data_end):
        out.append((f"truncate@{c}", data[:c], True))
    # byte flips, mostly in the metadata
    for pos in list(rng.integers(0, meta_end, 350)) + list(rng.integers(meta_end, m.size, 50)):
        b = bytearray(data)
        b[pos] ^= 1 << int(rng.integers(8))
        out.append((f"flip@{pos}", bytes(b), False))
    # huge or shifted counts, lengths, dims and offsets
    by_kind = {}
    for f in m.fields:
        by_kind.setdefault(f.what, []).append(f)
    plan = [("count", None, [1 << 40, (1 << 64) - 1, 1 << 63], ["+1", "-1"]),
            ("length", 20, [1 << 40, (1 << 64) - 1], ["+1", "-1"]),
            ("dim", 10, [1 << 40, 1 << 62, (1 << 64) - 1], ["*2", "0"]),
            ("n_dims", 6, [1 << 31, (1 << 32) - 1], ["0", "+1"]),
            ("offset", 8, [1 << 40, (1 << 64) - 32], ["+1", "+32"])]
    for kind, n, huge, small in plan:
        fields = by_kind[kind]
        if n is not None and len(fields) > n:
            fields = [fields[i] for i in sorted(rng.choice(len(fields), n, replace=False))]
        for f in fields:
            v = struct.unpack_from("<" + f.code, data, f.offset)[0]
            top = (1 << (64 if f.code == "Q" else 32)) - 1
            for h in huge:
                out.append((f"{f.label}={h}", bytes(put(data, f, min(h, top))), True))
            for s in small:
                nv = {"+1": v + 1, "-1": v - 1, "*2": v * 2, "0": 0, "+32": v + 32}[s]
                if 0 <= nv <= top:
                    out.append((f"{f.label}{s}", bytes(put(data, f, nv)), False))
    # overlapping tensor data
    t = m.tensor_offsets
    for i, j in rng.choice(len(t), (10, 2)):
        if i != j:
            out.append((f"offset of {t[j][0]}=offset of {t[i][0]}",
                        bytes(put(data, Field(t[j][1], "Q", "offset", ""), t[i][2])), True))
    # unknown value / element / tensor types
    types = [f for f in m.fields if f.what in ("type", "ggml_type")]
    for f in [types[i] for i in rng.choice(len(types), 25, replace=False)]:
        for v in (13, 99, (1 << 32) - 1) if f.what == "type" else (4, 99, (1 << 32) - 1):
            out.append((f"{f.label}={v}", bytes(put(data, f, v)), True))
    return out


def _run_batch(tmp_path, todo, results, per_mutant_s: float = 10.0):
    """Runs the mutants in one child; returns (path of the mutant it died or hung on, or None; rc or
    "hang"). A mutant that shows no result within per_mutant_s is a hang: the child is killed."""
    import queue
    import threading

    jf = tmp_path / "jobs.json"
    jf.write_text(json.dumps(todo))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(jf), str(2 << 30)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout] + [lines.put(None)], daemon=True).start()
    started, deadline = None, 30.0  # the first mutant also waits for the imports
    while True:
        try:
            line = lines.get(timeout=deadline)
        except queue.Empty:
            proc.kill()
            proc.wait()
            return started, "hang"
        deadline = per_mutant_s
        if line is None:
            rc = proc.wait()
            return (started, rc) if started is not None or rc != 0 else (None, 0)
        d = json.loads(line)
        if d.get("start"):
            started = d["path"]
        else:
            results[d["path"]] = d
            started = None


def test_mutation_corpus_gives_clean_errors(tiny, tmp_path, rng):
    """A few hundred mutants of a tiny GGUF through Model.from_pretrained, in subprocesses with a
    2 GiB address-space limit and a timeout: each loads (a harmless mutation) or raises ValueError /
    FormatError / MemoryError; a crash, a hang or another exception fails the test."""
    _, data, m = tiny
    corpus = _mutants(data, m, rng)
    jobs, labels = [], {}
    for k, (label, blob, must_fail) in enumerate(corpus):
        p = tmp_path / f"mut{k:04d}.gguf"
        p.write_bytes(blob)
        jobs.append((str(p), must_fail))
        labels[str(p)] = label
    results, crashes, hangs = {}, [], []
    todo = jobs
    t0 = time.time()
    while todo and len(crashes) + len(hangs) < 5:
        started, rc = _run_batch(tmp_path, todo, results)
        if started is None:
            if rc != 0:
                pytest.fail(f"corpus subprocess failed outside any mutant: rc={rc}")
            break
        (hangs if rc == "hang" else crashes).append(f"{labels[started]} (rc={rc})")
        todo = todo[[p for p, _ in todo].index(started) + 1:]
    elapsed = time.time() - t0

    res = list(results.values())
    wrong = [f"{labels[d['path']]}: loaded" for d in res if d["outcome"] == "loaded" and d["must_fail"]]
    wrong += [f"{labels[d['path']]}: {d['type']}: {d['msg']}" for d in res if d["outcome"] == "unclean"]
    clean = sum(1 for d in res if d["outcome"] == "clean" or (d["outcome"] == "loaded" and not d["must_fail"]))
    slowest = max(res, key=lambda d: d["seconds"])
    types = {}
    for d in res:
        types[d.get("type", "loaded")] = types.get(d.get("type", "loaded"), 0) + 1
    tried = len(res) + len(crashes) + len(hangs)
    summary = (f"tried {tried} of {len(jobs)}: clean {clean} crash {len(crashes)} hang {len(hangs)} wrong {len(wrong)}; "
               f"outcomes {types}; errors naming the file "
               f"{sum(1 for d in res if d.get('names_file'))}/{sum(1 for d in res if d['outcome'] == 'clean')}; "
               f"slowest {slowest['seconds']:.3f}s ({labels[slowest['path']]}); {elapsed:.1f}s in all")
    print(summary)
    for d in res:
        if d["outcome"] == "clean" and not d["names_file"]:
            print("  not naming the file:", labels[d["path"]], d["type"], d["msg"][:200])
    assert not crashes and not hangs and not wrong, f"{summary}\ncrash: {crashes}\nhang: {hangs}\nwrong: {wrong[:20]}"
    assert len(res) == len(jobs)
    assert slowest["seconds"] < 5, summary  # generous: typically well under 0.1 s


def test_metadata_arrays_have_a_sane_total_size(tiny, tmp_path):
    """Bounded by the limit as well as by the file: the gguf package's reader turns each element into
    Python objects (~1 KB each), so even a file that does hold 2M+ elements is refused."""
    from qlora_native.gguf_check import MAX_ARRAY_ELEMENTS

    _, data, m = tiny
    p = _write(tmp_path, put(data, _field(m, "count of tokenizer.ggml.scores"), MAX_ARRAY_ELEMENTS + 1))
    with pytest.raises(FormatError, match="tokenizer.ggml.scores has 2097153 elements: .* exceed the limit"):
        Tokenizer.from_pretrained(p)
