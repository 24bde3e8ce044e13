"""Token files: documents tokenised once into a flat memmap, plus a JSON header.

Layout of `tokens.bin` (uint16, or uint32 for vocabularies over 65,536):

    [doc0 train] EOS [doc1 train] EOS ... | [doc0 val] EOS [doc1 val] EOS ...
    <--------------- train region ------> <----------- val region ---------->

Each document's validation part is the held-out slice at its end. All training parts come first, so a
training window (sampled entirely inside the train region) can never overlap a validation token — the
leak of the seed trainers, which drew validation windows from overlapping chunks, cannot happen.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .documents import find_documents, read_document

FORMAT_VERSION = 1
BIN, HEADER = "tokens.bin", "tokens.json"
MIN_DOC_TOKENS_FOR_VAL = 32  # shorter documents go to training whole


@dataclass(frozen=True)
class Document:
    name: str
    chars: int
    train: tuple[int, int]  # [start, end) in tokens.bin, EOS excluded
    val: tuple[int, int]
    weight: float = 1.0


def prepare(sources: Sequence[str | Path], tokenizer: Any, out_dir: str | Path, *, val_fraction: float = 0.05,
            weights: Mapping[str, float] | None = None, seq_len: int | None = None) -> TokenDataset:
    """Read every document under `sources`, tokenise once, write `out_dir/tokens.{bin,json}`.
    `weights` maps a document's file name (or stem) to its sampling weight (default 1.0)."""
    paths = find_documents(sources)
    texts = [read_document(p) for p in paths]
    names = [p.name for p in paths]
    weights = dict(weights or {})
    unknown = set(weights) - set(names) - {p.stem for p in paths}
    if unknown:
        raise ValueError(f"--weight names no document: {', '.join(sorted(unknown))}")
    doc_weights = [weights.get(p.name, weights.get(p.stem, 1.0)) for p in paths]
    return prepare_texts(texts, tokenizer, out_dir, names=names, weights=doc_weights,
                         val_fraction=val_fraction, seq_len=seq_len)


def prepare_texts(texts: Sequence[str], tokenizer: Any, out_dir: str | Path, *, names: Sequence[str] | None = None,
                  weights: Sequence[float] | None = None, val_fraction: float = 0.05,
                  seq_len: int | None = None) -> TokenDataset:
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be in [0, 1)")
    names = list(names or [f"text-{i}" for i in range(len(texts))])
    weights = list(weights or [1.0] * len(texts))
    if any(not (w >= 0 and math.isfinite(w)) for w in weights):
        raise ValueError("document weights must be finite and >= 0")
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise ValueError("the corpus is empty: no document has any text")
    encoded = tokenizer.encode_batch([texts[i] for i in keep])
    eos = tokenizer.eos_id
    train_parts, val_parts, splits = [], [], []
    for ids in encoded:
        n_val = math.ceil(len(ids) * val_fraction) if len(ids) >= MIN_DOC_TOKENS_FOR_VAL and val_fraction else 0
        train_parts.append(ids[: len(ids) - n_val])
        val_parts.append(ids[len(ids) - n_val:])
    docs, offset = [], 0
    for part in train_parts:
        splits.append((offset, offset + len(part)))
        offset += len(part) + 1
    n_train = offset
    for j, i in enumerate(keep):
        val_start = offset
        offset += len(val_parts[j]) + (1 if val_parts[j] else 0)
        docs.append(Document(names[i], len(texts[i]), splits[j], (val_start, val_start + len(val_parts[j])),
                             float(weights[i])))
    window = (seq_len or 1) + 1
    if n_train < window:
        raise ValueError(f"the corpus has {n_train} training tokens, fewer than one window of {window}")
    if not any(d.weight > 0 for d in docs):
        raise ValueError("every document has weight 0")

    vocab = len(tokenizer)
    dtype = np.uint16 if vocab <= 2**16 else np.uint32
    flat = np.empty(offset, dtype=dtype)
    for d, part in zip(docs, train_parts):
        flat[d.train[0]:d.train[1]] = part
        flat[d.train[1]] = eos
    for d, part in zip(docs, val_parts):
        if part:
            flat[d.val[0]:d.val[1]] = part
            flat[d.val[1]] = eos
    val_bytes = sum(len(tokenizer.decode(p).encode("utf-8")) for p in val_parts)
    header = {
        "format": FORMAT_VERSION, "dtype": np.dtype(dtype).name, "num_tokens": int(offset),
        "train_tokens": n_train, "val_tokens": int(offset - n_train), "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "val_bytes": val_bytes,
        "documents": [dict(name=d.name, chars=d.chars, train=list(d.train), val=list(d.val), weight=d.weight)
                      for d in docs],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / BIN, flat.tobytes())  # the header goes last: no header, no dataset
    _atomic_write(out / HEADER, (json.dumps(header, ensure_ascii=False, indent=1) + "\n").encode("utf-8"))
    return TokenDataset.open(out)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


