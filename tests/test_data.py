"""SFT data: JSONL parsing, tokenization/labels, truncation, eval split, padded and packed batches."""
import json
from collections import Counter

import numpy as np
import pytest

from qlora_native.data import (IGNORE_INDEX, Batcher, Example, default_pad_id, load_dataset, read_jsonl, split_eval,
                               tokenize_row)

PAD, BOS, EOS = 0, 1, 2


class ByteTokenizer:
    """Byte-level fake: token = byte + 3 (one token per ASCII char), ChatML template."""

    pad_token_id, bos_token_id, eos_token_id = PAD, BOS, EOS

    def encode(self, text, add_special_tokens=True):
        ids = [b + 3 for b in text.encode("utf-8")]
        return [BOS] + ids if add_special_tokens else ids

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        s = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return s + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _b(text):
    return [b + 3 for b in text.encode()]


def _write(tmp_path, rows, name="d.jsonl"):
    p = tmp_path / name
    p.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return p


def test_text_row():
    ex = tokenize_row({"text": "hello"}, ByteTokenizer())
    assert ex.input_ids == [BOS] + _b("hello") + [EOS]
    assert ex.labels == ex.input_ids


def test_prompt_completion_row():
    tok = ByteTokenizer()
    ex = tokenize_row({"prompt": "Q: 2+2?", "completion": " A: 4"}, tok)
    n_prompt = 1 + len("Q: 2+2?")
    assert ex.input_ids == [BOS] + _b("Q: 2+2? A: 4") + [EOS]
    assert ex.labels == [IGNORE_INDEX] * n_prompt + ex.input_ids[n_prompt:]
    ex = tokenize_row({"prompt": "Q", "completion": "A"}, tok, completion_only_loss=False, add_eos=False)
    assert ex.labels == ex.input_ids == [BOS] + _b("QA")


def test_chat_row_assistant_only():
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello!"}, {"role": "user", "content": "bye"},
            {"role": "assistant", "content": "ciao"}]
    ex = tokenize_row({"messages": msgs}, tok)
    text = tok.apply_chat_template(msgs)
    assert ex.input_ids == _b(text)  # the template's text, no BOS/EOS added
    # independent reference from character positions: content + "<|im_end|>\n" of each assistant turn
    want = np.zeros(len(text), bool)
    for content in ("hello!", "ciao"):
        s = text.index("<|im_start|>assistant\n" + content) + len("<|im_start|>assistant\n")
        want[s:s + len(content) + len("<|im_end|>\n")] = True
    assert ex.labels == [i if w else IGNORE_INDEX for i, w in zip(ex.input_ids, want)]
    ex = tokenize_row({"messages": msgs}, tok, assistant_only_loss=False)
    assert ex.labels == ex.input_ids


class _DroppingTemplate(ByteTokenizer):
    """A template that rewrites earlier assistant turns (not prefix-stable)."""

    def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=False):
        last = max((k for k, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
        msgs = [dict(m, content="..." if m["role"] == "assistant" and k != last else m["content"])
                for k, m in enumerate(messages)]
        return super().apply_chat_template(msgs, add_generation_prompt)


def test_chat_template_not_prefix_stable_is_an_error():
    msgs = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}]
    with pytest.raises(ValueError, match="continuation"):
        tokenize_row({"messages": msgs}, _DroppingTemplate(), where="x:1")
    assert tokenize_row({"messages": msgs}, _DroppingTemplate(), assistant_only_loss=False).labels


