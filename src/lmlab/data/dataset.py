"""Token files: documents tokenised once into a flat memmap, plus a JSON header.

    out_dir/tokens.bin   little-endian uint16 (uint32 when the vocabulary exceeds 65,536), no header bytes:

        [doc0 train] EOS [doc1 train] EOS ... [docN train] EOS | [doc0 val] EOS [doc1 val] EOS ...
        <------------------ train region: train_tokens -------> <------ val region: val_tokens ---->

    out_dir/tokens.json  format, dtype, eos_id, vocab_size, tokenizer_fingerprint, totals (num/train/val
                         tokens, characters, train/val UTF-8 bytes) and per document: name, chars, weight,
                         `train` and `val` as [start, end) token ranges into tokens.bin (EOS not included);
                         "filters" when quality filters ran first (filters.py; examples in receipts.json).

Each document's validation part is the held-out slice at its end (`val_fraction` of its tokens). All
training parts come first, so a training window (sampled entirely inside the train region) can never
overlap a validation token. A val part is empty when its document has fewer than MIN_DOC_TOKENS_FOR_VAL.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from ..files import atomic_write_text, put_new, temp_beside
from .documents import find_documents, read_document
from .filters import apply_filters, without_examples

FORMAT_VERSION = 1
BIN, HEADER, RECEIPTS = "tokens.bin", "tokens.json", "receipts.json"
MIN_DOC_TOKENS_FOR_VAL = 32  # shorter documents go to training whole
_ENCODE_CHUNK_CHARS = 32 << 20  # tokenise ~32M characters at a time: bounds the Python lists of ids


@dataclass(frozen=True)
class Document:
    name: str
    chars: int
    train: tuple[int, int]  # [start, end) in tokens.bin, EOS excluded
    val: tuple[int, int]  # empty (start == end) when the document was too short to hold out a slice
    weight: float = 1.0

    @property
    def train_tokens(self) -> int:
        return self.train[1] - self.train[0]

    @property
    def val_tokens(self) -> int:
        return self.val[1] - self.val[0]


def prepare(sources: Sequence[str | Path], tokenizer: Any, out_dir: str | Path, *, val_fraction: float = 0.05,
            weights: Mapping[str, float] | None = None, seq_len: int | None = None,
            filters: Sequence[Any] = (), overwrite: bool = False) -> TokenDataset:
    """Read every document under `sources` (files, folders, globs), tokenise each once and write
    `out_dir/tokens.bin` + `out_dir/tokens.json`. `weights` maps a document's name, file name or stem to its
    sampling weight (default 1.0). With `seq_len`, refuse a corpus without one training window of seq_len+1.
    `filters` (filters.parse_filters) run on the texts before tokenising: what they removed is recorded in
    tokens.json under "filters" and, with examples, in out_dir/receipts.json; the held-out val slice is the
    tail of each *filtered* document. Nothing is written unless every document reads. A dataset already in
    `out_dir` (a run trained on it would resume on other data) is replaced only with overwrite=True."""
    if not overwrite:
        _refuse_dataset(out_dir)  # before the documents are read; prepare_texts checks again
    paths = find_documents(sources)
    names = _document_names(paths)
    _refuse_foreign_receipts(out_dir)
    _check_seq_len(seq_len)
    doc_weights = [1.0] * len(paths)
    for key, w in (weights or {}).items():
        hits = [i for i, (p, n) in enumerate(zip(paths, names)) if key in (n, p.name, p.stem)]
        if not hits:
            raise ValueError(f"weight {key}={w} names no document (have: {', '.join(names[:10])})")
        for i in hits:
            doc_weights[i] = w
    texts = [read_document(p) for p in paths]
    receipts = None
    if filters:
        kept, receipts = apply_filters(texts, names, filters)
        if not any(t is not None and t.strip() for t in kept):
            raise ValueError(f"the filters removed every document ({', '.join(f.name for f in filters)}); "
                             "see `lmlab data filter` for their receipts")
        texts, names, doc_weights = ([x[i] for i, t in enumerate(kept) if t is not None]
                                     for x in (kept, names, doc_weights))
    ds = prepare_texts(texts, tokenizer, out_dir, names=names, weights=doc_weights, val_fraction=val_fraction,
                       seq_len=seq_len, metadata={"filters": without_examples(receipts)} if receipts else None,
                       overwrite=overwrite)
    if receipts:
        atomic_write_text(Path(out_dir) / RECEIPTS, json.dumps(receipts, ensure_ascii=False, indent=1) + "\n")
    else:
        (Path(out_dir) / RECEIPTS).unlink(missing_ok=True)  # an earlier prepare's receipts are not this data's
    return ds


def _refuse_dataset(out_dir: str | Path) -> None:
    """A dataset already in `out_dir` is replaced only when asked: a run trained on it would resume on other data."""
    # a tokens.bin alone is one whose preparation did not finish (or is finishing): refused before the reading too
    if (Path(out_dir) / HEADER).exists() or (Path(out_dir) / BIN).exists():
        raise _held_dataset(out_dir)


def _held_dataset(out_dir: str | Path, why: str = "") -> FileExistsError:
    return FileExistsError(f"{out_dir} already holds a dataset{why}; replace it with --force (overwrite=True in "
                           "Python), or choose another folder")


def _refuse_foreign_receipts(out_dir: str | Path) -> None:
    """A receipts.json in `out_dir` goes (or is replaced) only with the dataset it belongs to, one whose tokens.json
    names filters: `lmlab data filter` writes its own beside the texts it kept, and preparing those texts into
    the same folder deleted it."""
    out = Path(out_dir)
    if not (out / RECEIPTS).exists():
        return
    try:
        header = json.loads((out / HEADER).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # no tokens.json there, or not a JSON one
        header = None
    if not (isinstance(header, dict) and "filters" in header):
        raise FileExistsError(f"{out / RECEIPTS} is not the receipts of a dataset there (lmlab data filter's?); "
                              "prepare into another folder")


def _check_seq_len(seq_len: int | None) -> None:
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1):
        raise ValueError(f"seq_len ({seq_len!r}) must be an integer >= 1")  # -5 and 0 were taken as 1


def _document_names(paths: Sequence[Path]) -> list[str]:
    """File names, or paths relative to the common folder when two books share a file name."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    root = Path(os.path.commonpath([p.resolve().parent for p in paths]))
    return [p.resolve().relative_to(root).as_posix() for p in paths]


