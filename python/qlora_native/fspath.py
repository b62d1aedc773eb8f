"""Paths handed to the C++ engine.

A Linux file name is bytes and need not be UTF-8; Python gives such a name as a str with lone
surrogates (os.fsdecode), which pybind11's std::string caster refuses (a TypeError "incompatible
function arguments"). Every call into _core that takes a path passes core_path(path): the file
system's own bytes, which the caster takes as they are. The engine's messages that name such a
path come back decoded the same way (errors="surrogateescape", python/bindings/module.cpp), so the
path in a message is the str the caller passed.
"""
from __future__ import annotations

import os

__all__ = ["core_path", "core_text", "text_of_path"]


def core_path(path: str | bytes | os.PathLike) -> bytes:
    """The bytes of `path` (str, bytes or os.PathLike) as the OS takes them (os.fsencode).
    TypeError for anything else; ValueError for an embedded NUL (C would cut the name there and
    open another file), as Python's own open() does."""
    p = os.fspath(path)
    b = os.fsencode(p)
    if b"\0" in b:
        raise ValueError(f"{p!r}: embedded null byte in a path")
    return b


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
