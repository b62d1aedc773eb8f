"""Paths handed to the C++ engine.

A Linux file name is bytes and need not be UTF-8; Python gives such a name as a str with lone
surrogates (os.fsdecode). Every _core parameter that names a file takes str (os.fsencode's rule:
the file system encoding with surrogateescape, so such a str becomes the name's bytes again), bytes
and os.PathLike, by one rule in the bindings (python/bindings/fs_path.hpp; TypeError for anything
else, ValueError for an embedded NUL); core_path() is that rule, for Python code that needs the
bytes. The engine's messages that name such a path come back decoded the same way
(errors="surrogateescape", python/bindings/module.cpp), so the path in a message is the str the
caller passed.
"""
from __future__ import annotations

import os

from . import _core

__all__ = ["core_path", "core_text", "text_of_path"]


def core_path(path: str | bytes | os.PathLike) -> bytes:
    """The bytes of `path` (str, bytes or os.PathLike) as the OS takes them (os.fsencode), the engine's
    rule (_core.fs_path). TypeError for anything else; ValueError for an embedded NUL (C would cut the
    name there and open another file), as Python's own open() does."""
    return _core.fs_path(path)


def core_text(s: str) -> bytes:
    """A str the engine only puts in its messages (a tensor's place naming the file it is in) as the
    bytes the std::string caster takes: UTF-8, with a path's non-UTF-8 bytes put back
    (surrogateescape), which the message then decodes to the same str."""
    try:
        return s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # other lone surrogates: not a path's bytes
        return s.encode("utf-8", "backslashreplace")


def text_of_path(path: str | bytes | os.PathLike) -> str:
    """`path` as text that encodes to UTF-8, for files that must hold valid UTF-8 (JSON metadata such
    as adapter_config.json's base_model_name_or_path, GGUF strings): the bytes of a name that are not
    UTF-8 are written \\xNN."""
    return core_text(os.fsdecode(os.fspath(path))).decode("utf-8", "backslashreplace")
