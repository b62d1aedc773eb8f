"""Hugging Face hub ids ("ORG/NAME") resolved offline against the local Hugging Face cache.

    resolve_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct")
        -> "~/.cache/huggingface/hub/models--HuggingFaceTB--SmolLM2-135M-Instruct/snapshots/<commit>"

Nothing is downloaded: like transformers with HF_HUB_OFFLINE=1, only a snapshot already in the
cache is used (refs/<revision> names its commit). The cache lookup itself is huggingface_hub's
(a dependency of `tokenizers`); the cache directory is computed here at call time from the same
environment variables, in huggingface_hub's order of precedence, because huggingface_hub reads
them once at import.
"""
from __future__ import annotations

import os
import re

__all__ = ["hf_hub_cache_dir", "looks_like_hub_id", "resolve_hub_id", "HubCacheMiss"]

# hub repo names: letters, digits, '-', '_', '.'; an optional "@revision" suffix
_HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+?)(?:@(?P<rev>[\w./-]+))?$")


class HubCacheMiss(FileNotFoundError):
    """A hub id whose snapshot is not in the local Hugging Face cache."""


def hf_hub_cache_dir() -> str:
    """HF_HUB_CACHE, else HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else
    $XDG_CACHE_HOME/huggingface/hub, else ~/.cache/huggingface/hub."""
    def expand(p):
        return os.path.expandvars(os.path.expanduser(p))

    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return expand(os.environ[var])
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    return os.path.join(expand(home), "hub")


def looks_like_hub_id(spec: str) -> bool:
    """"ORG/NAME" or "ORG/NAME@REVISION" (not an absolute path, no "..", no backslash)."""
    return (isinstance(spec, str) and not os.path.isabs(spec) and ".." not in spec and "\\" not in spec
            and _HUB_ID.match(spec) is not None)


def _download_hint(repo: str, cache: str) -> str:
    return (f"on a machine with network, run `huggingface-cli download {repo}` (or `hf download {repo}`) "
            f"and copy its models--{repo.replace('/', '--')} folder into {cache}, "
            f"or pass a local model directory or .gguf file")


def resolve_hub_id(spec: str) -> str:
    """The local snapshot directory of hub id `spec` ("ORG/NAME[@REVISION]", revision default "main").
    Raises HubCacheMiss (a FileNotFoundError) saying where it looked and how to get the model there."""
    m = _HUB_ID.match(spec) if isinstance(spec, str) else None
    if m is None:
        raise ValueError(f"{spec!r} is not a Hugging Face hub id (ORG/NAME)")
    repo, rev = m.group("repo"), m.group("rev") or "main"
    cache = hf_hub_cache_dir()
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - huggingface_hub comes with tokenizers
        raise HubCacheMiss(f"{spec}: not a local path, and huggingface_hub (needed to read the Hugging Face "
                           f"cache) is not installed: pip install huggingface_hub") from None
    try:
        path = snapshot_download(repo, revision=rev, cache_dir=cache, local_files_only=True)
    except Exception as e:  # LocalEntryNotFoundError, IncompleteSnapshotError, a malformed ref ...
        where = os.path.join(cache, f"models--{repo.replace('/', '--')}")
        if type(e).__name__ == "IncompleteSnapshotError":
            why = f"{where}: the snapshot of revision {rev!r} is incomplete"
        elif os.path.isdir(where):
            why = f"{where} has no snapshot of revision {rev!r}"
        else:
            why = f"no {where}"
        raise HubCacheMiss(f"{spec}: not a local path, and not in the local Hugging Face cache ({why}); "
                           f"{_download_hint(repo, cache)}") from e
    return str(path)
