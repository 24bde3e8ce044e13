"""Interop: Hugging Face transformers export/import and GGUF export for llama.cpp (docs/interop.md).

    from lmlab.interop import export_hf, import_hf, export_gguf
    export_hf("runs/demo/final", "demo-hf")              # AutoModelForCausalLM.from_pretrained("demo-hf")
    import_hf("demo-hf", "models/demo")                  # a local transformers checkpoint -> lmlab
    export_gguf("runs/demo/final", "demo.gguf", dtype="q8_0")

transformers and gguf are optional ([hf], [gguf] extras) and imported only when used.
"""

from .gguf_export import export_gguf, llama_cpp_without_repack, permute_for_rope
from .hf import export_hf, from_hf_model, import_hf, to_hf_model, to_hf_tokenizer

__all__ = ["export_gguf", "export_hf", "from_hf_model", "import_hf", "llama_cpp_without_repack", "permute_for_rope",
           "to_hf_model", "to_hf_tokenizer"]
