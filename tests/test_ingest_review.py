"""What a review of how texts get in found, each fixed: damaged EPUBs and PDFs and odd `<![` markup raising
from inside zipfile, pypdf and HTMLParser; a foreign tokenizer.json's truncation, padding or BPE dropout taken
as it came; val_bytes of decoded <UNK>s and word-level spaces; prepare deleting a receipts.json it did not
write; a declared charset naming any Python codec; a malformed clusters.json; the declared charset missing from
the reported encoding; unbounded --bands/--rows and --seq-len; an empty corpus and non-UTF-8 files= in
Tokenizer.train."""

from __future__ import annotations

import json
import re
import struct
import zipfile
import zlib

import numpy as np
import pytest
from test_data import ENGLISH, PROSE, make_epub, make_pdf

from lmlab.cli import main
from lmlab.data import documents, html_to_text, prepare, prepare_texts, read_document
from lmlab.data.dedup import DedupConfig, load_clusters
from lmlab.data.documents import encoding_label
from lmlab.data.inspect import inspect
from lmlab.tokenizers import Tokenizer
from lmlab.tokenizers.tokenizer import _WORD_RE

# ---- damaged EPUBs and PDFs: one ValueError naming the file ---------------------------------------------------


def _headers(data: bytes, signature: bytes) -> list[int]:
    return [m.start() for m in re.finditer(re.escape(signature), data)]


def _epubs(tmp_path):
    """A good EPUB and five damaged copies, each what a fuzzer's one to three changed bytes made zipfile raise."""
    make_epub(tmp_path / "good.epub", [["Hello world chapter."] * 20])
    good = (tmp_path / "good.epub").read_bytes()
    local, central = _headers(good, b"PK\x03\x04"), _headers(good, b"PK\x01\x02")
    chapter = next(i for i, k in enumerate(central) if b"chap 0" in good[k + 46:k + 80])
    cases = {}
    k = local[chapter]
    start = k + 30 + sum(struct.unpack("<HH", good[k + 26:k + 30]))  # the chapter's deflate stream
    d = bytearray(good)  # zlib.error: the stream overwritten
    d[start:start + 12] = b"\xff" * 12
    cases["zlib.epub"] = (d, r"error: Error -3 while decompressing data: .+")
    d = bytearray(good)  # NotImplementedError: compression method 99 on the chapter
    d[local[chapter] + 8:local[chapter] + 10] = d[central[chapter] + 10:central[chapter] + 12] = b"\x63\x00"
    cases["method.epub"] = (d, r"NotImplementedError: That compression method is not supported")
    d = bytearray(good)  # NotImplementedError from ZipFile(): "version needed to extract" 16.4
    d[central[0] + 6:central[0] + 8] = struct.pack("<H", 164)
    cases["version.epub"] = (d, r"NotImplementedError: zip file version 16.4")
    with zipfile.ZipFile(tmp_path / "good.epub") as z, zipfile.ZipFile(tmp_path / "stored.epub", "w") as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))
    d = bytearray((tmp_path / "stored.epub").read_bytes())  # EOFError: the stored chapter runs past the file's end
    k = _headers(d, b"PK\x01\x02")[chapter]
    d[k + 20:k + 28] = struct.pack("<II", len(d) * 10, len(d) * 10)
    cases["eof.epub"] = (d, r"EOFError")
    d = bytearray(good)  # UnicodeDecodeError: a member name flagged as UTF-8 that is not
    d[central[0] + 9] |= 0x08
    d[central[0] + 46 + 2] = 0xB2
    cases["name.epub"] = (d, r"UnicodeDecodeError: 'utf-8' codec can't decode byte 0xb2 in position 2: .+")
    d = bytearray(good)  # OSError EINVAL: the central directory's offset moved, so members seek before byte 0
    eocd = good.rindex(b"PK\x05\x06")
    d[eocd + 16:eocd + 20] = struct.pack("<I", struct.unpack("<I", good[eocd + 16:eocd + 20])[0] + 100_000)
    cases["seek.epub"] = (d, r"OSError: \[Errno 22\] Invalid argument")
    return cases


