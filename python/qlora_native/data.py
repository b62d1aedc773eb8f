"""Supervised fine-tuning data: JSONL rows -> token ids + loss labels -> numpy batches.

Row formats (one JSON object per line; the format is chosen per row by its keys):
    {"text": "..."}                               loss on every token, EOS appended
    {"prompt": "...", "completion": "..."}        loss on the completion only (+ EOS) by default
    {"messages": [{"role": ..., "content": ...}]} chat template; loss on assistant turns by default

Labels follow transformers: same shape as input_ids, -100 = no loss, the shift happens in the loss.
Token boundaries follow TRL: the loss-free prefix is tokenized on its own (prompt; chat rendered up
to each assistant turn with the generation prompt), and the trained span is what the full encoding
has beyond the longest common token prefix, so a token merging across the boundary is trained on.

Batches (numpy int64, [B, T]): input_ids, attention_mask (0 on padding), labels (-100 on padding),
position_ids. Padded batches put one example per row, right-padded with the pad id. Packed batches
concatenate several examples per row of max_seq_len tokens; then position_ids restart at 0 for
each example and segment_ids [B, T] numbers the examples of a row 1, 2, ... (0 on padding): the
model must not attend across segments (block-diagonal causal mask), and the first token of each
packed example has label -100 so no example is trained to follow its predecessor.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .chat_template import ChatTemplateError

__all__ = ["Example", "IGNORE_INDEX", "read_jsonl", "tokenize_row", "load_dataset", "split_eval", "default_pad_id",
           "Batcher"]

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Example:
    """One tokenized row: input_ids and labels (IGNORE_INDEX where no loss), its JSONL line number."""

    input_ids: list
    labels: list
    line: int = 0

    def __len__(self):
        return len(self.input_ids)


def read_jsonl(path) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line; ValueError naming the line on bad JSON."""
    path = os.fspath(path)
    rows = []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{path}:{n}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{n}: invalid JSON ({exc.msg} at column {exc.colno})") from None
            except RecursionError:
                raise ValueError(f"{path}:{n}: invalid JSON (nested too deeply)") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
            _check_unicode(obj, f"{path}:{n}")
            rows.append((n, obj))
    if not rows:
        raise ValueError(f"{path}: the dataset is empty")
    return rows


def _check_unicode(obj, where: str) -> None:
    """ValueError naming the field when a string in `obj` holds a lone surrogate: JSON's "\\ud800"
    escapes decode to one, and no tokenizer can encode it."""
    stack = [(obj, "")]
    while stack:  # iterative: rows may nest deeply
        x, name = stack.pop()
        if isinstance(x, dict):
            for k, v in x.items():
                stack.append((k, f"{name} (a key)"))
                stack.append((v, f"{name}.{k}" if name else str(k)))
        elif isinstance(x, (list, tuple)):
            stack.extend((v, f"{name}[{j}]") for j, v in enumerate(x))
        elif isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{where}: field {name or 'value'!r} has a lone surrogate "
                                 f"{x[exc.start]!r} at index {exc.start} (not valid Unicode)") from None


def _lcp(a: list, b: list) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _str_field(row, key, where):
    v = row[key]
    if not isinstance(v, str):
        raise ValueError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    return v


def _check_messages(msgs, where):
    if not isinstance(msgs, list) or not msgs:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"{where}: messages[{j}] must be an object with 'role' and 'content'")
        if m["role"] not in ROLES:
            raise ValueError(f"{where}: messages[{j}] has unknown role {m['role']!r} (expected one of {ROLES})")
        if not isinstance(m["content"], str):
            raise ValueError(f"{where}: messages[{j}].content must be a string, got {type(m['content']).__name__}")


