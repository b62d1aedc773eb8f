"""Chat templates are untrusted code: rendering stays in the jinja2 sandbox, is bounded in steps,
time and size, and every failure is one ChatTemplateError (issue 14)."""
import json
import subprocess
import sys
import textwrap
import time

import pytest

from qlora_native import chat_template
from qlora_native.chat_template import ChatTemplateError, render_chat_template

MSGS = [{"role": "user", "content": "hi"}]

# Templates that ran unbounded (or nearly) before: each must end in a ChatTemplateError quickly.
RUNAWAY = {
    "nested_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_output": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxx{% endfor %}{% endfor %}",
    "macro_fanout": "{% macro f(n) %}{% if n > 0 %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}{{ f(60) }}",
    "doubling_concat": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
                       "{% endfor %}{{ ns.s|length }}",
    "doubling_plus": "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}"
                     "{% endfor %}{{ ns.s|length }}",
}


def test_runaway_templates_stop_with_chat_template_error(tmp_path):
    # a subprocess with a generous bound: before the fix these ran for hours
    # (a memory cap, so that the code before the fix fails with MemoryError instead of swapping)
    script = textwrap.dedent("""
        import json, resource, sys, time
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        from qlora_native import chat_template as ct
        ct.MAX_SECONDS = 2.0
        out = {}
        for name, t in json.loads(sys.argv[1]).items():
            t0 = time.monotonic()
            try:
                ct.render_chat_template(t, [{"role": "user", "content": "hi"}])
                r = "rendered"
            except ct.ChatTemplateError as e:
                r = "ChatTemplateError: " + str(e)
            except BaseException as e:
                r = "RAW " + type(e).__name__ + ": " + str(e)
            out[name] = [r, time.monotonic() - t0]
        print(json.dumps(out))
    """)
    p = subprocess.run([sys.executable, "-c", script, json.dumps(RUNAWAY)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr
    res = json.loads(p.stdout)
    for name, (r, secs) in res.items():
        assert r.startswith("ChatTemplateError: chat template"), (name, r)
        assert secs < 30, (name, secs)
    for name in ("nested_loops", "nested_output", "macro_fanout"):  # which limit trips first depends on speed
        assert "exceed" in res[name][0], res[name]


@pytest.mark.parametrize("template, messages, match", [
    ("{% include 'other.jinja' %}", MSGS, "no loader"),
    ("{% extends 'base.jinja' %}", MSGS, "no loader"),
    ("{{ '<|im_start|>' + messages[0]['content'] + '<|im_end|>' }}", [{"role": "user", "content": None}],
     "TypeError"),
    ("{% for i in range(10 ** 30) %}{% endfor %}", MSGS, "OverflowError"),
    ("{{ range(200000) | list | length }}", MSGS, "Range too big"),
    ("{{ 'x' * 2000000 }}", MSGS, "built a value"),  # with MAX_OUTPUT_CHARS = 10**6 below
    ("{{ 3 * [1] * 1000000 }}", MSGS, "built a value"),
    ("{{ 'x' * 600000 + 'y' * 600000 }}", MSGS, "built a value"),
    ("{{ ('x' * 600000) ~ ('y' * 600000) }}", MSGS, "built a value"),
    ("{% for i in range(30) %}{{ 'x' * 50000 }}{% endfor %}", MSGS, "output exceeds"),
    ("{{ 2 ** 100000000 }}", MSGS, "too large"),
    ("{{ 'x'.ljust(10 ** 15) }}", MSGS, "out of memory"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", MSGS, "recursion"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", MSGS, "failed"),  # the sandbox holds
    ("{{ messages.append(1) }}", MSGS, "failed"),  # immutable sandbox
    ("{{ raise_exception('custom message') }}", MSGS, "custom message"),
    ("{% for %}", MSGS, "does not compile"),
])
def test_template_errors_are_chat_template_errors(template, messages, match, monkeypatch):
    monkeypatch.setattr(chat_template, "MAX_OUTPUT_CHARS", 10**6)
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, messages)
    assert time.monotonic() - t0 < 20


def test_templates_still_render():
    t = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] if m['content'] is not none else '' }}\n"
         "{% endfor %}{{ 2 ** 10 }} {{ 'ab' * 3 }} {{ [1, 2] + [3] }} {{ 'a' ~ 1 }}")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None}]
    assert render_chat_template(t, msgs) == "user: hi\nassistant: \n1024 ababab [1, 2, 3] a1"
    loops = "{% for i in range(300) %}{% for j in range(300) %}{% endfor %}{% endfor %}ok"
    assert render_chat_template(loops, MSGS) == "ok"  # 90k iterations: well inside the budget


def test_dataset_chat_error_prefix_once(tmp_path):
    from qlora_native.data import load_dataset

    class Tok:
        eos_token_id = 0
        chat_template = "{{ raise_exception('no system role') }}"

        def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False):
            return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt)

    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"messages": [{"role": "user", "content": "a"},
                                          {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(ValueError) as e:
        load_dataset(f, Tok(), 16)
    msg = str(e.value)
    assert msg.startswith(f"{f}:1: ") and "no system role" in msg
    assert msg.count("chat template failed") == 1, msg