def test_a_damaged_epub_is_one_value_error_naming_the_file(tmp_path, capsys):
    for name, (data, reason) in _epubs(tmp_path).items():
        path = tmp_path / name
        path.write_bytes(bytes(data))
        with pytest.raises(ValueError) as err:
            read_document(path)
        assert re.fullmatch(rf"{re.escape(str(path))}: not a readable EPUB \({reason}\)", str(err.value)), name
    # an encrypted member (zipfile asked for a password with a RuntimeError)
    data = bytearray((tmp_path / "good.epub").read_bytes())
    for k in _headers(data, b"PK\x03\x04"):
        data[k + 6] |= 1
    for k in _headers(data, b"PK\x01\x02"):
        data[k + 8] |= 1
    (tmp_path / "locked.epub").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'locked.epub'))}: META-INF/container.xml is "
                                         r"encrypted; only DRM-free books can be read$"):
        read_document(tmp_path / "locked.epub")
    # the commands say it in one line and exit 2
    for argv in (["data", "inspect", str(tmp_path / "zlib.epub")],
                 ["tokenizer", "train", str(tmp_path / "eof.epub"), "--out", str(tmp_path / "tok.json")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"lmlab: error: {argv[2]}: not a readable EPUB (") and err.count("\n") == 1
    assert read_document(tmp_path / "good.epub") == "\n\n".join(["Hello world chapter."] * 20) + "\n"


def test_a_malformed_pdf_is_one_value_error_naming_the_file(tmp_path):
    make_pdf(tmp_path / "good.pdf", ["Hello"])
    good = (tmp_path / "good.pdf").read_bytes()
    lines = good.split(b"\n")
    k = lines.index(b"xref") + 6  # the xref entry of object 4, the page's content stream
    lines[k] = lines[k][:11] + b"/Encoding << /Differences [1 /a 2] >> " + lines[k][11:]
    helvetica = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"
    cases = {"nested.pdf": (good.replace(helvetica, b"[" * 3000 + b"]" * 3000), "RecursionError"),
             "filter.pdf": (good.replace(b"<< /Length", b"<< /Filter /Foo /Length"),
                            "NotImplementedError: Unsupported filter /Foo"),
             "types.pdf": (b"\n".join(lines), 'TypeError: can only concatenate str (not "int") to str'),
             "trailer.pdf": (good.replace(b"trailer\n<<", b"trailer\n"),
                             "AttributeError: 'NameObject' object has no attribute 'items'")}
    for name, (data, reason) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as err:
            read_document(tmp_path / name)
        assert str(err.value).startswith(f"{tmp_path / name}: not a readable PDF ({reason}"), str(err.value)
    assert read_document(tmp_path / "good.pdf") == "Hello"


def test_marked_sections_the_stdlib_asserts_on_are_skipped_as_a_browser_skips_them(tmp_path):
    # HTML5 reads "<![" outside SVG/MathML as a bogus comment up to the next ">"; Python 3.11's parser asserted
    assert html_to_text("<p>Hello<![a]> world</p>") == "Hello world\n"
    assert html_to_text("<p>a<![ CDATA[x]]>b</p><![;]><p>c</p>") == "ab\n\nc\n"
    assert html_to_text("<p><![if !supportLists]>1.<![endif]>Item</p>") == "1.Item\n"  # Word's, as before
    (tmp_path / "word.html").write_bytes(b"<html><body><p>One</p><![ CDATA[x]]><p>Two</p></body></html>")
    assert read_document(tmp_path / "word.html") == "One\n\nTwo\n"
    make_epub(tmp_path / "book.epub", [["First<![a]> part.", "Second."]])
    assert read_document(tmp_path / "book.epub") == "First part.\n\nSecond.\n"


# ---- declared charsets and the encoding reported ---------------------------------------------------------------

def test_a_declared_charset_must_be_a_character_set(tmp_path):
    for codec in ("undefined", "unicode_escape", "raw_unicode_escape", "utf-7", "idna", "punycode", "utf-16"):
        page = f'<html><head><meta charset="{codec}"></head><body><p>café \\ud800 x</p></body></html>'
        path = tmp_path / f"{codec}.html"
        path.write_bytes(page.encode("latin-1"))
        with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: cannot decode the text \(byte 0xe9 at "):
            read_document(path)
    page = '<html><head><meta charset="iso-8859-1"></head><body><p>café \\ud800 x</p></body></html>'
    (tmp_path / "latin1.html").write_bytes(page.encode("latin-1"))
    assert read_document(tmp_path / "latin1.html") == "café \\ud800 x\n"  # a real charset is believed, as before


def test_a_lone_surrogate_from_any_reader_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(documents, "_pdf_text", lambda path: "ok \ud800 no")  # what a PDF's font map can give
    (tmp_path / "x.pdf").write_bytes(b"%PDF")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'x.pdf'))}: the text holds a lone surrogate "
                                         r"\(U\+D800\) at character 4, which is not Unicode text; refused$"):
        read_document(tmp_path / "x.pdf")