class TokenDataset:
    """A prepared token file. Training windows are random and contiguous; evaluation windows are fixed."""

    def __init__(self, path: Path, header: dict[str, Any], tokens: np.ndarray) -> None:
        self.path, self.header, self.tokens = path, header, tokens
        self.documents = [Document(d["name"], d["chars"], tuple(d["train"]), tuple(d["val"]), d["weight"])
                          for d in header["documents"]]
        starts = np.array([d.train[0] for d in self.documents], dtype=np.int64)
        lengths = np.array([d.train[1] - d.train[0] + 1 for d in self.documents], dtype=np.int64)  # + EOS
        mass = lengths * np.array([d.weight for d in self.documents])
        self._doc_start = torch.from_numpy(starts)
        self._doc_len = torch.from_numpy(lengths)
        self._doc_prob = torch.from_numpy(mass / mass.sum())

    @classmethod
    def open(cls, path: str | Path, tokenizer: Any = None) -> TokenDataset:
        path = Path(path)
        if not (path / HEADER).is_file() or not (path / BIN).is_file():
            raise FileNotFoundError(f"not a prepared dataset (needs {HEADER} and {BIN}): {path}")
        try:
            header = json.loads((path / HEADER).read_text(encoding="utf-8"))
            dtype = np.dtype(header["dtype"])
            num = int(header["num_tokens"])
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{path / HEADER} is not a valid dataset header: {exc}") from None
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path / HEADER}: unsupported format {header.get('format')}")
        if (path / BIN).stat().st_size != num * dtype.itemsize:
            raise ValueError(f"{path / BIN} has {(path / BIN).stat().st_size} bytes; the header says "
                             f"{num} tokens of {dtype.name}")
        if tokenizer is not None and tokenizer.fingerprint() != header["tokenizer_fingerprint"]:
            raise ValueError(f"{path} was tokenised with a different tokenizer")
        return cls(path, header, np.memmap(path / BIN, dtype=dtype, mode="r"))

    @property
    def num_tokens(self) -> int:
        return self.header["num_tokens"]

    @property
    def train_tokens(self) -> int:
        return self.header["train_tokens"]

    @property
    def val_tokens(self) -> int:
        return self.header["val_tokens"]

    # ---- batches -----------------------------------------------------------------------------------

    def sample_batch(self, batch_size: int, seq_len: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows from the train region: a document is drawn with probability ∝ weight × its
        training tokens, then a start inside it; a window may run on into the next document's training
        part (past an EOS) but never past the train region. Only `generator` supplies randomness, so its
        state is the complete data position for resuming."""
        last_start = self.train_tokens - seq_len - 1
        if last_start < 0:
            raise ValueError(f"seq_len {seq_len} needs {seq_len + 1} training tokens; have {self.train_tokens}")
        doc = torch.multinomial(self._doc_prob, batch_size, replacement=True, generator=generator)
        offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * self._doc_len[doc]).long()
        starts = (self._doc_start[doc] + offset).clamp_max(last_start).numpy()
        windows = self.tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows walking the val region (the same every call)."""
        lo, hi = self.train_tokens, self.num_tokens
        starts = np.arange(lo, hi - seq_len, seq_len)
        if max_batches is not None:
            starts = starts[: max_batches * batch_size]
        for i in range(0, len(starts), batch_size):
            s = starts[i:i + batch_size]
            w = torch.from_numpy(self.tokens[s[:, None] + np.arange(seq_len + 1)].astype(np.int64))
            yield w[:, :-1], w[:, 1:]

    # ---- statistics --------------------------------------------------------------------------------

    def unigram_entropy(self) -> float:
        """Entropy (nats/token) of the training unigram distribution: the loss of a model that ignores
        context. A language model has learned something once its val loss is below it."""
        counts = np.bincount(self.tokens[: self.train_tokens], minlength=1).astype(np.float64)
        p = counts[counts > 0] / counts.sum()
        return float(-(p * np.log(p)).sum())

    def bytes_per_token(self) -> float:
        """UTF-8 bytes of validation text per validation token, to turn nats/token into bits/byte."""
        return self.header["val_bytes"] / max(self.val_tokens, 1)

    def stats(self, model_config: Any = None) -> dict[str, Any]:
        out = {"documents": len(self.documents), "characters": sum(d.chars for d in self.documents),
               "tokens": self.num_tokens, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
               "documents_without_val": sum(d.val[0] == d.val[1] for d in self.documents)}
        if model_config is not None:
            n = model_config.num_parameters()
            out.update(parameters=n, tokens_per_parameter=self.train_tokens / n,
                       chinchilla_tokens=20 * n)  # ~20 tokens per parameter (Hoffmann et al. 2022)
        return out
