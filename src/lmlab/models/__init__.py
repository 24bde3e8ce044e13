"""Model configuration, the transformer, generation and the model directory."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

__all__ = [
    "fast", "FAMILIES", "SIZES", "ModelConfig", "preset_names", "GenerationConfig", "generate", "generate_ids",
    "iter_tokens", "process_logits", "stream", "KVCache", "ModelOutput", "Transformer",
]

# name -> its module, imported on first use (PEP 562): config.py needs no torch, and `lmlab COMMAND --help`
# builds its flags from ModelConfig and GenerationConfig without paying for the rest
_LAZY = {
    "FAMILIES": ".config", "SIZES": ".config", "ModelConfig": ".config", "preset_names": ".config",
    "GenerationConfig": ".config", "generate": ".generation", "generate_ids": ".generation",
    "iter_tokens": ".generation", "process_logits": ".generation", "stream": ".generation",
    "KVCache": ".model", "ModelOutput": ".model", "Transformer": ".model",
}

if TYPE_CHECKING:
    from . import fast
    from .config import FAMILIES, SIZES, GenerationConfig, ModelConfig, preset_names
    from .generation import generate, generate_ids, iter_tokens, process_logits, stream
    from .model import KVCache, ModelOutput, Transformer


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