@pytest.mark.parametrize("line, match", [
    ('{"text": "ok"', "invalid JSON"),
    ('[1, 2]', "JSON object"),
    ({"prompt": "p"}, "both"),
    ({"text": 5}, "must be a string"),
    ({"text": "   "}, "empty 'text'"),
    ({"prompt": "p", "completion": ""}, "empty 'completion'"),
    ({"prompt": ["p"], "completion": "c"}, "must be a string"),
    ({"foo": "bar"}, "none of"),
    ({"messages": []}, "non-empty list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "unknown role"),
    ({"messages": [{"role": "user"}]}, "'role' and 'content'"),
    ({"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant"),
])
def test_bad_rows_report_line(tmp_path, line, match):
    p = _write(tmp_path, [{"text": "fine"}, "", line, {"text": "fine too"}])
    with pytest.raises(ValueError, match=rf"d\.jsonl:3: .*{match}"):
        load_dataset(p, ByteTokenizer(), 64)


def test_empty_dataset(tmp_path):
    for rows in ([], ["", "  "]):
        with pytest.raises(ValueError, match="empty"):
            load_dataset(_write(tmp_path, rows), ByteTokenizer(), 64)
    with pytest.raises(ValueError, match="empty"):
        Batcher([], 2, PAD)


def test_truncation_and_dropping(tmp_path):
    p = _write(tmp_path, [{"text": "x" * 40}, {"prompt": "p" * 30, "completion": "c"}, {"text": "short"}])
    with pytest.warns(RuntimeWarning) as rec:
        data = load_dataset(p, ByteTokenizer(), 16)
    assert any("dropped" in str(w.message) and "[2]" in str(w.message) for w in rec)
    assert [e.line for e in data] == [1, 3]
    assert data[0].input_ids == [BOS] + _b("x" * 15) and data[0].labels == data[0].input_ids
    with pytest.raises(ValueError, match="no usable rows"), pytest.warns(RuntimeWarning):
        load_dataset(_write(tmp_path, [{"prompt": "p" * 30, "completion": "c"}]), ByteTokenizer(), 16)
    with pytest.raises(ValueError, match="max_seq_len"):
        load_dataset(p, ByteTokenizer(), 1)


def _examples(rng, n, lo=3, hi=20):
    out = []
    for k in range(n):
        m = int(rng.integers(lo, hi + 1))
        ids = rng.integers(3, 200, size=m).tolist()
        cut = int(rng.integers(0, m - 1))
        out.append(Example(ids, [IGNORE_INDEX] * cut + ids[cut:], line=k + 1))
    return out


def test_split_eval(rng):
    data = _examples(rng, 50)
    tr, ev = split_eval(data, eval_fraction=0.2, seed=7)
    assert len(ev) == 10 and len(tr) == 40
    assert sorted(e.line for e in tr + ev) == list(range(1, 51))
    assert [e.line for e in tr] == sorted(e.line for e in tr)  # original order kept
    tr2, ev2 = split_eval(data, eval_fraction=0.2, seed=7)
    assert [e.line for e in ev2] == [e.line for e in ev]
    _, ev3 = split_eval(data, eval_fraction=0.2, seed=8)
    assert [e.line for e in ev3] != [e.line for e in ev]
    assert len(split_eval(data, eval_count=3)[1]) == 3
    assert len(split_eval(data[:3], eval_fraction=0.01)[1]) == 1
    for kw in (dict(eval_count=50), dict(eval_fraction=1.0), dict(), dict(eval_count=1, eval_fraction=0.1),
               dict(eval_count=0)):
        with pytest.raises(ValueError, match="split_eval"):
            split_eval(data, **kw)


def _rows_as_examples(batch):
    """Unpadded (ids, labels) per row of a padded batch, checking the padding convention."""
    out = []
    for b in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][b].sum())
        assert (batch["attention_mask"][b, :n] == 1).all()  # right padding
        assert (batch["input_ids"][b, n:] == PAD).all() and (batch["labels"][b, n:] == IGNORE_INDEX).all()
        assert (batch["position_ids"][b, :n] == np.arange(n)).all()
        out.append((tuple(batch["input_ids"][b, :n]), tuple(batch["labels"][b, :n])))
    return out


@pytest.mark.parametrize("group_by_length", [False, True])
def test_padded_batches(rng, group_by_length):
    data = _examples(rng, 23)
    bt = Batcher(data, 4, PAD, seed=3, group_by_length=group_by_length, group_size=2)
    want = Counter((tuple(e.input_ids), tuple(e.labels)) for e in data)
    seen = []
    for batch in bt.epoch(0):
        assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}
        for v in batch.values():
            assert v.dtype == np.int64 and v.shape == batch["input_ids"].shape
        assert batch["input_ids"].shape[1] == batch["attention_mask"].sum(1).max()
        seen += _rows_as_examples(batch)
    assert Counter(seen) == want and bt.num_batches(0) == 6
    first = [b["input_ids"].tolist() for b in bt.epoch(0)]
    assert first == [b["input_ids"].tolist() for b in Batcher(data, 4, PAD, seed=3, group_by_length=group_by_length,
                                                               group_size=2).epoch(0)]
    assert first != [b["input_ids"].tolist() for b in bt.epoch(1)]


def test_group_by_length_reduces_padding(rng):
    data = _examples(rng, 64, 2, 60)
    pad = {}
    for g in (False, True):
        bt = Batcher(data, 8, PAD, seed=1, group_by_length=g, group_size=8)  # one window: the whole epoch
        pad[g] = sum(int((b["attention_mask"] == 0).sum()) for b in bt.epoch(0))
    assert pad[True] < pad[False]


def test_no_shuffle_drop_last_multiple(rng):
    data = _examples(rng, 10)
    bt = Batcher(data, 3, 7, shuffle=False, drop_last=True, pad_to_multiple_of=8)
    batches = list(bt.epoch(5))
    assert len(batches) == 3
    assert [tuple(r[0]) for b in batches for r in _rows(b)] == [tuple(e.input_ids) for e in data[:9]]
    assert all(b["input_ids"].shape[1] % 8 == 0 for b in batches)


def _rows(batch):
    return [(batch["input_ids"][b][batch["attention_mask"][b] == 1],) for b in range(batch["input_ids"].shape[0])]