def tokenize_row(row: dict, tokenizer, *, where: str = "row", completion_only_loss: bool = True,
                 assistant_only_loss: bool = True, add_eos: bool = True) -> Example:
    """Token ids and labels of one row (untruncated). ValueError (prefixed by `where`) on bad rows."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    _check_unicode(row, where)
    eos = tokenizer.eos_token_id
    if add_eos and eos is None and "messages" not in row:
        raise ValueError(f"{where}: add_eos=True but the tokenizer has no eos_token_id")
    if "messages" in row:
        return _tokenize_chat(row["messages"], tokenizer, where, assistant_only_loss)
    if "prompt" in row or "completion" in row:
        if "prompt" not in row or "completion" not in row:
            raise ValueError(f"{where}: a prompt/completion row needs both 'prompt' and 'completion'")
        prompt, completion = _str_field(row, "prompt", where), _str_field(row, "completion", where)
        if not completion:
            raise ValueError(f"{where}: empty 'completion'")
        p = tokenizer.encode(prompt, add_special_tokens=True)
        ids = list(tokenizer.encode(prompt + completion, add_special_tokens=True))
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        start = _lcp(p, ids) if completion_only_loss else 0
        start = min(start, len(ids) - 1)  # a boundary merge never leaves the completion without loss
        labels = [IGNORE_INDEX] * start + ids[start:]
        return Example(ids, labels)
    if "text" in row:
        text = _str_field(row, "text", where)
        if not text.strip():
            raise ValueError(f"{where}: empty 'text'")
        ids = list(tokenizer.encode(text, add_special_tokens=True))
        if add_eos and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return Example(ids, list(ids))
    raise ValueError(f"{where}: row has none of 'text', 'prompt'/'completion', 'messages' (keys: {sorted(row)})")


def _tokenize_chat(msgs, tokenizer, where, assistant_only_loss) -> Example:
    _check_messages(msgs, where)

    def render(m, gen):
        try:
            return tokenizer.apply_chat_template(m, add_generation_prompt=gen, tokenize=False)
        except ChatTemplateError as exc:  # its message already says "chat template ..."
            raise ValueError(f"{where}: {exc}") from exc
        except Exception as exc:  # a tokenizer of another kind (e.g. transformers')
            raise ValueError(f"{where}: chat template failed: {exc}") from exc

    # the template writes any BOS itself (as TRL/transformers do for chat)
    full = render(msgs, False)
    ids = list(tokenizer.encode(full, add_special_tokens=False))
    if not ids:
        raise ValueError(f"{where}: the conversation renders to no tokens")
    if not assistant_only_loss:
        return Example(ids, list(ids))
    labels = [IGNORE_INDEX] * len(ids)
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    if not turns:
        raise ValueError(f"{where}: no assistant message to train on (assistant_only_loss=True)")
    for k in turns:
        p_text, e_text = render(msgs[:k], True), render(msgs[:k + 1], False)
        if not (full.startswith(e_text) and e_text.startswith(p_text)):
            raise ValueError(f"{where}: the chat template does not render messages[{k}] (assistant) as a "
                             "continuation of the conversation before it, so its tokens cannot be located; "
                             "use assistant_only_loss=False or a prefix-stable template")
        p = tokenizer.encode(p_text, add_special_tokens=False)
        e = tokenizer.encode(e_text, add_special_tokens=False)
        start, end = _lcp(p, ids), _lcp(e, ids)
        if end < len(e) and end < len(ids):
            end += 1  # the turn's last token merged with what follows: train on the merged token
        for t in range(start, end):
            labels[t] = ids[t]
    if all(x == IGNORE_INDEX for x in labels):
        raise ValueError(f"{where}: assistant turns render to no tokens")
    return Example(ids, labels)


def load_dataset(path, tokenizer, max_seq_len: int, *, completion_only_loss: bool = True,
                 assistant_only_loss: bool = True, add_eos: bool = True) -> list[Example]:
    """Tokenize every row of a JSONL file, truncating to max_seq_len tokens (the end is cut).

    Bad rows raise ValueError "path:line: ...". Rows whose trained tokens all fall beyond
    max_seq_len (so they would teach nothing) are dropped with one warning; if nothing remains,
    ValueError.
    """
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or max_seq_len < 2:
        raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
    path_s = os.fspath(path)
    out, dropped, truncated = [], [], 0
    for n, row in read_jsonl(path):
        ex = tokenize_row(row, tokenizer, where=f"{path_s}:{n}", completion_only_loss=completion_only_loss,
                          assistant_only_loss=assistant_only_loss, add_eos=add_eos)
        ex.line = n
        if len(ex) > max_seq_len:
            truncated += 1
            ex.input_ids, ex.labels = ex.input_ids[:max_seq_len], ex.labels[:max_seq_len]
        # labels[0] is never a target (nothing precedes it), so at least one later label must count
        if all(x == IGNORE_INDEX for x in ex.labels[1:]):
            dropped.append(n)
            continue
        out.append(ex)
    if dropped:
        warnings.warn(f"{path_s}: {len(dropped)} row(s) have no trained token within max_seq_len={max_seq_len} "
                      f"and were dropped (lines {dropped[:10]}{'...' if len(dropped) > 10 else ''})",
                      RuntimeWarning, stacklevel=2)
    if truncated:
        warnings.warn(f"{path_s}: {truncated} row(s) truncated to max_seq_len={max_seq_len}", RuntimeWarning,
                      stacklevel=2)
    if not out:
        raise ValueError(f"{path_s}: no usable rows (all {len(dropped)} dropped)")
    return out


def split_eval(examples: list, *, eval_fraction: Optional[float] = None, eval_count: Optional[int] = None,
               seed: int = 0) -> tuple[list, list]:
    """Deterministic held-out split: (train, eval), each in the original order. Give exactly one of
    eval_fraction (0 < f < 1, at least one row) or eval_count; at least one row stays in train."""
    n = len(examples)
    if (eval_fraction is None) == (eval_count is None):
        raise ValueError("split_eval: give exactly one of eval_fraction and eval_count")
    if eval_fraction is not None:
        if not isinstance(eval_fraction, (int, float)) or not 0.0 < eval_fraction < 1.0:
            raise ValueError(f"split_eval: eval_fraction must be in (0, 1), got {eval_fraction!r}")
        k = max(1, int(round(eval_fraction * n)))
    else:
        if not isinstance(eval_count, int) or isinstance(eval_count, bool) or eval_count < 1:
            raise ValueError(f"split_eval: eval_count must be a positive int, got {eval_count!r}")
        k = eval_count
    if k >= n:
        raise ValueError(f"split_eval: {k} eval row(s) would leave no training rows out of {n}")
    held = set(np.random.default_rng([int(seed), 0x5EED]).permutation(n)[:k].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def default_pad_id(tokenizer) -> int:
    """The tokenizer's pad id, or its eos id when it has none (padding is masked out anyway)."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    raise ValueError("the tokenizer has neither a pad_token_id nor an eos_token_id; pass pad_token_id explicitly")


