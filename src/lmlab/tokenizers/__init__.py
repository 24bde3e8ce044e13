"""Tokenizers: byte-level BPE, char and word, one interface, Hugging Face tokenizer.json on disk."""

from .tokenizer import BOS_ID, EOS_ID, KINDS, PAD_ID, SPECIAL_TOKENS, UNK_ID, StreamDecoder, Tokenizer

__all__ = ["BOS_ID", "EOS_ID", "KINDS", "PAD_ID", "SPECIAL_TOKENS", "UNK_ID", "StreamDecoder", "Tokenizer"]
