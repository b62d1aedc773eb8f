"""Render chat templates (jinja2) the way transformers' `apply_chat_template` does.

Chat templates shipped with models are untrusted code: they run in jinja2's immutable sandbox,
with the same environment settings and helpers transformers provides, so a template renders to
the same string here as there.
"""
from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from functools import lru_cache

__all__ = ["render_chat_template", "select_chat_template", "ChatTemplateError"]

# Limits of one render. Templates are untrusted code: the sandbox stops them touching anything, these
# stop them running forever or filling memory (real templates stay orders of magnitude below).
MAX_OUTPUT_CHARS = 64 * 1024 * 1024  # rendered text, and any one string/list built by + * ~
MAX_STEPS = 5_000_000  # loop iterations + calls (macros, methods, functions)
MAX_SECONDS = 5.0  # wall clock, checked every 1024 steps
MAX_INT_BITS = 1 << 16  # results of * and ** on integers


class ChatTemplateError(ValueError):
    """A missing or failing chat template."""


class _Budget:
    """Steps and deadline of the render running on this thread."""

    def __init__(self):
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def tick(self, n=1):
        self.steps += n
        if self.steps > MAX_STEPS:
            raise ChatTemplateError(f"chat template exceeded {MAX_STEPS} loop iterations/calls (runaway loop?)")
        if self.steps & 1023 == 0 and time.monotonic() > self.deadline:
            raise ChatTemplateError(f"chat template exceeded the render time limit of {MAX_SECONDS:g} s")


_local = threading.local()


def _budget() -> _Budget:
    b = getattr(_local, "budget", None)
    if b is None:  # a template object used outside render_chat_template: a fresh budget
        b = _local.budget = _Budget()
    return b


def _check_size(x):
    if isinstance(x, (str, bytes, list, tuple)) and len(x) > MAX_OUTPUT_CHARS:
        raise ChatTemplateError(f"chat template built a value of {len(x)} items (limit {MAX_OUTPUT_CHARS})")
    if isinstance(x, int) and x.bit_length() > MAX_INT_BITS:
        raise ChatTemplateError(f"chat template computed an integer of over {MAX_INT_BITS} bits")
    return x


def _guarded_iter(seq):
    # wraps the iterable of every {% for %}: each iteration counts against the budget
    b = _budget()
    for x in seq:
        b.tick()
        yield x


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    class _Generation(Extension):
        # `{% generation %}...{% endgeneration %}` marks assistant text for masks in transformers;
        # we only need templates that use it to render, so the body is emitted unchanged.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    class _Env(ImmutableSandboxedEnvironment):
        # operators that can build huge values in one step are checked (this also stops jinja from
        # folding e.g. 10 ** 10 ** 10 while compiling)
        intercepted_binops = frozenset({"+", "*", "**"})

        def call_binop(self, context, operator, left, right):
            if operator == "**" and isinstance(left, int) and isinstance(right, int) and abs(left) > 1:
                if right * max(abs(left).bit_length() - 1, 1) > MAX_INT_BITS:
                    raise ChatTemplateError(f"chat template computed {left} ** {right}: too large")
            if operator == "*" and isinstance(right, int) and isinstance(left, (str, list, tuple)):
                left, right = right, left
            if operator == "*" and isinstance(left, int) and isinstance(right, (str, list, tuple)):
                if left * len(right) > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"chat template built a value of {left * len(right)} items "
                                            f"(limit {MAX_OUTPUT_CHARS})")
            return _check_size(super().call_binop(context, operator, left, right))

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's signature)
            _budget().tick()
            return super().call(__context, __obj, *args, **kwargs)

    class _Guard(NodeTransformer):
        # every loop's iterable and every ~ concatenation goes through a checking global
        def _wrap(self, name, node):
            call = nodes.Call(nodes.Name(name, "load"), [node], [], None, None)
            return call.set_lineno(node.lineno).set_environment(env)

        def visit_For(self, node):
            self.generic_visit(node)
            node.iter = self._wrap("_qlora_guarded_iter", node.iter)
            return node

        def visit_Concat(self, node):
            self.generic_visit(node)
            return self._wrap("_qlora_check_size", node)

    env = _Env(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["_qlora_guarded_iter"] = _guarded_iter
    env.globals["_qlora_check_size"] = _check_size
    try:
        return env.from_string(_Guard().visit(env.parse(template)))
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc
    except RecursionError as exc:  # pathologically deep nesting
        raise ChatTemplateError("chat template does not compile: nested too deeply") from exc


def select_chat_template(templates, name: str | None = None, tools=None) -> str:
    """Pick one template from a string, a {name: template} dict or a list of {name, template}."""
    if templates is None:
        raise ChatTemplateError(
            "this tokenizer has no chat template (no `chat_template` in tokenizer_config.json, "
            "chat_template.jinja, or `tokenizer.chat_template` in the GGUF)"
        )
    if isinstance(templates, list):
        templates = {t["name"]: t["template"] for t in templates}
    if isinstance(templates, str):
        if name is not None:
            raise ChatTemplateError(f"chat template {name!r} requested but this tokenizer has a single unnamed one")
        return templates
    if name is not None:
        if name not in templates:
            raise ChatTemplateError(f"no chat template named {name!r}; available: {sorted(templates)}")
        return templates[name]
    if tools is not None and "tool_use" in templates:
        return templates["tool_use"]
    if "default" in templates:
        return templates["default"]
    raise ChatTemplateError(f"several chat templates and none is 'default'; pick one of {sorted(templates)}")


def render_chat_template(template: str, messages, *, add_generation_prompt: bool = True,
                         special_tokens: dict | None = None, tools=None, documents=None, **kwargs) -> str:
    """Render `messages` (a list of {"role", "content", ...} dicts) with a jinja2 chat template."""
    import jinja2

    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for m in messages:
        if not isinstance(m, dict):
            raise TypeError(f"chat messages must be dicts, got {m!r}")
    if not isinstance(template, str):
        raise ChatTemplateError(f"a chat template must be a string, got {type(template).__name__}")
    context = dict(special_tokens or {})
    context.update(kwargs)
    compiled = _compile(template)
    outer = getattr(_local, "budget", None)
    _local.budget = _Budget()
    parts, size = [], 0
    try:
        for piece in compiled.generate(
            messages=[dict(m) for m in messages], tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **context,
        ):
            size += len(piece)
            if size > MAX_OUTPUT_CHARS:
                raise ChatTemplateError(f"chat template output exceeds {MAX_OUTPUT_CHARS} characters")
            parts.append(piece)
    except ChatTemplateError:
        raise
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
    except RecursionError as exc:
        raise ChatTemplateError("chat template failed: recursion too deep") from exc
    except MemoryError as exc:
        raise ChatTemplateError("chat template failed: out of memory") from exc
    except Exception as exc:  # the template's own errors: None + str, {% include %} (no loader), range(10**100) ...
        raise ChatTemplateError(f"chat template failed: {type(exc).__name__}: {exc}") from exc
    finally:
        _local.budget = outer
    return "".join(parts)
