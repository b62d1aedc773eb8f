"""qlora_native: a lean native engine for QLoRA (NF4 base, LoRA training and serving, no PyTorch)."""
from pkgutil import extend_path

# Developer builds put _core in <build-dir>/qlora_native/ (tools/dev-build); extend_path lets
# PYTHONPATH=python:<build-dir> find it. Harmless for an installed package.
__path__ = extend_path(__path__, __name__)

from . import _core  # noqa: E402
from . import io  # noqa: E402,F401  (safetensors + JSON)
from . import nf4  # noqa: E402,F401  (NF4 + double-quant codec)
from . import ops  # noqa: E402,F401  (GEMM kernels on numpy arrays)
from ._core import (  # noqa: E402,F401
    FormatError,
    available_backends,
    num_threads,
    set_num_threads,
    simd_level,
    set_simd_level,
    supported_simd_levels,
)

from .tokenizer import Tokenizer  # noqa: E402
from .model import Model  # noqa: E402
from .lora_config import LoraConfig  # noqa: E402
from .trainer import Trainer, TrainingArguments  # noqa: E402

__version__ = _core.__version__

__all__ = [
    "FormatError",
    "available_backends",
    "num_threads",
    "set_num_threads",
    "simd_level",
    "set_simd_level",
    "supported_simd_levels",
    "Tokenizer",
    "Model",
    "LoraConfig",
    "Trainer",
    "TrainingArguments",
    "__version__",
]
