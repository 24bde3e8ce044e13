"""Tokenizers: exact round trips, fixed special ids, HF compatibility of tokenizer.json, errors."""

import random
import re
from collections import Counter

import pytest
import tokenizers
import torch

import lmlab.tokenizers.tokenizer as tokmod
from lmlab.tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer

MIXED = ("Жили-были дед да баба.   Hello, world!\n\n\tdef f(x):\n        return x ** 2  # ok\n"
         "Эмодзи: 👩‍💻🎉🇷🇺 — «кавычки» и ёлка. Trailing spaces   \n  leading\r\nCRLF\n")
_LINES = ["Съешь же ещё этих мягких французских булок, да выпей чаю.", "The quick brown fox jumps over the dog.",
          "def add(a, b):\n\treturn a + b", "    if x:\n        y = x  # indented", "Готово 👩‍💻🎉 ура!",
          "  two  leading spaces", "", "tabs\t\tand\ttabs", "Ёжик в тумане, 2024 год.", "emoji 🎉🎉 party",
          "html: <p>EOS, PAD, BOS</p> <EOS>"]
CORPUS = [MIXED * 3] + ["\n".join(random.Random(i).choices(_LINES, k=40)) + "\n\n" for i in range(8)]
SEED_SPLIT = r"\w+|[^\w\s]"  # the seed SimpleTokenizer's regex


def seed_decode(tok: Tokenizer, text: str) -> str:
    """What the word kind promises: the seed's split of the lower-cased text, out-of-vocab words as <UNK>."""
    return " ".join(w if tok.token_to_id(w) is not None else "<UNK>" for w in re.findall(SEED_SPLIT, text.lower()))


@pytest.fixture(scope="module", params=["bpe", "char", "word"])
def tok(request):
    return Tokenizer.train(CORPUS, kind=request.param, vocab_size=400)


def test_special_ids_are_fixed(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID] == [0, 1, 2, 3]
    assert [tok.id_to_token(i) for i in range(4)] == ["<PAD>", "<UNK>", "<BOS>", "<EOS>"]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
    assert len(tok) == tok.vocab_size == len(tok.hf.get_vocab()) <= 400
    body = tok.encode("да")
    assert tok.encode("да", add_bos=True, add_eos=True) == [BOS_ID, *body, EOS_ID]
    assert tok.encode("да", add_eos=True) == [*body, EOS_ID] and tok.encode("да", add_bos=True) == [BOS_ID, *body]
    assert tok.decode([BOS_ID, *body, EOS_ID, PAD_ID]) == "да"
    sep = " " if tok.kind == "word" else ""
    assert tok.decode([BOS_ID, *body, EOS_ID], skip_special_tokens=False) == sep.join(["<BOS>", "да", "<EOS>"])


def test_round_trip(tok):
    texts = [MIXED, " leading space", "\n\n\nnewlines\n", "\t\ttabs  and   spaces ", "👩‍💻🎉", ""]
    for text in texts:
        ids = tok.encode(text)
        if tok.kind == "word":  # documented lossy behaviour
            assert tok.decode(ids) == seed_decode(tok, text)
        else:
            assert tok.decode(ids) == text
            assert UNK_ID not in ids
    distinct = {"bpe": 400, "char": len(set("".join(CORPUS))),
                "word": len(set(re.findall(SEED_SPLIT, "".join(CORPUS).lower())))}[tok.kind]
    assert tok.vocab_size == min(400, 4 + distinct) if tok.kind != "bpe" else tok.vocab_size == 400


def test_word_matches_the_seed_split_and_frequency_order():
    # Python's \w splits Devanagari vowel signs and combining marks off, its lower() makes a final Σ a ς,
    # its \s includes \x1c: the HF pipeline must do all of that to find the words Python counted.
    text = "हिन्दी भाषा étude ΟΔΥΣΣΕΥΣ ΣΑΣ. a\x1cb snake_case x²+½ İstanbul <EOS> 日本語 ﬁne " * 2 + "the " * 9
    tok = Tokenizer.train([text], kind="word", vocab_size=1000)
    words = re.findall(SEED_SPLIT, text.lower())
    assert tok.encode(text) == [tok.token_to_id(w) for w in words] and UNK_ID not in tok.encode(text)
    assert tok.decode(tok.encode(text)) == " ".join(words)
    assert "ς" in tok.decode(tok.encode("ΣΑΣ"))  # the word-final sigma, as str.lower() gives
    small = Tokenizer.train([text], kind="word", vocab_size=6)
    top2 = [w for w, _ in Counter(words).most_common(2)]
    assert top2[0] == "the" and [small.id_to_token(i) for i in (4, 5)] == top2 and len(small) == 6
    assert small.encode("The unknown THE") == [4, UNK_ID, 4]


