"""Tokenizers: exact round trips, fixed special ids, HF compatibility of tokenizer.json, errors."""

import json
import re

import pytest

from lmlab.tokenizers import BOS_ID, EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, Tokenizer

MIXED = ("Жили-были дед да баба.   Hello, world!\n\n\tdef f(x):\n        return x ** 2  # ok\n"
         "Эмодзи: 👩‍💻🎉🇷🇺 — «кавычки» и ёлка. Trailing spaces   \n  leading\r\nCRLF\n")
CORPUS = [MIXED * 3, "Съешь же ещё этих мягких французских булок, да выпей чаю. " * 20,
          "The quick brown fox jumps over the lazy dog. 0123456789 " * 20]


@pytest.fixture(scope="module", params=["bpe", "char", "word"])
def tok(request):
    return Tokenizer.train(CORPUS, kind=request.param, vocab_size=400)


def test_special_ids_are_fixed(tok):
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, UNK_ID, BOS_ID, EOS_ID] == [0, 1, 2, 3]
    assert tok.encode("да", add_bos=True, add_eos=True)[0] == BOS_ID
    assert tok.encode("да", add_bos=True, add_eos=True)[-1] == EOS_ID
    assert tok.decode([BOS_ID, *tok.encode("да"), EOS_ID]) == "да"
    assert "<EOS>" in tok.decode([*tok.encode("да"), EOS_ID], skip_special_tokens=False)


def test_round_trip(tok):
    ids = tok.encode(MIXED)
    if tok.kind == "word":  # documented lossy behaviour of seed 000's SimpleTokenizer
        assert tok.decode(ids) == " ".join(re.findall(r"\w+|[^\w\s]", MIXED.lower()))
    else:
        assert tok.decode(ids) == MIXED
        assert UNK_ID not in ids


def test_bpe_is_lossless_on_unseen_text():
    tok = Tokenizer.train(CORPUS, kind="bpe", vocab_size=300)
    unseen = "漢字 ∮ E⋅da = Q 🦜\u200b\x00 ⛄  \n\n\n\tend"
    assert tok.decode(tok.encode(unseen)) == unseen
    assert UNK_ID not in tok.encode(unseen)
    assert len(tok.encode("дед да баба")) < len("дед да баба".encode())  # merges are applied


def test_char_unknown_character_is_unk():
    tok = Tokenizer.train(["abc"], kind="char", vocab_size=10)
    assert tok.encode("abz") == [tok.token_to_id("a"), tok.token_to_id("b"), UNK_ID]


def test_save_load_and_native_loading(tmp_path, tok):
    tok.save(tmp_path / "tokenizer.json")
    again = Tokenizer.load(tmp_path)  # a directory works too
    assert again.encode(MIXED) == tok.encode(MIXED) and again.kind == tok.kind
    assert again.fingerprint() == tok.fingerprint()
    import tokenizers
    native = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert native.encode(MIXED, add_special_tokens=False).ids == tok.encode(MIXED)
    transformers = pytest.importorskip("transformers")
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert fast(MIXED, add_special_tokens=False)["input_ids"] == tok.encode(MIXED)


def test_batch_equals_one_by_one(tok):
    texts = ["дед", "", MIXED, "bake 🎉"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.decode_batch(tok.encode_batch(texts)) == [tok.decode(tok.encode(t)) for t in texts]


def test_stream_decoder_equals_decode(tok):
    ids = tok.encode(MIXED * 10)  # long enough to pass the decoder's restart point
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_training_from_files_equals_from_texts(tmp_path):
    paths = []
    for i, text in enumerate(CORPUS):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    a = Tokenizer.train(CORPUS, kind="bpe", vocab_size=350)
    b = Tokenizer.train(files=paths, kind="bpe", vocab_size=350)
    assert a.fingerprint() == b.fingerprint()


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        Tokenizer.train(CORPUS, kind="sentencepiece")
    with pytest.raises(ValueError, match="vocab_size"):
        Tokenizer.train(CORPUS, kind="bpe", vocab_size=100)
    with pytest.raises(FileNotFoundError):
        Tokenizer.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer"):
        Tokenizer.load(tmp_path / "bad.json")
    import tokenizers
    foreign = tokenizers.Tokenizer(tokenizers.models.WordLevel({"a": 0, "<UNK>": 1}, unk_token="<UNK>"))
    (tmp_path / "foreign.json").write_text(foreign.to_str())
    with pytest.raises(ValueError, match="<PAD>"):
        Tokenizer.load(tmp_path / "foreign.json")
    assert json.loads((tmp_path / "foreign.json").read_text())  # untouched
