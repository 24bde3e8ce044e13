"""Books -> token files -> batches."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..lazy import lazy_exports

__all__ = ["Document", "TokenDataset", "prepare", "prepare_texts", "decode_bytes", "find_documents",
           "html_to_text", "normalize_text", "read_document"]

# name -> its module, imported on first use (PEP 562): filters.py and documents.py need neither numpy nor torch,
# and `lmlab prepare --help` reads its filters' help from filters.py
_LAZY = {
    "Document": ".dataset", "TokenDataset": ".dataset", "prepare": ".dataset", "prepare_texts": ".dataset",
    "decode_bytes": ".documents", "find_documents": ".documents", "html_to_text": ".documents",
    "normalize_text": ".documents", "read_document": ".documents",
}

if TYPE_CHECKING:
    from .dataset import Document, TokenDataset, prepare, prepare_texts
    from .documents import decode_bytes, find_documents, html_to_text, normalize_text, read_document


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, globals(), __all__)