class Batcher:
    """Batches of Examples for one epoch at a time; the same (seed, epoch) gives the same batches.

    packing=False: one example per row, T = longest in the batch (rounded up to
    pad_to_multiple_of); group_by_length sorts examples by length within windows of
    batch_size * group_size shuffled examples (then shuffles the batches) to cut padding.
    packing=True: examples (shuffled) are laid next-fit into rows of max_seq_len tokens; an example
    longer than max_seq_len is rejected (truncate when loading).
    """

    def __init__(self, examples: list, batch_size: int, pad_token_id: int, *, max_seq_len: Optional[int] = None,
                 packing: bool = False, shuffle: bool = True, seed: int = 0, group_by_length: bool = False,
                 group_size: int = 50, drop_last: bool = False, pad_to_multiple_of: Optional[int] = None):
        if not examples:
            raise ValueError("Batcher: the dataset is empty")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"Batcher: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(pad_token_id, (int, np.integer)) or pad_token_id < 0:
            raise ValueError(f"Batcher: pad_token_id must be a non-negative int, got {pad_token_id!r} "
                             "(use the tokenizer's pad id, or its eos id when it has none)")
        if packing and (not isinstance(max_seq_len, int) or max_seq_len < 2):
            raise ValueError("Batcher: packing needs max_seq_len (int >= 2)")
        for i, e in enumerate(examples):
            if len(e.input_ids) == 0 or len(e.input_ids) != len(e.labels):
                raise ValueError(f"Batcher: example {i} (line {e.line}) has {len(e.input_ids)} ids and "
                                 f"{len(e.labels)} labels")
            if max_seq_len is not None and len(e.input_ids) > max_seq_len:
                raise ValueError(f"Batcher: example {i} (line {e.line}) has {len(e.input_ids)} tokens > "
                                 f"max_seq_len={max_seq_len}")
        self.examples = list(examples)
        self.batch_size, self.pad_token_id, self.max_seq_len = batch_size, int(pad_token_id), max_seq_len
        self.packing, self.shuffle, self.seed = bool(packing), bool(shuffle), int(seed)
        self.group_by_length, self.group_size = bool(group_by_length), max(1, int(group_size))
        self.drop_last, self.pad_to_multiple_of = bool(drop_last), pad_to_multiple_of

    def _order(self, epoch: int) -> list[int]:
        n = len(self.examples)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n).tolist()

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        """Batches as lists of rows, each row a list of example indices."""
        order = self._order(epoch)
        if self.packing:
            rows, cur, used = [], [], 0
            for i in order:
                n = len(self.examples[i])
                if cur and used + n > self.max_seq_len:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            rows.append(cur)
        elif self.group_by_length:
            w = self.batch_size * self.group_size
            rows = []
            for s in range(0, len(order), w):
                rows += [[i] for i in sorted(order[s:s + w], key=lambda i: -len(self.examples[i]))]
        else:
            rows = [[i] for i in order]
        batches = [rows[s:s + self.batch_size] for s in range(0, len(rows), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length and not self.packing and self.shuffle:
            perm = np.random.default_rng([self.seed, int(epoch), 1]).permutation(len(batches))
            batches = [batches[j] for j in perm]
        return batches

    def num_batches(self, epoch: int = 0) -> int:
        return len(self._plan(epoch))

    def epoch(self, epoch: int = 0) -> Iterator[dict]:
        """The batches of one epoch: dicts of int64 [B, T] arrays (see module docstring)."""
        for rows in self._plan(epoch):
            yield self._collate(rows)

    def _collate(self, rows) -> dict:
        lens = [sum(len(self.examples[i]) for i in r) for r in rows]
        T = self.max_seq_len if self.packing else max(lens)
        m = self.pad_to_multiple_of
        if m and not self.packing:
            T = int(math.ceil(T / m) * m)
        B = len(rows)
        ids = np.full((B, T), self.pad_token_id, np.int64)            # [B, T]
        mask = np.zeros((B, T), np.int64)                              # [B, T]
        labels = np.full((B, T), IGNORE_INDEX, np.int64)               # [B, T]
        pos = np.zeros((B, T), np.int64)                               # [B, T]
        seg = np.zeros((B, T), np.int64)                               # [B, T]
        for b, r in enumerate(rows):
            t = 0
            for s, i in enumerate(r, start=1):
                e = self.examples[i]
                n = len(e)
                ids[b, t:t + n] = e.input_ids
                labels[b, t:t + n] = e.labels
                if self.packing:
                    labels[b, t] = IGNORE_INDEX  # never predict an example from the previous one
                mask[b, t:t + n] = 1
                pos[b, t:t + n] = np.arange(n)
                seg[b, t:t + n] = s
                t += n
        out = {"input_ids": ids, "attention_mask": mask, "labels": labels, "position_ids": pos}
        if self.packing:
            out["segment_ids"] = seg
        return out