def test_the_encoding_reported_is_the_declared_one_read(tmp_path):
    latin = '<html><head><meta charset="iso-8859-1"></head><body><p>Café crème brûlée.</p></body></html>'
    fb2 = ('<?xml version="1.0" encoding="iso-8859-5"?><FictionBook><body><section><p>Война и мир.</p></section>'
           '</body></FictionBook>')
    (tmp_path / "latin.html").write_bytes(latin.encode("latin-1"))
    (tmp_path / "book.fb2").write_bytes(fb2.encode("iso-8859-5"))
    assert encoding_label((tmp_path / "latin.html").read_bytes(), ".html") == "iso8859-1"
    assert encoding_label((tmp_path / "book.fb2").read_bytes(), ".fb2") == "iso8859-5"
    assert encoding_label(PROSE.encode("cp1251"), ".txt") == "cp1251"  # as before
    report = inspect([tmp_path / "latin.html", tmp_path / "book.fb2"])
    assert [d["encoding"] for s in report["sources"] for d in s["per_document"]] == ["iso8859-1", "iso8859-5"]


# ---- a foreign tokenizer.json ----------------------------------------------------------------------------------

def test_truncation_and_padding_are_turned_off_and_dropout_refused(tmp_path, caplog):
    tok = Tokenizer.train([PROSE, ENGLISH * 10], kind="bpe", vocab_size=300)
    tok.save(tmp_path / "tok.json")
    spec = json.loads((tmp_path / "tok.json").read_text())
    variants = {"trunc.json": {**spec, "truncation": {"direction": "Right", "max_length": 16,
                                                       "strategy": "LongestFirst", "stride": 0}},
                "pad.json": {**spec, "padding": {"strategy": "BatchLongest", "direction": "Right",
                                                 "pad_to_multiple_of": None, "pad_id": 0, "pad_type_id": 0,
                                                 "pad_token": "<PAD>"}}}
    texts = [PROSE, ENGLISH * 3]
    want = [tok.encode(t) for t in texts]
    assert len(want[0]) > 16 and len(want[0]) != len(want[1])
    for name, variant in variants.items():
        (tmp_path / name).write_text(json.dumps(variant))
        with caplog.at_level("WARNING"):
            loaded = Tokenizer.load(tmp_path / name)
        assert loaded.encode_batch(texts) == want and loaded.encode(texts[0]) == want[0], name
        assert loaded.fingerprint() == tok.fingerprint()  # the same tokenizer as the file without them
        ds = prepare_texts(texts, loaded, tmp_path / f"ds-{name}")
        assert ds.num_tokens == sum(map(len, want)) + 4 and not (np.asarray(ds.tokens) == 0).any()
    assert [r.getMessage() for r in caplog.records] == [
        "turned off the tokenizer's truncation: lmlab encodes whole texts, unpadded",
        "turned off the tokenizer's padding: lmlab encodes whole texts, unpadded"]
    spec["model"]["dropout"] = 0.5
    (tmp_path / "dropout.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'dropout.json'))}: BPE dropout \(0.5\) makes "
                                         r"encoding random, other ids for the same text each time; set the model's "
                                         r'"dropout" to null$'):
        Tokenizer.load(tmp_path / "dropout.json")


# ---- Tokenizer.train: an empty corpus, files= ---------------------------------------------------------------