def test_char_vocab_is_frequency_ordered_capped_and_unk_for_unseen():
    tok = Tokenizer.train(["abcabab", "a"], kind="char", vocab_size=6)
    assert [tok.id_to_token(i) for i in (4, 5)] == ["a", "b"] and len(tok) == 6  # "c" fell below the cap
    assert tok.encode("abcz") == [4, 5, UNK_ID, UNK_ID]
    assert tok.decode(tok.encode("abcz")) == "ab<UNK><UNK>"  # what the model has, not nothing


def test_bpe_is_lossless_on_unseen_text():
    tok = Tokenizer.train(CORPUS, kind="bpe", vocab_size=300)
    unseen = "漢字 ∮ E⋅da = Q 🦜\u200b\x00 ⛄  \n\n\n\tend\ufffd"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert UNK_ID not in tok.encode(unseen)
    assert len(tok.encode("дед да баба")) < len("дед да баба".encode())  # merges are applied
    bytes_only = Tokenizer.train(CORPUS, kind="bpe", vocab_size=260)
    assert len(bytes_only) == 260 and len(bytes_only.encode(unseen)) == len(unseen.encode())


def test_literal_special_token_text_is_ordinary_text(tok):
    text = "x <EOS> <PAD>y"
    ids = tok.encode(text)
    assert not set(ids) & {PAD_ID, BOS_ID, EOS_ID}
    assert UNK_ID not in ids and tok.decode(ids) == (seed_decode(tok, text) if tok.kind == "word" else text)


def test_save_load_and_native_loading(tmp_path, tok):
    path = tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)  # a directory works too
    assert again.encode(MIXED) == tok.encode(MIXED) and again.kind == tok.kind and len(again) == len(tok)
    assert again.fingerprint() == tok.fingerprint() == Tokenizer.load(path).sha256()
    native = tokenizers.Tokenizer.from_file(str(path))
    ids = tok.encode(MIXED)
    assert native.encode(MIXED, add_special_tokens=False).ids == ids
    assert native.decode(ids) == tok.decode(ids)
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert fast(MIXED, add_special_tokens=False)["input_ids"] == ids
    strict = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), split_special_tokens=True)
    assert strict("a <EOS>", add_special_tokens=False)["input_ids"] == tok.encode("a <EOS>")


def test_save_is_atomic_and_accepts_a_directory(tmp_path):
    a = Tokenizer.train(CORPUS, kind="char", vocab_size=20)
    b = Tokenizer.train(CORPUS, kind="char", vocab_size=30)
    assert a.save(tmp_path) == tmp_path / "tokenizer.json"
    with pytest.raises(FileExistsError, match="tokenizer.json exists; replace it with --force"):
        b.save(tmp_path / "tokenizer.json")
    b.save(tmp_path / "tokenizer.json", overwrite=True)  # replaces the file in one rename
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    assert Tokenizer.load(tmp_path).fingerprint() == b.fingerprint() != a.fingerprint()
    assert re.fullmatch(r"[0-9a-f]{64}", b.fingerprint())


def test_batch_equals_one_by_one(tok):
    texts = ["дед", "", MIXED, "bake 🎉"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, add_bos=True, add_eos=True) == [tok.encode(t, add_bos=True, add_eos=True)
                                                                   for t in texts]
    batch = tok.encode_batch(texts)
    assert tok.decode_batch(batch) == [tok.decode(ids) for ids in batch]
    assert tok.decode(torch.tensor(batch[2])) == tok.decode(batch[2])  # generation hands over tensors


def test_stream_decoder_equals_decode(tok):
    ids = tok.encode(MIXED * 10)
    # a special at the restart point (the 65th id): word decoding must keep the space across it
    ids = ids[:64] + [EOS_ID] + ids[64:] + [BOS_ID] + ids[:5]
    for skip in (True, False):
        dec = tok.stream_decoder(skip_special_tokens=skip)
        pieces = [dec.push(i) for i in ids]
        assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special_tokens=skip)
        assert all("\ufffd" not in p for p in pieces)