def test_packing(rng):
    data = _examples(rng, 40, 2, 12)
    T = 32
    bt = Batcher(data, 3, PAD, max_seq_len=T, packing=True, seed=11)
    want = Counter((tuple(e.input_ids), tuple(e.labels)) for e in data)
    seen = []
    for batch in bt.epoch(2):
        assert batch["input_ids"].shape[1] == T and batch["input_ids"].dtype == np.int64
        seg, mask = batch["segment_ids"], batch["attention_mask"]
        assert ((seg > 0) == (mask == 1)).all()
        for b in range(seg.shape[0]):
            assert mask[b, :mask[b].sum()].all()  # examples first, padding at the end
            for s in range(1, seg[b].max() + 1):
                idx = np.flatnonzero(seg[b] == s)
                assert (np.diff(idx) == 1).all()
                assert (batch["position_ids"][b, idx] == np.arange(len(idx))).all()
                labels = batch["labels"][b, idx]
                assert labels[0] == IGNORE_INDEX  # not trained to follow the previous example
                ids = tuple(batch["input_ids"][b, idx])
                match = [k for k in want if k[0] == ids and k[1][1:] == tuple(labels[1:])]
                assert match
                seen.append(match[0])
    assert Counter(seen) == want
    assert bt.num_batches(2) == len(list(bt.epoch(2)))
    with pytest.raises(ValueError, match="max_seq_len"):
        Batcher(data, 2, PAD, packing=True)
    with pytest.raises(ValueError, match="tokens > max_seq_len"):
        Batcher(data, 2, PAD, max_seq_len=5, packing=True)


def test_batcher_bad_args(rng):
    data = _examples(rng, 4)
    with pytest.raises(ValueError, match="batch_size"):
        Batcher(data, 0, PAD)
    with pytest.raises(ValueError, match="pad_token_id"):
        Batcher(data, 2, None)
    with pytest.raises(ValueError, match="labels"):
        Batcher([Example([1, 2], [1])], 2, PAD)


def test_read_jsonl_line_numbers(tmp_path):
    p = _write(tmp_path, ["", {"text": "a"}, "   ", {"text": "b"}])
    assert [n for n, _ in read_jsonl(p)] == [2, 4]
    p.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(ValueError, match=r"d\.jsonl:2: not valid UTF-8"):
        read_jsonl(p)


def test_pad_id_and_missing_eos():
    class NoPad(ByteTokenizer):
        pad_token_id = None

    class NoSpecial(NoPad):
        eos_token_id = None

    assert default_pad_id(ByteTokenizer()) == PAD and default_pad_id(NoPad()) == EOS
    with pytest.raises(ValueError, match="pad_token_id"):
        default_pad_id(NoSpecial())
    with pytest.raises(ValueError, match="eos_token_id"):
        tokenize_row({"text": "a"}, NoSpecial())
    assert tokenize_row({"text": "a"}, NoSpecial(), add_eos=False).input_ids == [BOS] + _b("a")


# ---- a real tokenizer: sentencepiece trained at test time, behind qlora_native.Tokenizer


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    import helpers_tokenizer as h

    import qlora_native

    d = tmp_path_factory.mktemp("sp")
    model = h.train_sentencepiece(d, vocab_size=800, n_lines=800)
    cfg = {"chat_template": h.CHATML_TEMPLATE, "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    return qlora_native.Tokenizer.from_pretrained(h.sentencepiece_dir(d / "dir", model, cfg))


def test_sentencepiece_end_to_end(sp_tokenizer, tmp_path):
    tok = sp_tokenizer
    chat = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
            {"role": "assistant", "content": "Zebra stripes are black."}, {"role": "user", "content": "Again?"},
            {"role": "assistant", "content": "Quokka grey."}]
    p = _write(tmp_path, [{"text": "The quick brown fox."}, {"prompt": "Question: sky?", "completion": " Answer: blue"},
                          {"messages": chat}])
    text, pc, ch = load_dataset(p, tok, 256)
    assert text.input_ids == tok.encode("The quick brown fox.") + [tok.eos_token_id] and text.labels == text.input_ids
    # prompt/completion: the masked tokens decode to (a prefix of) the prompt, the trained ones to the rest
    assert pc.input_ids == tok.encode("Question: sky? Answer: blue") + [tok.eos_token_id]
    start = pc.labels.index(next(x for x in pc.labels if x != IGNORE_INDEX))
    assert all(x == IGNORE_INDEX for x in pc.labels[:start]) and pc.labels[start:] == pc.input_ids[start:]
    prefix = tok.decode(pc.input_ids[:start], skip_special_tokens=True)
    assert "Question: sky?".startswith(prefix) and len(prefix) >= len("Question: sky") - 1
    assert "Answer: blue" in tok.decode(pc.input_ids[start:], skip_special_tokens=True)
    # chat: the trained tokens are exactly the assistant turns (content + end-of-turn marker)
    assert ch.input_ids == tok.encode(tok.apply_chat_template(chat, add_generation_prompt=False), False)
    trained = [i for i, lab in zip(ch.input_ids, ch.labels) if lab != IGNORE_INDEX]
    assert all(lab in (IGNORE_INDEX, i) for i, lab in zip(ch.input_ids, ch.labels))
    trained_text = tok.decode(trained)
    assert "Zebra stripes are black." in trained_text and "Quokka grey." in trained_text
    assert trained_text.count("<|im_end|>") == 2
    for other in ("terse", "colour", "Again", "user", "system"):
        assert other not in trained_text
    batch = next(Batcher([text, pc, ch], 3, tok.eos_token_id, shuffle=False).epoch(0))
    assert batch["input_ids"].shape == (3, len(ch))
