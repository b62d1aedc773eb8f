"""Llama-architecture GGUF files (llama.cpp) as HF-named float32 tensors and an HF config.

A thin view of the C++ loader (cpp/src/gguf/gguf_model.cpp), which holds the rules: the config
from the metadata (every field typed and range-checked), the GGUF -> HF name map, our own
dequantization, and llama.cpp's Q/K row permutation undone (GGML's interleaved RoPE layout back
to HF's rotate-half layout). Model.from_pretrained loads a .gguf through _core.gguf.load_model;
this class serves tests and tools that want the tensors themselves.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from ._core import gguf as _gguf
from .fspath import core_text

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N."), and the global tensors:
# the C++ loader's tables.
_LAYER_NAMES = dict(_gguf.layer_names())
_GLOBAL_NAMES = dict(_gguf.global_names())
# Tensor types the engine dequantizes (names as the gguf package spells them).
SUPPORTED_TYPES = frozenset(_gguf.type_name(t) for t in range(64) if _gguf.dequant_supported(t))


class GGUFSource:
    """An open GGUF file: `.config` (an HF-style config dict) and `.tensors()` (HF names, float32).

    Opening validates the structure (every count, length and offset bounded by the file size) and
    the config; tensors are dequantized from the memory map one at a time."""

    def __init__(self, path: str | os.PathLike):
        from .gguf_check import open_gguf

        self.file = open_gguf(path)
        self.path = self.file.path
        self.config = self.file.hf_config()

    def _names(self) -> list[tuple[str, str]]:
        """(GGUF name, HF name) in file order, skipped tensors left out."""
        return [(g, hf) for g, *_ in self.file.tensors() if (hf := self.file.hf_name(g))]

    def tensor_names(self) -> list[str]:
        return [hf for _, hf in self._names()]

    def tensor_shapes(self) -> dict[str, tuple]:
        """HF name -> shape in HF order ([out, in]), as stored."""
        dims = {t[0]: t[1] for t in self.file.tensors()}
        return {hf: tuple(reversed(dims[g])) for g, hf in self._names()}

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """Yields (hf_name, float32 array in HF layout), one tensor dequantized at a time."""
        from .config import ModelConfig

        core_cfg = ModelConfig.from_dict(self.config).to_core()
        for g, hf in self._names():
            yield hf, self.file.hf_tensor(g, core_cfg)


def _unpermute_rows(w: np.ndarray, n_head: int, name: str = "") -> np.ndarray:
    """Undo llama.cpp's convert_hf_to_gguf permutation of Q/K rows (interleaved -> rotate-half);
    the C++ loader's routine."""
    return _gguf.unpermute_rows(np.ascontiguousarray(w, dtype=np.float32), n_head, core_text(name))  # may name a path
