"""The synthetic task of `qlora-native demo`: rewrite an ISO date in words.

    user:      "Date: 2023-05-17"        (after a short fixed system message)
    assistant: "17 May 2023"

A checkable answer (exact match after stripping surrounding whitespace), short (~8 tokens), and in
a format a small base model does not produce unprompted (it answers with prose, "May 17, 2023",
or restates the ISO date), so held-out exact-match accuracy shows what fine-tuning taught.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass

import numpy as np

__all__ = ["DateExample", "SYSTEM", "make_splits", "fresh_example", "answer_for", "check", "messages", "to_row",
           "prompt_ids", "FIRST_DAY", "NUM_DAYS"]

SYSTEM = "Rewrite the date."
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
FIRST_DAY = _dt.date(1900, 1, 1)
NUM_DAYS = (_dt.date(2099, 12, 31) - FIRST_DAY).days + 1  # the date space: 1900-01-01 .. 2099-12-31


@dataclass(frozen=True)
class DateExample:
    iso: str      # "2023-05-17"
    answer: str   # "17 May 2023"

    @property
    def prompt(self) -> str:
        return f"Date: {self.iso}"


def answer_for(d: _dt.date) -> str:
    return f"{d.day} {MONTHS[d.month - 1]} {d.year}"


def _example(k: int) -> DateExample:
    d = FIRST_DAY + _dt.timedelta(days=int(k))
    return DateExample(d.isoformat(), answer_for(d))


def make_splits(n_train: int, n_eval: int, seed: int = 0) -> tuple[list[DateExample], list[DateExample]]:
    """(train, eval) of distinct dates drawn without replacement: the splits never share a date,
    and the same (n_train, n_eval, seed) always gives the same lists."""
    for name, v in (("n_train", n_train), ("n_eval", n_eval)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"make_splits: {name} must be an int >= 0, got {v!r}")
    if n_train + n_eval > NUM_DAYS:
        raise ValueError(f"make_splits: at most {NUM_DAYS} distinct dates, asked for {n_train + n_eval}")
    days = np.random.default_rng([int(seed), 0xDA7E]).choice(NUM_DAYS, size=n_train + n_eval, replace=False)
    ex = [_example(k) for k in days.tolist()]
    return ex[n_eval:], ex[:n_eval]


def fresh_example(exclude, seed: int = 0) -> DateExample:
    """A date none of `exclude` (DateExamples) has, the same one for the same (exclude, seed)."""
    used = {e.iso for e in exclude}
    if len(used) >= NUM_DAYS:
        raise ValueError("fresh_example: every date of the range is excluded")
    rng = np.random.default_rng([int(seed), 0xF4E5])
    while True:  # most of the 73,000 dates are free: a few draws at most
        e = _example(int(rng.integers(NUM_DAYS)))
        if e.iso not in used:
            return e


def check(example: DateExample, output: str) -> bool:
    """True exactly when the model's output is the answer (surrounding whitespace ignored)."""
    return isinstance(output, str) and output.strip() == example.answer


def messages(example: DateExample, with_answer: bool = True) -> list[dict]:
    m = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": example.prompt}]
    if with_answer:
        m.append({"role": "assistant", "content": example.answer})
    return m


def to_row(example: DateExample) -> dict:
    """A data.py chat row (loss on the assistant turn)."""
    return {"messages": messages(example, True)}


def prompt_ids(tokenizer, example: DateExample) -> list[int]:
    """The chat prompt up to the assistant's turn, as token ids (the template writes any BOS)."""
    text = tokenizer.apply_chat_template(messages(example, False), add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))