def test_stream_decoder_holds_split_utf8_characters():
    tok = Tokenizer.train(CORPUS, kind="bpe", vocab_size=260)  # bytes only: every non-ASCII char is split
    text = "Привет, мир! 👩‍💻🎉 ёлка"
    ids = tok.encode(text)
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert pieces.count("") == len(text.encode()) - len(text)  # one wait per continuation byte
    assert all("\ufffd" not in p for p in pieces)
    assert dec.push(tok.encode("!")[0]) == "!" and dec.push(tok.encode("👩")[0]) == ""  # its first byte
    assert dec.flush() == "\ufffd"  # an unfinished character is only shown at the end, as decode shows it


@pytest.mark.parametrize("kind", ["bpe", "char", "word"])
def test_training_from_files_equals_from_texts(tmp_path, monkeypatch, kind):
    paths = []
    for i, text in enumerate(CORPUS):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_bytes(text.encode("utf-8"))  # bytes: keep the \r\n that write_text would also keep
    monkeypatch.setattr(tokmod, "_CHUNK_CHARS", 1)  # cut at every safe point
    assert len(list(tokmod._stream_file(paths[1]))) > 20
    a = Tokenizer.train(CORPUS, kind=kind, vocab_size=500)
    b = Tokenizer.train(files=paths, kind=kind, vocab_size=500)
    assert a.fingerprint() == b.fingerprint()
    if kind == "bpe":  # cutting at every line instead would change the counted pre-tokens, and the merges
        lines = [line for text in CORPUS for line in text.splitlines(keepends=True)]
        assert Tokenizer.train(lines, kind=kind, vocab_size=500).fingerprint() != a.fingerprint()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="'sentencepiece' is unknown; choose one of bpe, char, word"):
        Tokenizer.train(CORPUS, kind="sentencepiece")
    for kind, too_small in (("bpe", 259), ("char", 4), ("word", 4)):
        with pytest.raises(ValueError, match=rf"vocab_size \({too_small}\) must be >= {too_small + 1}"):
            Tokenizer.train(CORPUS, kind=kind, vocab_size=too_small)
    with pytest.raises(ValueError, match="256 byte tokens"):
        Tokenizer.train(CORPUS, kind="bpe", vocab_size=100)
    with pytest.raises(TypeError, match="wrap it in a list"):
        Tokenizer.train("one string", kind="char", vocab_size=10)
    with pytest.raises(ValueError, match="nothing to train on"):
        Tokenizer.train(kind="char", vocab_size=10)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)  # a directory without one
    for name, content in (("bad.json", b"{not json"), ("empty.json", b"{}"), ("bin.json", b"\xff\xfe\x00")):
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=f"{name} is not a valid tokenizer.json: ") as err:
            Tokenizer.load(tmp_path / name)
        assert "\n" not in str(err.value)


def test_foreign_tokenizers_are_refused():
    foreign = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<UNK>": 1}, unk_token="<UNK>"))
    with pytest.raises(ValueError, match="id 0 must be the special token <PAD> \\(found 'a'\\)"):
        Tokenizer.from_hf(foreign)
    plain = tokenizers.Tokenizer(tokenizers.models.WordLevel({t: i for i, t in enumerate(SPECIAL_TOKENS)}))
    with pytest.raises(ValueError, match="special token <PAD>"):  # present, but not marked special
        Tokenizer.from_hf(plain)
    plain.add_special_tokens(SPECIAL_TOKENS)
    wrapped = Tokenizer.from_hf(plain)
    assert wrapped.kind == "word" and plain.encode_special_tokens is False  # the caller's object is untouched
    unigram = tokenizers.Tokenizer(tokenizers.models.Unigram([(t, 0.0) for t in SPECIAL_TOKENS]))
    with pytest.raises(ValueError, match="unsupported tokenizer model Unigram"):
        Tokenizer.from_hf(unigram)


def test_a_lone_surrogate_is_a_one_line_error_not_a_type_error():
    """JSON's "\\ud800" and the command line's undecodable bytes reach Python as lone surrogates; the Rust tokenizer
    raised a TypeError on them (exit 1 from `lmlab generate --prompt`, a 500 from the API)."""
    tok = Tokenizer.train(["hello world " * 20], kind="bpe", vocab_size=300)
    for encode in (tok.encode, lambda t: tok.encode_batch(["fine", t])):
        with pytest.raises(ValueError, match=r"not valid Unicode: a lone surrogate at character 4 \('abc\\udcff'\)"):
            encode("abc\udcff")
    assert tok.encode("abc") == tok.encode_batch(["abc"])[0]
