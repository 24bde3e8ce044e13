"""Model configuration, the transformer, generation and the model directory."""

from . import fast
from .config import FAMILIES, SIZES, ModelConfig, preset_names
from .generation import GenerationConfig, generate, generate_ids, iter_tokens, process_logits, stream
from .model import KVCache, ModelOutput, Transformer

__all__ = [
    "fast", "FAMILIES", "SIZES", "ModelConfig", "preset_names", "GenerationConfig", "generate", "generate_ids",
    "iter_tokens", "process_logits", "stream", "KVCache", "ModelOutput", "Transformer",
]
