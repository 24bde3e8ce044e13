"""lmlab: train, study and ship small language models.

    import lmlab
    tok = lmlab.Tokenizer.train(["Once upon a time a fox ran to the river."], kind="char")
    cfg = lmlab.ModelConfig.preset("llama-small", vocab_size=tok.vocab_size)
    model = lmlab.Transformer(cfg)                   # train it: `lmlab train`, or `from lmlab.train import train`
    lmlab.save("my-model", model, tok)
    model, tok = lmlab.load("my-model")              # or a run's model: lmlab.load("runs/demo/final")
    print(lmlab.generate(model, tok, "Once upon a time", max_new_tokens=50, top_k=40))
"""

from .models import GenerationConfig, KVCache, ModelConfig, Transformer, generate, generate_ids, stream
from .models.io import load_pretrained as load
from .models.io import save
from .tokenizers import Tokenizer

__version__ = "0.1.0"

__all__ = [
    "GenerationConfig", "KVCache", "ModelConfig", "Transformer", "Tokenizer", "generate", "generate_ids",
    "load", "save", "stream", "__version__",
]
