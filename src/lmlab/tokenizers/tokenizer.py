"""One Tokenizer for every kind (bpe, char, word), each a native Hugging Face `tokenizers` object.

Because every kind is an ordinary HF tokenizer, its `tokenizer.json` loads in `tokenizers` and in
`transformers.PreTrainedTokenizerFast` unchanged, and nothing is ever pickled.

- bpe: byte-level BPE (GPT-2 style). Lossless on any Unicode text; never produces <UNK>.
- char: one token per Unicode code point seen in training (most frequent first). Lossless on text made of
  seen characters; an unseen character encodes as <UNK> and decodes as "<UNK>".
- word: the AZR Model Trainer app's SimpleTokenizer: `re.findall(r"\\w+|[^\\w\\s]", text.lower())`, the most
  frequent words, <UNK> for the rest, decode joins with single spaces. Lossy by design: case, whitespace and
  newlines go.

Special tokens are only ever produced by `add_bos`/`add_eos`: the literal text "<EOS>" encodes as ordinary
text, so any text round-trips and user text cannot inject control tokens. lmlab's own tokenizers add none by
themselves; an imported checkpoint's may prepend <BOS> (Llama's post-processor), which `adds_bos` reports and the
encoders of whole texts for the model (a prompt, an eval context, a document) honour. Plain HF loaders match special
tokens in text unless told not to (`PreTrainedTokenizerFast(..., split_special_tokens=True)`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

from ..files import atomic_path, refuse_existing

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
SPECIAL_TOKENS = ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
MAX_VOCAB = 2**24  # 16.8 M tokens: far beyond any real vocabulary
KINDS = ("bpe", "char", "word")
_WORD_RE = re.compile(r"\w+|[^\w\s]")  # the seed SimpleTokenizer's split, applied to lower-cased text
# The same split for the Rust side. Python's \w is str.isalnum() or "_" (= \p{L}\p{N}_; Oniguruma's \w adds
# combining marks, so it would keep "हिन्दी" whole where Python splits it) and Python's \s adds \x1c-\x1f.
# Checked on every code point assigned in Python's Unicode database.
_PY_W, _PY_S = r"\p{L}\p{N}_", r"\s\x1c-\x1f"
# str.lower() turns a word-final Σ into ς; HF's Lowercase maps chars one at a time, so do that step first.
# (Rust look-behind needs a bounded length: up to 3 case-ignorable chars after the cased one. Fuzzing against
# str.lower() on 100k adversarial Greek strings: 6 misses, all with 4+ ignorables; none in real text.)
_CASED, _IGNORABLE = r"[\p{Lu}\p{Ll}\p{Lt}]", r"[\p{Mn}\p{Me}\p{Cf}\p{Lm}\p{Sk}'.:·’]"
_FINAL_SIGMA = rf"(?<={_CASED}{_IGNORABLE}{{0,3}})Σ(?!{_IGNORABLE}*{_CASED})"
_CHUNK_CHARS = 1 << 20  # training reads files in pieces of about this many characters
log = logging.getLogger(__name__)


def _stream_file(path: str | Path) -> Iterator[str]:
    """Yield a UTF-8 file in pieces, cutting only at a newline with non-space characters on both sides.
    Every kind's pre-tokenizer splits there anyway, and that "\n" is one pre-token with or without what
    follows (GPT-2's regex has no look-behind), so training on the pieces equals training on the whole.
    A leading BOM is no text (it became a token of the vocabulary); other bytes than UTF-8 are refused,
    naming the file (lmlab.data.read_document reads the other encodings and formats)."""
    buf: list[str] = []
    size = 0
    # newline="": keep \r\n, as in-memory texts do
    with open(path, encoding="utf-8-sig", newline="") as f:
        try:
            for line in f:
                prev = buf[-1] if buf else ""
                if size >= _CHUNK_CHARS and prev[-2:-1].strip() and prev.endswith("\n") and line[:1].strip():
                    yield "".join(buf)
                    buf, size = [], 0
                buf.append(line)
                size += len(line)
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x}: {exc.reason}); files= "
                             "takes UTF-8 text files: read others with lmlab.data.read_document and pass the "
                             "texts") from None
    if buf:
        yield "".join(buf)


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte a printable character), reversed: a byte-level BPE token's
    characters -> its bytes (Radford et al. 2019, the `bytes_to_unicode` of openai/gpt-2's encoder.py)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()


class Tokenizer:
    """encode/decode text <-> ids with `<PAD>`=0 `<UNK>`=1 `<BOS>`=2 `<EOS>`=3, wrapping `self.hf`."""

    pad_id, unk_id, bos_id, eos_id = PAD_ID, UNK_ID, BOS_ID, EOS_ID

    def __init__(self, hf: HFTokenizer) -> None:
        if not isinstance(hf.model, (models.BPE, models.WordLevel)):
            raise ValueError(f"unsupported tokenizer model {type(hf.model).__name__}; expected BPE or WordLevel")
        if isinstance(hf.model, models.BPE) and hf.model.dropout:  # a training-time augmentation
            raise ValueError(f"BPE dropout ({hf.model.dropout:g}) makes encoding random, other ids for the same text "
                             'each time; set the model\'s "dropout" to null')
        if hf.truncation or hf.padding:
            # Options of an encoding call, carried by a foreign tokenizer.json: truncation cut every book to
            # max_length tokens, padding put <PAD> rows into the token files. lmlab encodes whole texts.
            log.warning("turned off the tokenizer's %s: lmlab encodes whole texts, unpadded",
                        " and ".join(k for k in ("truncation", "padding") if getattr(hf, k)))
            hf.no_truncation()
            hf.no_padding()
        added = hf.get_added_tokens_decoder()
        for i, tok in enumerate(SPECIAL_TOKENS):
            if i not in added or added[i].content != tok or not added[i].special:
                found = added[i].content if i in added else hf.id_to_token(i)
                raise ValueError(f"id {i} must be the special token {tok} (found {found!r})")
        hf.encode_special_tokens = True  # see the module docstring
        self.hf = hf

    @classmethod
    def train(cls, texts: Iterable[str] | None = None, *, files: Sequence[str | Path] | None = None,
              kind: str = "bpe", vocab_size: int = 8192, min_frequency: int = 2) -> Tokenizer:
        """Train on in-memory texts and/or UTF-8 files (streamed in pieces). `min_frequency` is bpe's."""
        if kind not in KINDS:
            raise ValueError(f"tokenizer kind {kind!r} is unknown; choose one of {', '.join(KINDS)}")
        floor = len(SPECIAL_TOKENS) + (256 if kind == "bpe" else 1)
        if not isinstance(vocab_size, int) or vocab_size < floor:
            why = "4 specials + 256 byte tokens" if kind == "bpe" else "4 specials + at least 1 token"
            raise ValueError(f"vocab_size ({vocab_size}) must be >= {floor} for {kind} ({why})")
        if vocab_size > MAX_VOCAB:  # the tokenizers library panics (exit 99) sizing its tables for 2**63
            raise ValueError(f"vocab_size ({vocab_size}) must be at most {MAX_VOCAB:,}")
        if isinstance(texts, str):  # iterating a str would train on single characters
            raise TypeError("texts must be an iterable of strings, not one str; wrap it in a list")
        if texts is None and files is None:
            raise ValueError("nothing to train on: pass texts and/or files")
        seen_text = False

        def corpus() -> Iterator[str]:
            nonlocal seen_text
            for text in itertools.chain(texts or (), *map(_stream_file, files or ())):
                seen_text = seen_text or bool(text.strip())
                yield text

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
            for tok, _ in counts.most_common(vocab_size - len(SPECIAL_TOKENS)):  # ties: first seen first
                vocab.setdefault(tok, len(vocab))
            hf = HFTokenizer(models.WordLevel(vocab, unk_token="<UNK>"))
            if kind == "char":  # every code point its own piece, whitespace included; decode concatenates
                hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
                hf.decoder = decoders.Fuse()
            else:  # no decoder: HF joins word-level tokens with single spaces
                hf.normalizer = normalizers.Sequence([normalizers.Replace(Regex(_FINAL_SIGMA), "ς"),
                                                      normalizers.Lowercase()])
                hf.pre_tokenizer = pre_tokenizers.Sequence([
                    pre_tokenizers.Split(Regex(f"[{_PY_S}]+"), behavior="removed"),
                    pre_tokenizers.Split(Regex(f"[{_PY_W}]+|[^{_PY_W}{_PY_S}]"), behavior="isolated")])
        if not seen_text:  # char and word kinds made a vocabulary of the specials alone: all text became <UNK>
            raise ValueError("the corpus is empty: no text has anything but whitespace")
        hf.add_special_tokens(SPECIAL_TOKENS)
        return cls(hf)

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

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.hf.id_to_token(idx)

    def token_bytes(self, idx: int) -> bytes | None:
        """The bytes a byte-level BPE token stands for (they may end inside a UTF-8 character, where decode gives
        U+FFFD); None for other kinds, or a token not written in the byte-level alphabet."""
        raw = self.id_to_token(idx) if self.kind == "bpe" else None
        if raw is None or not all(c in BYTE_LEVEL for c in raw):
            return None
        return bytes(BYTE_LEVEL[c] for c in raw)

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer's own post-processor puts <BOS> before a text (a Llama checkpoint's does; lmlab's
        tokenizers do not): transformers' tokenizer(text).input_ids and llama.cpp (GGUF's add_bos_token) start the
        text with it, so the model was trained to see it first. The one place that decides it: generation, the
        OpenAI API, eval scoring and token files encode a whole text as encode(text, add_bos=tok.adds_bos)."""
        if getattr(self, "_adds_bos", None) is None:  # asked per prompt and per scored pair: the post-processor's
            self._adds_bos = self.hf.encode("a b", add_special_tokens=True).ids[:1] == [BOS_ID]  # answer, once
        return self._adds_bos

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        try:
            ids = self.hf.encode(text, add_special_tokens=False).ids
        except TypeError:
            _refuse_surrogates([text])
            raise
        return [BOS_ID] * add_bos + ids + [EOS_ID] * add_eos

    def encode_batch(self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False) -> list[list[int]]:
        """Encodes in parallel on Rust threads (TOKENIZERS_PARALLELISM=false turns that off)."""
        return [[BOS_ID] * add_bos + e.ids + [EOS_ID] * add_eos for e in self._encodings(texts)]

    def encode_batch_cut(self, texts: Sequence[str], cut: Callable[[int], int]) -> list[tuple[list[int], int]]:
        """Each text's ids (as encode_batch) and the character at which its token k = cut(len(ids)) starts
        (len(text) for k = len(ids)): where cutting the ids at k cuts the text, what the tokens after k stand for
        (an <UNK> its unseen characters, a word its own letters). A character that byte-level BPE split between
        tokens k-1 and k goes with k."""
        out = []
        for text, e in zip(texts, self._encodings(texts)):
            k = cut(len(e.ids))
            out.append((e.ids, len(text) if k >= len(e.ids) else e.token_to_chars(k)[0]))
        return out

    def _encodings(self, texts: Sequence[str]) -> list:
        try:
            return self.hf.encode_batch(list(texts), add_special_tokens=False)
        except TypeError:
            _refuse_surrogates(texts)
            raise

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        """Text of `ids`. skip_special_tokens leaves out <PAD> <BOS> <EOS> and the other control tokens (a chat
        model's roles) but not <UNK>: it stands for text the vocabulary lacks, and dropping it hid that (an unseen
        character vanished), where transformers' decode of the export prints it."""
        if skip_special_tokens:
            skip = self._skipped_ids()
            ids = [i for i in ids if int(i) not in skip]
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def decode_batch(self, batch: Sequence[Sequence[int]], *, skip_special_tokens: bool = True) -> list[str]:
        if skip_special_tokens:
            skip = self._skipped_ids()
            batch = [[i for i in ids if int(i) not in skip] for ids in batch]
        return self.hf.decode_batch([list(ids) for ids in batch], skip_special_tokens=False)

    def _skipped_ids(self) -> frozenset[int]:
        """The special tokens' ids but <UNK>'s, remade when tokens were added (chat roles are added in place)."""
        size = self.hf.get_vocab_size(with_added_tokens=True)
        if getattr(self, "_skip_for", None) != size:
            added = self.hf.get_added_tokens_decoder()
            self._skip = frozenset(i for i, t in added.items() if t.special and i != UNK_ID)
            self._skip_for = size
        return self._skip

    def context_tail(self, context: Sequence[int]) -> tuple[list[int], str]:
        """(the last id of `context` when it decodes to whole text, else []; its text): what a continuation of
        `context` is decoded after, to read as it does in the whole text -- word-level decoding puts a space between
        two words, and a Metaspace (SentencePiece-style) decoder drops a text's leading space, so a continuation
        decoded alone would lose the space that joins it to the prompt. After a special token (a chat turn's role),
        or part of a character, the continuation starts afresh."""
        if not context:
            return [], ""
        tail = [int(context[-1])]
        text = self.decode(tail)
        return (tail, text) if text and "\ufffd" not in text else ([], "")

    def decode_continuation(self, context: Sequence[int], ids: Sequence[int], *,
                            skip_special_tokens: bool = True) -> str:
        """The text `ids` add after `context`: decode(context + ids) = decode(context) + this (up to how the
        tokenizer decodes the rest of the context)."""
        tail, before = self.context_tail(context)
        return self.decode([*tail, *ids], skip_special_tokens=skip_special_tokens)[len(before):]

    def stream_decoder(self, *, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context=context)

    def to_json(self) -> str:
        return self.hf.to_str()

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: token files record it to refuse a mismatched tokenizer. Stable
        across save/load; a `tokenizers` release that changes the JSON layout would change it."""
        canonical = json.dumps(json.loads(self.hf.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    sha256 = fingerprint

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """Write tokenizer.json (to `path`, or into it if it is a directory) atomically; return the file. A file
        there already (a book, a model's own tokenizer) is replaced only with overwrite=True."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not overwrite:
            refuse_existing(path)
        with atomic_path(path, new=not overwrite) as tmp:
            tmp.write_text(self.hf.to_str(pretty=True), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or the one inside a directory."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            hf = HFTokenizer.from_str(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tokenizers raises a plain Exception on bad JSON; bad UTF-8 lands here too
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise ValueError(f"{path} is not a valid tokenizer.json: {reason}") from None
        try:
            return cls(hf)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    @classmethod
    def from_hf(cls, hf: HFTokenizer) -> Tokenizer:
        """Wrap a copy of `hf` (the copy gets `encode_special_tokens=True`; the caller's object is untouched)."""
        return cls(HFTokenizer.from_str(hf.to_str()))

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


class StreamDecoder:
    """Turns ids pushed one at a time into text as soon as it is complete. A byte-level BPE token can end
    inside a multi-byte UTF-8 character; that text is held until the character completes, so a stream
    never shows a U+FFFD that the full decode would not. "".join(pushes) + flush() ==
    decode_continuation(context, ids): the ids continue `context` (a prompt's ids), if given."""

    _RESTART = 64  # decode at most this many ids per push, so streaming stays O(1) per token

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True, context: Sequence[int] = ()) -> None:
        self.tokenizer, self.skip = tokenizer, skip_special_tokens
        self.ids, before = tokenizer.context_tail(context)
        self.emitted = len(before)  # characters of decode(self.ids) already returned (the context's to begin)

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))  # generation pushes 0-d tensors
        text = self._decode()
        if text.endswith("\ufffd"):  # an incomplete character: wait for the next token
            return ""
        new, self.emitted = text[self.emitted:], len(text)
        if len(self.ids) > self._RESTART:
            # Restart from the last token that decodes to text: word-level decoding puts a space between
            # two text tokens, so the context must hold one (a skipped special would lose that space).
            specials = range(len(SPECIAL_TOKENS)) if self.skip else range(0)
            keep = next((k for k in range(len(self.ids) - 1, -1, -1) if self.ids[k] not in specials), -1)
            self.ids = self.ids[keep:] if keep >= 0 else []
            self.emitted = len(self._decode())
        return new

    def flush(self) -> str:
        """Return whatever is still held (an unfinished character decodes as U+FFFD) and reset."""
        new = self._decode()[self.emitted:]
        self.ids, self.emitted = [], 0
        return new


def _refuse_surrogates(texts: Sequence[object]) -> None:
    """ValueError for a text holding a lone surrogate (half of a UTF-16 pair: a JSON escape such as "\\ud800", or
    bytes that were not UTF-8 on the command line or stdin), which the tokenizer cannot read (it raises a
    TypeError); nothing for other texts."""
    for text in texts:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"the text is not valid Unicode: a lone surrogate at character {exc.start + 1} "
                                 f"({text[max(0, exc.start - 20):exc.start + 1]!r})") from None
