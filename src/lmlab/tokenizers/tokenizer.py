"""One Tokenizer for every kind (bpe, char, word), each a native Hugging Face `tokenizers` object.

Because every kind is an ordinary HF tokenizer, its `tokenizer.json` loads in `tokenizers` and in
`transformers.PreTrainedTokenizerFast` unchanged, and nothing is ever pickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
KINDS = ("bpe", "char", "word")
_WORD_RE = re.compile(r"\w+|[^\w\s]")  # seed 000's SimpleTokenizer split, applied to lower-cased text


def _read_files(files: Sequence[str | Path]) -> Iterator[str]:
    for f in files:
        yield Path(f).read_text(encoding="utf-8")


class Tokenizer:
    """encode/decode text <-> ids with `<PAD>`=0 `<UNK>`=1 `<BOS>`=2 `<EOS>`=3."""

    def __init__(self, hf: HFTokenizer) -> None:
        for i, tok in enumerate(SPECIAL_TOKENS):
            if hf.token_to_id(tok) != i:
                raise ValueError(f"tokenizer must map {tok} to id {i} (found {hf.token_to_id(tok)})")
        self.hf = hf

    # ---- training ----------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str] | None = None, *, files: Sequence[str | Path] | None = None,
              kind: str = "bpe", vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train on in-memory texts and/or UTF-8 files (streamed, never all in memory at once)."""
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
        floor = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else 1)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            why = "4 specials + 256 byte tokens" if kind == "bpe" else "4 specials + at least 1 token"
            raise ValueError(f"vocab_size ({vocab_size}) must be >= {floor} for {kind} ({why})")

        def corpus() -> Iterator[str]:
            yield from texts or ()
            yield from _read_files(files or ())

        if kind == "bpe":
            hf = HFTokenizer(models.BPE(unk_token=None))
            hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                          special_tokens=SPECIAL_TOKENS, show_progress=False,
                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
            hf.train_from_iterator(corpus(), trainer=trainer)
        else:
            counts: Counter[str] = Counter()
            for text in corpus():
                counts.update(text if kind == "char" else _WORD_RE.findall(text.lower()))
            vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
            for tok, _ in counts.most_common(vocab_size - len(SPECIAL_TOKENS)):
                vocab.setdefault(tok, len(vocab))
            hf = HFTokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
            if kind == "char":  # every character its own piece, whitespace included; decode concatenates
                hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
                hf.decoder = decoders.Fuse()
            else:  # lower-case, split off words and single punctuation marks; decode joins with spaces
                hf.normalizer = normalizers.Lowercase()
                hf.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.WhitespaceSplit(),
                    pre_tokenizers.Split(Regex(r"\w+|[^\w\s]"), behavior="isolated")])
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf)

    # ---- properties --------------------------------------------------------------------------------

    @property
    def kind(self) -> str:
        if isinstance(self.hf.model, models.BPE):
            return "bpe"
        return "char" if isinstance(self.hf.decoder, decoders.Fuse) else "word"

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.hf.id_to_token(idx)

    # ---- encode / decode ---------------------------------------------------------------------------

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        ids = self.hf.encode(text, add_special_tokens=False).ids
        return [BOS_ID] * add_bos + ids + [EOS_ID] * add_eos

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        return [[BOS_ID] * add_bos + e.ids + [EOS_ID] * add_eos
                for e in self.hf.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        return self.hf.decode_batch([list(ids) for ids in batch], skip_special_tokens=skip_special_tokens)

    def stream_decoder(self) -> StreamDecoder:
        return StreamDecoder(self)

    # ---- files -------------------------------------------------------------------------------------

    def to_json(self) -> str:
        return self.hf.to_str()

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: token files record it to refuse a mismatched tokenizer."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.hf.to_str(pretty=True))
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path} is not a valid tokenizer.json: {reason}") from None
        return cls(hf)

    @classmethod
    def from_hf(cls, hf: HFTokenizer) -> Tokenizer:
        return cls(hf)

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns ids pushed one at a time into text as soon as it is complete. Byte-level BPE tokens can end
    inside a multi-byte UTF-8 character; such text is held until the character completes, so a stream
    never shows U+FFFD that the full decode would not."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.emitted = 0  # characters of decode(self.ids) already returned

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        if len(self.ids) > 64:  # keep decoding O(1) per token: restart, keeping one token of context
            self.ids = self.ids[-1:]  # (word-level decoding puts spaces *between* tokens)
            self.emitted = len(self.tokenizer.decode(self.ids))
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[self.emitted:]
        self.ids, self.emitted = [], 0
        return new