def prepare_texts(texts: Sequence[str], tokenizer: Any, out_dir: str | Path, *, names: Sequence[str] | None = None,
                  weights: Sequence[float] | Mapping[str, float] | None = None, val_fraction: float = 0.05,
                  seq_len: int | None = None, metadata: Mapping[str, Any] | None = None,
                  overwrite: bool = False) -> TokenDataset:
    """`prepare` for in-memory texts (named text-0, text-1, ... unless `names` is given); `weights` is one
    per text, or a mapping from name to weight; `metadata` adds keys to tokens.json (e.g. "filters"). A dataset
    already in `out_dir` is replaced only with overwrite=True, as `prepare` replaces one."""
    if not overwrite:
        _refuse_dataset(out_dir)
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be in [0, 1)")
    _check_seq_len(seq_len)
    names = list(names) if names is not None else [f"text-{i}" for i in range(len(texts))]
    if len(names) != len(texts) or len(set(names)) != len(names):
        raise ValueError(f"need {len(texts)} distinct document names, got {len(set(names))}")
    if isinstance(weights, Mapping):
        unknown = set(weights) - set(names)
        if unknown:
            raise ValueError(f"weights name no document: {', '.join(sorted(unknown))}")
        weights = [weights.get(n, 1.0) for n in names]
    weights = [float(w) for w in weights] if weights is not None else [1.0] * len(texts)
    if len(weights) != len(texts) or any(not (w >= 0 and math.isfinite(w)) for w in weights):
        raise ValueError("need one finite weight >= 0 per document")
    keep = [i for i, t in enumerate(texts) if t.strip()]
    if not keep:
        raise ValueError("the corpus is empty: no document has any text")

    if metadata and set(metadata) & {"format", "dtype", "num_tokens", "train_tokens", "val_tokens", "documents"}:
        raise ValueError(f"metadata may not replace the header's own keys ({', '.join(sorted(metadata))})")
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 2**16 else np.uint32)  # ids < vocab <= 65,536 fit in uint16

    def n_val_of(n: int) -> int:
        return min(math.ceil(n * val_fraction), n - 1) if n >= MIN_DOC_TOKENS_FOR_VAL and val_fraction else 0

    # Bits per byte needs the UTF-8 size of the text the val tokens stand for: the text from where the first
    # of them starts. Decoding them lost what an <UNK> stood for and added the spaces word-level decoding puts
    # between words (val_bytes 0.73 of the true size for a 100-word vocabulary, 0 for a val part of <UNK>s).
    encode_cut = getattr(tokenizer, "encode_batch_cut", None)
    # A tokenizer whose own rule puts <BOS> before a text (an imported Llama's, Tokenizer.adds_bos) starts each
    # document with it, as transformers' run_clm tokenizes each text with its specials: the model sees its texts
    # begin as its prompts do. lmlab's own tokenizers add nothing; documents are separated by <EOS> either way.
    bos = [tokenizer.bos_id] if getattr(tokenizer, "adds_bos", False) else []
    train_parts, val_parts, val_bytes = [], [], []
    for chunk in _chunks(keep, [len(texts[i]) for i in keep]):
        batch = [texts[i] for i in chunk]
        if encode_cut is not None:  # the cut in the text's own ids, before the <BOS>
            encoded = encode_cut(batch, lambda n: n - n_val_of(n + len(bos)))
        else:  # a tokenizer without offsets: its val text decoded, which is right for a lossless one
            encoded = [(ids, None) for ids in tokenizer.encode_batch(batch)]
        for text, (ids, val_start) in zip(batch, encoded):
            ids = np.asarray(bos + list(ids), dtype=np.int64)
            if len(ids) and not 0 <= ids.min() <= ids.max() < vocab:
                raise ValueError(f"the tokenizer produced id {ids.max()} outside its vocabulary of {vocab}")
            ids = ids.astype(dtype)
            n_val = n_val_of(len(ids))
            train_parts.append(ids[: len(ids) - n_val])
            val_parts.append(ids[len(ids) - n_val:])
            val_text = text[val_start:] if val_start is not None else tokenizer.decode(val_parts[-1].tolist())
            val_bytes.append(len(val_text.encode("utf-8")) if n_val else 0)

    docs, offset = [], 0
    for part in train_parts:
        docs.append([offset, offset + len(part)])
        offset += len(part) + 1  # + EOS
    n_train = offset
    for span, part in zip(docs, val_parts):
        span += [offset, offset + len(part)]
        offset += len(part) + 1 if len(part) else 0
    window = (seq_len or 1) + 1
    if n_train < window:
        raise ValueError(f"the corpus has {n_train} training tokens, fewer than one window of {window}")
    if not any(weights[i] > 0 for i in keep):
        raise ValueError("every document has weight 0")

    doc_bytes = [len(texts[i].encode("utf-8")) for i in keep]
    header = {
        "format": FORMAT_VERSION, "dtype": dtype.name, "eos_id": int(tokenizer.eos_id), "vocab_size": vocab,
        "tokenizer_fingerprint": tokenizer.fingerprint(), "val_fraction": val_fraction,
        "num_tokens": offset, "train_tokens": n_train, "val_tokens": offset - n_train,
        "characters": sum(len(texts[i]) for i in keep),
        "train_bytes": sum(doc_bytes) - sum(val_bytes), "val_bytes": sum(val_bytes),
        "skipped_empty": [names[i] for i, t in enumerate(texts) if not t.strip()],
        **(metadata or {}),
        "documents": [{"name": names[i], "chars": len(texts[i]), "weight": weights[i],
                       "train": span[:2], "val": span[2:]} for i, span in zip(keep, docs)],
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    eos = np.array([tokenizer.eos_id], dtype=dtype).tobytes()
    with _Staged(out / BIN) as bin_file, _Staged(out / HEADER) as header_file:
        for part in train_parts + [p for p in val_parts if len(p)]:
            bin_file.write(part.tobytes())
            bin_file.write(eos)
        header_file.write(_header_json(header).encode("utf-8"))
        # Drop the old header first: a crash in between leaves a tokens.bin that open() refuses (no
        # header), never a new tokens.bin under an old header.
        if overwrite:
            (out / HEADER).unlink(missing_ok=True)
        try:
            # without overwrite, both files are put in place only where none is (a link fails on an existing
            # name): two preparations into one folder both said "written" and the later one replaced the other
            bin_file.publish(exclusive=not overwrite)
        except FileExistsError:
            raise _held_dataset(out_dir, f" ({BIN}: another preparation wrote it meanwhile)") from None
        try:
            header_file.publish(exclusive=not overwrite)
        except BaseException:
            (out / BIN).unlink(missing_ok=True)  # no tokens.bin without its header
            raise
    return TokenDataset.open(out)


def _header_json(header: dict[str, Any]) -> str:
    """Pretty JSON with one line per document, so a header of a thousand books still reads in a pager."""
    lines = [f" {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}" for k, v in header.items() if k != "documents"]
    docs = ",\n".join("  " + json.dumps(d, ensure_ascii=False) for d in header["documents"])
    return "{\n" + ",\n".join([*lines, f' "documents": [\n{docs}\n ]']) + "\n}\n"


def _chunks(items: list[int], sizes: list[int]) -> Iterator[list[int]]:
    chunk, total = [], 0
    for item, size in zip(items, sizes):
        chunk.append(item)
        total += size
        if total >= _ENCODE_CHUNK_CHARS:
            yield chunk
            chunk, total = [], 0
    if chunk:
        yield chunk


class _Staged:
    """A file written under a temporary name in the same folder; `publish` renames it into place. Leaving
    the block without publishing removes it, so a failure never leaves a partial file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tmp = temp_beside(path)
        self.file = open(self.tmp, "wb")

    def __enter__(self) -> _Staged:
        return self

    def write(self, data: bytes) -> None:
        self.file.write(data)

    def publish(self, exclusive: bool = False) -> None:
        """Rename into place; `exclusive`: FileExistsError (and nothing replaced) where the name is taken."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        if exclusive:
            put_new(self.tmp, self.path)
            self.tmp.unlink(missing_ok=True)
        else:
            os.replace(self.tmp, self.path)

    def __exit__(self, *exc: object) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class TokenDataset:
    """A prepared token file. Training windows are random and contiguous; evaluation windows are fixed."""

    def __init__(self, path: Path, header: dict[str, Any], tokens: np.ndarray) -> None:
        self.path, self.header, self.tokens = path, header, tokens
        self.documents = [Document(d["name"], d["chars"], tuple(d["train"]), tuple(d["val"]), d["weight"])
                          for d in header["documents"]]
        # A plain ndarray over the same mapping: numpy's memmap subclass costs ~40 us per fancy index.
        self._flat = tokens.view(np.ndarray)
        self._samplers: dict[int, tuple[np.ndarray, ...]] = {}

    @classmethod
    def open(cls, path: str | Path, tokenizer: Any = None) -> TokenDataset:
        """Open `path/tokens.{bin,json}`; ValueError if they disagree, or if `tokenizer` is given and is not
        the one the file was made with."""
        path = Path(path)
        if not (path / HEADER).is_file() or not (path / BIN).is_file():
            raise FileNotFoundError(f"not a prepared dataset (needs {HEADER} and {BIN}): {path}")
        try:
            header = json.loads((path / HEADER).read_text(encoding="utf-8"))
            dtype = np.dtype(header["dtype"])
            num, n_train = int(header["num_tokens"]), int(header["train_tokens"])
            spans = [(*d["train"], *d["val"]) for d in header["documents"]]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path / HEADER} is not a valid dataset header ({type(exc).__name__}: {exc})") from None
        if header.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path / HEADER}: unsupported format {header.get('format')} (want {FORMAT_VERSION})")
        if dtype not in (np.uint16, np.uint32) or header.get("vocab_size", 0) > np.iinfo(dtype).max + 1:
            raise ValueError(f"{path / HEADER}: dtype {dtype} cannot hold vocab_size {header.get('vocab_size')}")
        size = (path / BIN).stat().st_size
        if size != num * dtype.itemsize:
            raise ValueError(f"{path / BIN} has {size} bytes; the header says {num} tokens of {dtype.name}")
        if not spans or any(not (0 <= a <= b < n_train <= c <= d <= num) for a, b, c, d in spans) \
                or header.get("val_tokens") != num - n_train:
            raise ValueError(f"{path / HEADER}: document ranges do not fit in {num} tokens")
        if tokenizer is not None and tokenizer.fingerprint() != header["tokenizer_fingerprint"]:
            raise ValueError(f"{path} was tokenised with a different tokenizer (fingerprint "
                             f"{header['tokenizer_fingerprint'][:12]}, this one {tokenizer.fingerprint()[:12]})")
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

    def __repr__(self) -> str:
        return (f"TokenDataset({str(self.path)!r}, documents={len(self.documents)}, "
                f"train_tokens={self.train_tokens}, val_tokens={self.val_tokens})")

    # ---- batches -----------------------------------------------------------------------------------

    def window_starts(self, seq_len: int) -> np.ndarray:
        """Per document, how many training windows of seq_len + 1 tokens start in it (sample_batch draws a
        document by this count times its weight): its train tokens and its EOS, but those past the last start
        of the whole training region."""
        last_start = self.train_tokens - seq_len - 1  # the final window ends on the last train EOS
        if seq_len < 1 or last_start < 0:
            raise ValueError(f"seq_len {seq_len} needs {seq_len + 1} training tokens; have {self.train_tokens}")
        first = np.array([d.train[0] for d in self.documents], dtype=np.int64)
        end = np.array([d.train[1] for d in self.documents], dtype=np.int64)  # its EOS may start a window
        return np.clip(np.minimum(end, last_start) - first + 1, 0, None)

    def _sampler(self, seq_len: int) -> tuple[np.ndarray, ...]:
        """Per document: first start position, number of start positions, cumulative probability."""
        if seq_len not in self._samplers:
            count = self.window_starts(seq_len)
            first = np.array([d.train[0] for d in self.documents], dtype=np.int64)
            mass = count * np.array([d.weight for d in self.documents])
            if mass.sum() <= 0:
                raise ValueError(f"no document with weight > 0 has room to start a window of {seq_len + 1} tokens")
            cdf = np.cumsum(mass) / mass.sum()
            cdf[np.flatnonzero(mass)[-1]:] = 1.0  # rounding must not let u land past the last live document
            self._samplers[seq_len] = (first, count, cdf, np.concatenate([[0.0], cdf[:-1]]),
                                       sliding_window_view(self._flat[: self.train_tokens], seq_len + 1))
        return self._samplers[seq_len]

    def sample_batch(self, batch_size: int, seq_len: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """`batch_size` random windows from the train region as int64 (x, y), y = x shifted by one.

        A document is drawn with probability ∝ weight × its training tokens, then a start uniformly among its
        tokens (and its trailing EOS); the window may run on past the EOS into the next document's training
        part, so short documents need no special case, but never past the train region (the last seq_len
        positions of the region start no window). One uniform number per row from `generator` (a CPU
        generator) picks both; nothing else is random, so `generator.get_state()` is the data position."""
        first, count, cdf, cdf_lo, windows = self._sampler(seq_len)
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64).numpy()
        doc = np.searchsorted(cdf, u, side="right")
        within = ((u - cdf_lo[doc]) / (cdf[doc] - cdf_lo[doc]) * count[doc]).astype(np.int64)
        rows = windows[first[doc] + np.minimum(within, count[doc] - 1)]  # (B, T+1), uint16/32
        # Numpy makes the int64 copies: torch's parallel copy of a strided view stalls on a busy 2-core host.
        return torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))

    def eval_windows(self, seq_len: int) -> np.ndarray:
        """Start positions of the validation windows: consecutive, so each val token after the first is a
        target exactly once; the last partial window (< seq_len tokens) is left out."""
        return np.arange(self.train_tokens, self.num_tokens - seq_len, seq_len, dtype=np.int64)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Fixed, non-overlapping windows walking the val region, the same on every call. With `max_batches`
        the windows are spread evenly over the whole region, so every book is represented, not just the
        first ones."""
        starts = self.eval_windows(seq_len)
        if max_batches is not None and len(starts) > max_batches * batch_size:
            starts = starts[np.linspace(0, len(starts) - 1, max_batches * batch_size).round().astype(np.int64)]
        offsets = np.arange(seq_len + 1)
        for i in range(0, len(starts), batch_size):
            rows = self._flat[starts[i:i + batch_size, None] + offsets]
            yield torch.from_numpy(rows[:, :-1].astype(np.int64)), torch.from_numpy(rows[:, 1:].astype(np.int64))

    # ---- statistics --------------------------------------------------------------------------------

    def _region(self, split: str) -> np.ndarray:
        if split == "train":
            return self._flat[: self.train_tokens]
        if split == "val":
            return self._flat[self.train_tokens:]
        raise ValueError(f"split must be 'train' or 'val', not {split!r}")

    def unigram_entropy(self, split: str = "train") -> float:
        """Entropy (nats/token) of the unigram distribution of `split` (EOS included): the loss of a model that
        ignores context. A language model has learned something once its val loss is below it."""
        region = self._region(split)
        counts = np.zeros(self.header["vocab_size"], dtype=np.int64)
        for i in range(0, len(region), 1 << 24):  # bincount widens to int64: count in 128 MB pieces
            counts += np.bincount(region[i:i + (1 << 24)], minlength=len(counts))[: len(counts)]
        p = counts[counts > 0] / max(counts.sum(), 1)
        return float(-(p * np.log(p)).sum())

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of the `split` text per token of it (EOS included), to turn nats/token into bits per
        byte: bpb = loss / ln 2 / bytes_per_token. 0.0 for an empty split."""
        tokens = len(self._region(split))
        return self.header.get(f"{split}_bytes", 0) / tokens if tokens else 0.0

    def stats(self, model_config: Any = None) -> dict[str, Any]:
        """Corpus size (and the filters' receipts, if any); with a ModelConfig also training tokens per parameter
        against Chinchilla's ~20."""
        out = {"documents": len(self.documents), "characters": sum(d.chars for d in self.documents),
               "tokens": self.num_tokens, "train_tokens": self.train_tokens, "val_tokens": self.val_tokens,
               "documents_without_val": sum(d.val_tokens == 0 for d in self.documents),
               "skipped_empty": list(self.header.get("skipped_empty", [])),
               "bytes_per_token": self.bytes_per_token("val") or self.bytes_per_token("train")}
        if "filters" in self.header:  # what the data went through; a run's config.json keeps these stats
            out["filters"] = self.header["filters"]
        if model_config is not None:
            n = model_config.num_parameters()
            # Hoffmann et al. 2022 (Chinchilla): compute-optimal training uses ~20 tokens per parameter.
            out.update(parameters=n, tokens_per_parameter=self.train_tokens / n,
                       chinchilla_tokens_per_parameter=20, chinchilla_tokens=20 * n)
        return out
