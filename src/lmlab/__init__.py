"""lmlab: train, study and ship small language models.

    import lmlab
    tok = lmlab.Tokenizer.train(["Once upon a time a fox ran to the river."], kind="char")
    cfg = lmlab.ModelConfig.preset("llama-small", vocab_size=tok.vocab_size)
    model = lmlab.Transformer(cfg)                   # train it: `lmlab train`, or `from lmlab.train import train`
    lmlab.save("my-model", model, tok)
    model, tok = lmlab.load("my-model")              # or a run's model: lmlab.load("runs/demo/final")
    print(lmlab.generate(model, tok, "Once upon a time", max_new_tokens=50, top_k=40))
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .lazy import lazy_exports

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig", "KVCache", "ModelConfig", "Transformer", "Tokenizer", "generate", "generate_ids",
    "load", "save", "stream", "__version__",
]

# imported on first use (PEP 562): `import lmlab` for `lmlab --help` or lmlab.configs alone took a second, most
# of it torch
_LAZY = {
    "GenerationConfig": ".models.config", "KVCache": ".models.model", "ModelConfig": ".models.config",
    "Transformer": ".models.model", "Tokenizer": ".tokenizers.tokenizer", "generate": ".models.generation",
    "generate_ids": ".models.generation", "load": ".models.io:load_pretrained", "save": ".models.io",
    "stream": ".models.generation",
}

if TYPE_CHECKING:
    from .models import GenerationConfig, KVCache, ModelConfig, Transformer, generate, generate_ids, stream
    from .models.io import load_pretrained as load
    from .models.io import save
    from .tokenizers import Tokenizer


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
