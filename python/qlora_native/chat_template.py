"""Render chat templates (jinja2) the way transformers' `apply_chat_template` does.

Chat templates shipped with models are untrusted code: they run in jinja2's immutable sandbox,
with the same environment settings and helpers transformers provides, so a template renders to
the same string here as there.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

__all__ = ["render_chat_template", "select_chat_template", "ChatTemplateError"]


class ChatTemplateError(ValueError):
    """A missing or failing chat template."""


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers replaces it with plain json.dumps
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=32)
def _compile(template: str):
    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

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

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not compile: {exc}") from exc


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
    context = dict(special_tokens or {})
    context.update(kwargs)
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages], tools=tools, documents=documents,
            add_generation_prompt=add_generation_prompt, **context,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise ChatTemplateError(f"chat template failed: {exc}") from exc
