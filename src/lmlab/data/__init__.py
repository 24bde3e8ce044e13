"""Books -> token files -> batches."""

from .dataset import Document, TokenDataset, prepare, prepare_texts
from .documents import decode_bytes, find_documents, html_to_text, normalize_text, read_document

__all__ = ["Document", "TokenDataset", "prepare", "prepare_texts", "decode_bytes", "find_documents",
           "html_to_text", "normalize_text", "read_document"]