def test_training_on_nothing_is_refused(tmp_path):
    for kind in ("bpe", "char", "word"):
        for texts in ([], [""], [" \n\t"]):
            with pytest.raises(ValueError, match=r"^the corpus is empty: no text has anything but whitespace$"):
                Tokenizer.train(texts, kind=kind, vocab_size=300)
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="the corpus is empty"):
        Tokenizer.train(files=[tmp_path / "empty.txt"], kind="char", vocab_size=10)


def test_training_files_must_be_utf8_and_a_bom_is_no_token(tmp_path):
    for name, data in (("cp1251.txt", PROSE.encode("cp1251")), ("utf16.txt", PROSE.encode("utf-16")),
                       ("book.epub", zlib.compress(PROSE.encode()))):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / name))}: not UTF-8 text \(byte 0x"):
            Tokenizer.train(files=[tmp_path / name], kind="char", vocab_size=100)
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbf" + ENGLISH.encode())
    for kind in ("char", "bpe", "word"):
        tok = Tokenizer.train(files=[tmp_path / "bom.txt"], kind=kind, vocab_size=300)
        assert tok.fingerprint() == Tokenizer.train([ENGLISH], kind=kind, vocab_size=300).fingerprint(), kind
        assert not any("\ufeff" in t or "ï»¿" in t for t in tok.hf.get_vocab()), kind


# ---- val_bytes: the bytes of the text the val tokens stand for --------------------------------------------------

def test_val_bytes_count_the_text_under_unk_and_without_word_spaces(tmp_path):
    texts = [PROSE + ENGLISH * 8, ENGLISH * 12 + PROSE[:400], "Short one."]

    def n_val(n):  # prepare_texts' rule at val_fraction 0.1
        return min(-(-n // 10), n - 1) if n >= 32 else 0

    # char: one token a character, so the val part is the last n_val characters whatever they encode to
    char = Tokenizer.train([ENGLISH], kind="char", vocab_size=40)  # Russian letters are all <UNK>
    ds = prepare_texts(texts, char, tmp_path / "char", val_fraction=0.1)
    want = sum(len(t[len(t) - n_val(len(t)):].encode()) for t in texts)
    assert ds.header["val_bytes"] == want and ds.header["train_bytes"] == sum(len(t.encode()) for t in texts) - want
    assert 1 in ds.tokens[ds.documents[1].val[0]:ds.documents[1].val[1]]  # Russian: <UNK>s
    assert ds.bytes_per_token("val") == want / ds.val_tokens
    # word: a token a \w+ run or punctuation mark (lower-casing keeps these texts' lengths), <UNK> for the rare
    word = Tokenizer.train(texts, kind="word", vocab_size=60)
    ds = prepare_texts(texts, word, tmp_path / "word", val_fraction=0.1)
    spans = [[m.span() for m in _WORD_RE.finditer(t)] for t in texts]
    assert [len(s) for s in spans] == [len(word.encode(t)) for t in texts]
    assert ds.header["val_bytes"] == sum(len(t[s[len(s) - n_val(len(s))][0]:].encode()) if n_val(len(s)) else 0
                                         for t, s in zip(texts, spans))
    # the shipped BPE is lossless: the same as decoding, as before
    bpe = Tokenizer.train(texts, kind="bpe", vocab_size=300)
    ds = prepare_texts([ENGLISH * 20], bpe, tmp_path / "bpe", val_fraction=0.1)
    val = ds.tokens[ds.documents[0].val[0]:ds.documents[0].val[1]].tolist()
    assert ds.header["val_bytes"] == len(bpe.decode(val).encode())


def test_the_bpb_of_a_val_part_of_unks_is_finite(tmp_path):
    from lmlab.eval.scorer import bits_per_byte
    char = Tokenizer.train(["abc"], kind="char", vocab_size=10)
    ds = prepare_texts(["абвгдежзий" * 12], char, tmp_path / "ds", val_fraction=0.1)  # 120 <UNK>s, 12 held out
    assert ds.header["val_bytes"] == 24 and ds.val_tokens == 13  # 12 Cyrillic letters (was 0 bytes: bpb NaN)
    assert bits_per_byte(2.0, ds.bytes_per_token()) == pytest.approx(2.0 / np.log(2) / (24 / 13))  # the Trainer's


# ---- receipts.json --------------------------------------------------------------------------------------------

def test_prepare_leaves_a_receipts_json_it_did_not_write(tmp_path, capsys):
    (tmp_path / "book.txt").write_text(ENGLISH * 50)
    assert main(["data", "filter", str(tmp_path / "book.txt"), "--filters", "c4:min_sentences=1",
                 "--out", str(tmp_path / "filt")]) == 0
    receipts = (tmp_path / "filt" / "receipts.json").read_bytes()
    tok = Tokenizer.train([ENGLISH], kind="char", vocab_size=40)
    tok.save(tmp_path / "tok.json")
    capsys.readouterr()
    for extra in ([], ["--filters", "gopher"], ["--force"]):
        assert main(["data", "prepare", str(tmp_path / "filt"), "--tokenizer", str(tmp_path / "tok.json"),
                     "--out", str(tmp_path / "filt"), *extra]) == 2
        assert capsys.readouterr().err == (f"lmlab: error: {tmp_path / 'filt' / 'receipts.json'} is not the receipts "
                                           "of a dataset there (lmlab data filter's?); prepare into another folder\n")
        assert (tmp_path / "filt" / "receipts.json").read_bytes() == receipts
        assert not (tmp_path / "filt" / "tokens.json").exists()
    # a dataset's own receipts go with it when it is replaced
    prepare([tmp_path / "book.txt"], tok, tmp_path / "ds", filters=_c4())
    assert (tmp_path / "ds" / "receipts.json").exists()
    prepare([tmp_path / "book.txt"], tok, tmp_path / "ds", overwrite=True)
    assert not (tmp_path / "ds" / "receipts.json").exists()


def _c4():
    from lmlab.data.filters import parse_filters
    return parse_filters("c4:min_sentences=1")


# ---- clusters.json, bounds --------------------------------------------------------------------------------------

@pytest.mark.parametrize("content, why", [
    ("{", "JSONDecodeError: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ("[]", "a JSON list, not an object"),
    ('{"config": {"ngram": 5}, "sources": [], "clusters": {}}', 'no "clusters" array'),
    ('{"config": {"ngram": 5}, "sources": [{"path": "a"}], "clusters": [{"id": 0, "kind": "exact", "members": '
     '[{"unit": 0}]}]}', "a member of cluster 0 without its unit, doc, source, start, end, sha1, kept, preview or "
                         "its source"),
])
def test_a_malformed_clusters_json_is_one_line(tmp_path, capsys, content, why):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "clusters.json").write_text(content)
    message = f"{tmp_path / 'd' / 'clusters.json'} is not a dedup clusters file ({why})"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        load_clusters(tmp_path / "d")
    for argv in (["data", "clusters", str(tmp_path / "d")], ["data", "clusters", str(tmp_path / "d"), "--show", "0"]):
        assert main(argv) == 2
        assert capsys.readouterr().err == f"lmlab: error: {message}\n"


def test_bands_rows_and_seq_len_are_bounded(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"^bands x rows \(100000 x 100000\) must be at most 1,024 permutations$"):
        DedupConfig(bands=100_000, rows=100_000)
    assert DedupConfig(bands=128, rows=8).num_perm == 1024
    (tmp_path / "a.txt").write_text(ENGLISH * 40)
    assert main(["data", "dedup", str(tmp_path / "a.txt"), "--out", str(tmp_path / "dd"), "--bands", "100000",
                 "--rows", "100000"]) == 2
    assert capsys.readouterr().err == ("lmlab: error: bands x rows (100000 x 100000) must be at most 1,024 "
                                       "permutations\n")
    tok = Tokenizer.train([ENGLISH], kind="char", vocab_size=40)
    tok.save(tmp_path / "tok.json")
    for bad in ("-5", "0"):
        assert main(["data", "prepare", str(tmp_path / "a.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                     "--out", str(tmp_path / "ds"), "--seq-len", bad]) == 2
        assert capsys.readouterr().err == f"lmlab: error: seq_len ({bad}) must be an integer >= 1\n"
    assert not (tmp_path / "ds").exists() and not (tmp_path / "dd").exists()
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=r"^seq_len \(.*\) must be an integer >= 1$"):
            prepare_texts([ENGLISH * 40], tok, tmp_path / "ds2", seq_len=bad)
