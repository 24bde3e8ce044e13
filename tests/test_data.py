"""Reading books in their encodings and formats; token files; windows that never touch validation data."""

import json
import logging
import math
import random
import re
import zipfile
import zlib
from collections import Counter

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import (
    TokenDataset,
    decode_bytes,
    documents,
    find_documents,
    html_to_text,
    normalize_text,
    prepare,
    prepare_texts,
    read_document,
)
from lmlab.models import ModelConfig
from lmlab.tokenizers import EOS_ID, Tokenizer

PROSE = """Глава первая. Дорога к морю

Поезд пришёл на станцию рано утром, когда над рекой ещё стоял туман. Анна Сергеевна вышла на платформу, \
поставила чемодан на мокрые доски и огляделась: никто её не встречал. Носильщик в старой шинели курил у \
фонаря и смотрел на неё равнодушно, будто видел таких приезжих каждый день.

— Скажите, далеко ли до Никольского? — спросила она.

— Вёрст двенадцать будет, — ответил он, подумав. — Если по большой дороге, то и все пятнадцать. Да кто ж вас \
повезёт в такую погоду?

Она улыбнулась и ничего не ответила. В кармане у неё лежало письмо от брата, написанное торопливым, почти \
детским почерком: «Приезжай непременно, без тебя здесь пусто, сад зарос, а яблоки в этом году уродились \
такие, каких мы с тобой не видывали». Письмо шло три недели, и за это время, думала она, могло случиться \
что угодно.

Через час нашёлся извозчик — молчаливый старик с рыжей бородой и лошадью, которая, казалось, спала на ходу. \
Дорога шла сначала лесом, потом полем, и Анна Сергеевна, укутавшись в платок, следила, как медленно \
светлеет небо над дальними холмами.
"""
PARAGRAPHS = PROSE.strip().split("\n\n")
KOI8_PROSE = PROSE.replace("—", "-").replace("«", '"').replace("»", '"')  # KOI8-R has no — « »
ENGLISH = "The quick brown fox jumps over the lazy dog, and the dog does not mind at all. "


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([PROSE * 3, ENGLISH * 30], kind="bpe", vocab_size=400)


class PositionTokenizer:
    """One id per character (ord - base + 4). Texts of distinct CJK characters then hold every id once, so a
    window's tokens tell exactly where in tokens.bin it was cut."""

    eos_id = EOS_ID

    def __init__(self, vocab_size: int = 30_000, base: int = 0x4E00) -> None:
        self.vocab_size, self.base = vocab_size, base

    def __len__(self) -> int:
        return self.vocab_size

    def encode_batch(self, texts):
        return [[ord(c) - self.base + 4 for c in t] for t in texts]

    def decode(self, ids):
        return "".join(chr(i + self.base - 4) for i in ids if i >= 4)

    def fingerprint(self) -> str:
        return f"position-{self.vocab_size}-{self.base}"


def distinct(lo: int, hi: int, base: int = 0x4E00) -> str:
    return "".join(chr(base + i) for i in range(lo, hi))


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


# ---- reading documents --------------------------------------------------------------------------------

def test_every_encoding_reads_as_the_utf8_original(tmp_path):
    original = read_document(_write(tmp_path / "utf8.txt", PROSE.encode("utf-8")))
    assert original == PROSE
    for name, data in [("bom.txt", b"\xef\xbb\xbf" + PROSE.encode("utf-8")),
                       ("utf16le.txt", PROSE.encode("utf-16")),  # BOM + little-endian
                       ("utf16be.txt", b"\xfe\xff" + PROSE.encode("utf-16-be")),
                       ("cp1251.txt", PROSE.encode("cp1251")),
                       ("crlf.txt", PROSE.replace("\n", "\r\n").encode("cp1251"))]:
        assert read_document(_write(tmp_path / name, data)) == original, name
    assert read_document(_write(tmp_path / "koi8.txt", KOI8_PROSE.encode("koi8_r"))) == KOI8_PROSE


def test_cp1251_and_koi8_are_told_apart_sentence_by_sentence():
    # Each code page decodes any bytes; only the letter statistics can pick. Check every single sentence
    # and the ALL-CAPS text (where "lower case means right" would fail), both ways round.
    sentences = [s for s in re.split(r"(?<=[.!?:])\s+", KOI8_PROSE) if s.strip()]
    for right, wrong in [("cp1251", "koi8_r"), ("koi8_r", "cp1251")]:
        for text in sentences + [KOI8_PROSE.upper(), "ГЛАВА ПЕРВАЯ", "Москва"]:
            data = text.encode(right)
            assert data.decode(wrong) != text  # the wrong guess really differs
            assert decode_bytes(data) == text, (right, text[:30])


def test_undecodable_bytes_raise_naming_the_file(tmp_path):
    cases = {"latin1.txt": "Café au lait, naïve résumé, déjà vu.".encode("latin-1"),
             "broken-utf8.txt": PROSE[:300].encode() + b"\xd0 " + PROSE[300:].encode(),
             "binary.txt": bytes(range(256)) * 40}
    for name, data in cases.items():
        with pytest.raises(ValueError, match=re.escape(name)):
            read_document(_write(tmp_path / name, data))
    with pytest.raises(ValueError, match=f"offset {len(PROSE[:300].encode())} "):  # says where the UTF-8 breaks
        read_document(tmp_path / "broken-utf8.txt")
    # A page's declared charset is believed (so Latin-1 French reads)... unless it turns Russian into mojibake.
    assert decode_bytes("<p>Café, déjà vu</p>".encode("latin-1"), declared="iso-8859-1") == "<p>Café, déjà vu</p>"
    assert decode_bytes(PARAGRAPHS[1].encode("cp1251"), declared="iso-8859-1") == PARAGRAPHS[1]
    # Windows punctuation in Latin text decodes the same in cp1251 and cp1252: accepted.
    assert decode_bytes("He said “yes” — twice…".encode("cp1252")) == "He said “yes” — twice…"


def test_normalize_text_changes_only_what_it_must():
    raw = "\ufeffA  b\r\nB\rC\x00\x07\tD\u0085\n\n\n\n\n  \nE\u0301, «Ё»!"
    assert normalize_text(raw) == "A  b\nB\nC\tD\n\n\nÉ, «Ё»!"
    assert normalize_text("a\n\n\nb") == "a\n\n\nb"  # two blank lines stay


def test_html_blocks_lines_entities_and_scripts():
    markup = ("<html><head><title>T</title><style>p {color: red}</style></head><body><h1>Глава</h1>"
              "<p>a<br/>b</p><p>AT&amp;T &amp;lt;x&amp;gt; &laquo;q&raquo;</p><script>var x = 1;</script>"
              "<ul><li>x</li><li>y</li></ul><div><p>end <em>of</em>   it</p></div></body></html>")
    assert html_to_text(markup) == "Глава\n\na\nb\n\nAT&T &lt;x&gt; «q»\n\nx\ny\n\nend of it\n"


def make_epub(path, chapters, repeat=1):
    """A minimal EPUB 3 whose file order is the reverse of its spine order, with ../ and %20 in hrefs; each
    chapter's paragraphs `repeat` times (streamed: repeat=2**18 of a 1 KiB paragraph is a 256 MiB chapter packed
    into 256 KiB, a decompression bomb)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container version="1.0" '
                   'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles><rootfile '
                   'full-path="OEBPS/pkg/content.opf" media-type="application/oebps-package+xml"/></rootfiles>'
                   '</container>')
        n = len(chapters)
        items = "".join(f'<item id="c{i}" href="../text/chap%20{i}.xhtml" media-type="application/xhtml+xml"/>'
                        for i in range(n)) + '<item id="img" href="../cover.png" media-type="image/png"/>'
        spine = '<itemref idref="img"/>' + "".join(f'<itemref idref="c{n - 1 - k}"/>' for k in range(n))
        z.writestr("OEBPS/pkg/content.opf", f'<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" '
                   f'version="3.0"><manifest>{items}</manifest><spine>{spine}</spine></package>')
        z.writestr("OEBPS/cover.png", b"\x89PNG not text")
        for k, chapter in enumerate(chapters):  # file chap {n-1-k} holds chapter k: only the spine knows
            body = "".join(f"<p>{p}</p>" for p in chapter).encode()
            with z.open(f"OEBPS/text/chap {n - 1 - k}.xhtml", "w", force_zip64=True) as f:
                f.write(b'<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml">'
                        b"<head><title>x</title><style>p {}</style></head><body>")
                for i in range(0, repeat, 1024):
                    f.write(body * min(1024, repeat - i))
                f.write(b"</body></html>")


def make_fb2(path, paragraphs):
    body = "".join(f"<p>{p}</p>" for p in paragraphs)
    fb2 = ('<?xml version="1.0" encoding="windows-1251"?><FictionBook xmlns="http://www.gribuser.ru/xml/'
           'fictionbook/2.0"><description><title-info><book-title>Метаданные</book-title></title-info>'
           f'</description><body><section>{body}</section></body><binary id="c.jpg">QUJDRA==</binary>'
           '</FictionBook>')
    path.write_bytes(fb2.encode("cp1251"))


def make_pdf(path, pages, flate=False):
    """A two-object-per-page PDF 1.4 with Helvetica text, xref offsets computed. A page given as bytes is its
    content stream as it is; `flate` packs the streams (FlateDecode)."""
    objs = ["<< /Type /Catalog /Pages 2 0 R >>", "", "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    kids = []
    for text in pages:
        stream = text if isinstance(text, bytes) else f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode("latin-1")
        stream = zlib.compress(stream, 9) if flate else stream
        packed = " /Filter /FlateDecode" if flate else ""
        objs.append(f"<< /Length {len(stream)}{packed} >>\nstream\n{stream.decode('latin-1')}\nendstream")
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                    f"/Contents {len(objs)} 0 R >>")
        kids.append(f"{len(objs)} 0 R")
    objs[1] = f"<< /Type /Pages /Kids [{' '.join(kids)}] /Count {len(kids)} >>"
    out, offsets = b"%PDF-1.4\n", []
    for i, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{i} 0 obj\n{body}\nendobj\n".encode("latin-1")
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    path.write_bytes(out + f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode())


def test_epub_html_fb2_and_pdf_give_the_paragraphs(tmp_path):
    make_epub(tmp_path / "book.epub", [PARAGRAPHS[:3], PARAGRAPHS[3:]])
    make_fb2(tmp_path / "book.fb2", PARAGRAPHS)
    html = ('<html><head><meta charset="windows-1251"><script>var x = "Глава";</script></head><body>'
            + "".join(f"<p>{p}</p>" for p in PARAGRAPHS) + "</body></html>")
    _write(tmp_path / "book.html", html.encode("cp1251"))
    for name in ["book.epub", "book.fb2", "book.html"]:
        text = read_document(tmp_path / name)
        assert [p.strip() for p in text.split("\n\n") if p.strip()] == PARAGRAPHS, name
    make_pdf(tmp_path / "book.pdf", ["First page of the book.", "Second page (here)."])
    assert read_document(tmp_path / "book.pdf") == "First page of the book.\nSecond page (here)."
    _write(tmp_path / "bad.epub", b"PK not a zip")
    with pytest.raises(ValueError, match="bad.epub"):
        read_document(tmp_path / "bad.epub")


def test_a_broken_pdf_is_one_line_and_pypdf_says_nothing_beside_it(tmp_path, caplog):
    """pypdf's own warning ("EOF marker not found") was logged, and printed to stderr beside the one-line error
    (Python's last-resort handler, where no logging is set up: the CLI)."""
    _write(tmp_path / "fake.pdf", b"%PDF-1.4\nhello, not a PDF\n")
    with caplog.at_level(logging.WARNING), pytest.raises(
            ValueError, match=r"^.*fake.pdf: not a readable PDF \(PdfStreamError: .*\)$"):
        read_document(tmp_path / "fake.pdf")
    assert [r.getMessage() for r in caplog.records] == []


def war_and_peace_sized(seed=0, size=6_000_000, letters="абвгдежзийклмнопрстуфхцчшщыьэюя"):
    """Paragraphs of random Russian-looking words, ~6 MB of UTF-8 like War and Peace: text that packs about as
    well as prose does (repeating a short text would pack hundreds of times better than any book)."""
    rng = random.Random(seed)
    vocab = ["".join(rng.choices(letters, k=rng.randint(1, 10))) for _ in range(20000)]
    paragraphs, n = [], 0
    while n < size:
        paragraphs.append(" ".join(rng.choices(vocab, k=rng.randint(20, 120))).capitalize() + ".")
        n += len(paragraphs[-1].encode()) + 7
    return paragraphs


def test_epub_and_pdf_bombs_are_refused_and_real_books_pass(tmp_path, monkeypatch, capsys):
    make_epub(tmp_path / "bomb.epub", [["a" * 1017]], repeat=2**18)  # a 258 MiB chapter in ~0.7 MB
    packed = zipfile.ZipFile(tmp_path / "bomb.epub").getinfo("OEBPS/text/chap 0.xhtml").compress_size
    with pytest.raises(documents.TooLarge) as err:
        read_document(tmp_path / "bomb.epub")
    assert str(err.value) == (f"{tmp_path / 'bomb.epub'}: OEBPS/text/chap 0.xhtml unpacks to more than 100 times "
                              f"its packed size ({packed} bytes); refused as a decompression bomb")
    make_pdf(tmp_path / "bomb.pdf", [b" " * (64 * 2**20)], flate=True)  # a 64 MiB page in 64 KB
    with pytest.raises(documents.TooLarge, match=re.escape(
            "bomb.pdf: the PDF goes past one of pypdf's reading limits; refused (a stream may unpack to at most 32 "
            "MiB; pypdf: Limit reached while decompressing.")):
        read_document(tmp_path / "bomb.pdf")
    # `lmlab train` reads through the same limits
    assert main(["train", str(tmp_path / "bomb.epub"), "--out", str(tmp_path / "run"), "--preset", "gpt-tiny"]) == 2
    assert capsys.readouterr().err == f"lmlab: error: {err.value}\n"

    # War and Peace in one chapter passes every limit; so does a PDF of 500 pages (Latin: the test PDF's font).
    book = war_and_peace_sized()
    make_epub(tmp_path / "war.epub", [book])
    assert read_document(tmp_path / "war.epub") == "".join(p + "\n\n" for p in book)[:-1]
    pages = war_and_peace_sized(1, 500_000, "abcdefghijklmnopqrstuvwxyz")[:500]
    make_pdf(tmp_path / "war.pdf", pages, flate=True)
    assert read_document(tmp_path / "war.pdf") == "\n".join(pages)

    # The budget for a whole EPUB and the cap on the text of any EPUB or PDF
    monkeypatch.setattr(documents, "EPUB_MAX_INFLATED", 2**16)
    with pytest.raises(documents.TooLarge, match=r"war.epub: the EPUB unpacks to more than 0.0625 MiB; refused"):
        read_document(tmp_path / "war.epub")
    monkeypatch.setattr(documents, "MAX_TEXT_CHARS", 40)
    make_pdf(tmp_path / "two.pdf", ["First page of the book.", "Second page (here)."])  # 23 + 19 characters
    with pytest.raises(documents.TooLarge, match=r"two.pdf: the text is longer than 40 characters; refused"):
        read_document(tmp_path / "two.pdf")
    make_epub(tmp_path / "short.epub", [["x" * 41]])
    with pytest.raises(documents.TooLarge, match=r"short.epub: the text is longer than 40 characters; refused"):
        read_document(tmp_path / "short.epub")


def test_find_documents_folders_globs_and_missing(tmp_path):
    for name in ["b/z.md", "b/a.txt", "b/deep/c.epub", "b/skip.jpg", "b/.hidden/x.txt", "b/._a.txt", "top.txt"]:
        _write(tmp_path / name, b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in find_documents([tmp_path / "b"])] == \
        ["b/a.txt", "b/deep/c.epub", "b/z.md"]
    got = find_documents([str(tmp_path / "*"), tmp_path / "top.txt", tmp_path / "b" / "skip.jpg"])
    assert [p.relative_to(tmp_path).as_posix() for p in got] == \
        ["b/a.txt", "b/deep/c.epub", "b/z.md", "top.txt", "b/skip.jpg"]  # no duplicates; named files always
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        find_documents([tmp_path / "top.txt", tmp_path / "nope.txt"])
    with pytest.raises(FileNotFoundError, match=r"\*\.pdf"):
        find_documents([str(tmp_path / "*.pdf")])


# ---- token files --------------------------------------------------------------------------------------

def test_layout_keeps_each_documents_tail_out_of_training(tmp_path, tok):
    texts = [PROSE * 2, ENGLISH * 20, "Да."]
    ds = prepare_texts(texts, tok, tmp_path / "ds", val_fraction=0.1, names=["ru", "en", "short"])
    n_train, flat = ds.train_tokens, ds.tokens
    assert ds.header["dtype"] == "uint16" and (tmp_path / "ds" / "tokens.bin").stat().st_size == 2 * ds.num_tokens
    for d, text in zip(ds.documents, texts):
        ids = tok.encode(text)
        n_val = math.ceil(0.1 * len(ids)) if len(ids) >= 32 else 0
        assert (d.train_tokens, d.val_tokens) == (len(ids) - n_val, n_val), d.name
        assert flat[d.train[0]:d.train[1]].tolist() + flat[d.val[0]:d.val[1]].tolist() == ids  # the tail
        assert d.train[1] < n_train <= d.val[0] and flat[d.train[1]] == EOS_ID
        assert d.val_tokens == 0 or flat[d.val[1]] == EOS_ID
    assert ds.train_tokens == sum(d.train_tokens + 1 for d in ds.documents)
    assert ds.val_tokens == sum(d.val_tokens + 1 for d in ds.documents if d.val_tokens)
    st = ds.stats(ModelConfig.preset("gpt2-tiny", vocab_size=len(tok)))
    assert st["documents_without_val"] == 1 and st["characters"] == sum(map(len, texts))
    assert st["tokens_per_parameter"] == pytest.approx(ds.train_tokens / st["parameters"])
    assert st["chinchilla_tokens"] == 20 * st["parameters"]
    val_text = "".join(tok.decode(flat[d.val[0]:d.val[1]].tolist()) for d in ds.documents)
    assert ds.bytes_per_token("val") == len(val_text.encode()) / ds.val_tokens
    assert ds.header["train_bytes"] + ds.header["val_bytes"] == sum(len(t.encode()) for t in texts)


def test_unigram_entropy_matches_a_direct_count(tmp_path, tok):
    ds = prepare_texts([PROSE * 2, ENGLISH * 20], tok, tmp_path / "ds", val_fraction=0.2)
    for split, region in [("train", ds.tokens[: ds.train_tokens]), ("val", ds.tokens[ds.train_tokens:])]:
        counts = Counter(region.tolist())
        n = sum(counts.values())
        expected = -sum(c / n * math.log(c / n) for c in counts.values())
        assert ds.unigram_entropy(split) == pytest.approx(expected, rel=1e-12)
        assert 1.0 < expected < math.log(len(tok))


def position_dataset(tmp_path, lengths=(3000, 1000, 100), weights=None, **kw):
    bounds = np.cumsum((0, *lengths))
    texts = [distinct(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    return prepare_texts(texts, PositionTokenizer(), tmp_path / "ds", names=["a", "b", "c"][: len(texts)],
                         weights=weights, **kw)


def window_starts(ds, x):
    """Where each row of x starts in tokens.bin (every non-EOS id occurs once)."""
    where = {int(t): i for i, t in enumerate(ds.tokens) if t != EOS_ID}
    first = x[:, 0].tolist()
    return np.array([where[f] if f != EOS_ID else where[int(row[1])] - 1 for f, row in zip(first, x)])


def test_no_training_window_touches_a_validation_token(tmp_path):
    bounds = np.cumsum((0, 600, 300, 40, 200))
    texts = [distinct(a, b) for a, b in zip(bounds[:-1], bounds[1:])]
    ds = prepare_texts(texts, PositionTokenizer(), tmp_path / "ds", val_fraction=0.2)
    val_ids = set(ds.tokens[ds.train_tokens:].tolist()) - {EOS_ID}
    assert len(val_ids) == 120 + 60 + 8 + 40  # every document holds out its tail
    g, T, ends = torch.Generator().manual_seed(0), 64, []
    for _ in range(200):
        x, y = ds.sample_batch(16, T, g)
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (16, T)
        assert torch.equal(x[:, 1:], y[:, :-1])
        assert not val_ids & set(y.flatten().tolist())
        starts = window_starts(ds, x)
        assert torch.equal(y[:, -1], torch.from_numpy(ds.tokens[starts + T].astype(np.int64)))
        ends += (starts + T).tolist()
    assert max(ends) == ds.train_tokens - 1  # windows reach the last train token, never beyond
    # windows run on across EOS into the next document's training part
    assert any((x == EOS_ID).any() for x, _ in [ds.sample_batch(64, T, g)])


def test_weights_mix_documents_in_proportion(tmp_path):
    T, n = 8, 20_000
    # start positions: a 3000 tokens + EOS, b 1000 + EOS, c 100 + EOS less the last T of the train region
    cases = [(None, 3001 / (3001 + 1001 + 101 - T)), ({"a": 1.0, "b": 3.0, "c": 0.0}, 3001 / (3001 + 3 * 1001))]
    for i, (weights, p_a) in enumerate(cases):
        ds = position_dataset(tmp_path / str(i), weights=weights, val_fraction=0.0)  # a dataset is not replaced
        x, _ = ds.sample_batch(n, T, torch.Generator().manual_seed(1))
        starts = window_starts(ds, x)
        in_a = (starts <= ds.documents[0].train[1]).mean()
        assert abs(in_a - p_a) < 4 * math.sqrt(p_a * (1 - p_a) / n), (weights, in_a, p_a)
        if weights:
            assert (starts < ds.documents[2].train[0]).all()  # weight 0: c never starts a window
        hist = np.bincount(starts[starts <= 3000] * 10 // 3001, minlength=10) / (starts <= 3000).sum()
        assert np.abs(hist - 0.1).max() < 0.02  # and uniform inside a document


def test_same_generator_state_gives_the_same_batches(tmp_path, tok):
    ds = prepare_texts([PROSE * 2, ENGLISH * 20], tok, tmp_path / "ds")
    g = torch.Generator().manual_seed(3)
    uninterrupted = [ds.sample_batch(4, 16, g) for _ in range(6)]
    g = torch.Generator().manual_seed(3)
    first = [ds.sample_batch(4, 16, g) for _ in range(3)]
    state = g.get_state()  # a checkpoint
    torch.manual_seed(123), np.random.seed(123)  # global RNGs must not matter
    resumed = torch.Generator()
    resumed.set_state(state)
    again = first + [TokenDataset.open(tmp_path / "ds").sample_batch(4, 16, resumed) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(uninterrupted, again))
    assert not torch.equal(uninterrupted[0][0], uninterrupted[1][0])


def test_eval_windows_are_fixed_and_walk_the_val_region(tmp_path):
    ds = position_dataset(tmp_path, val_fraction=0.25)
    T, lo, hi = 16, ds.train_tokens, ds.num_tokens
    batches = list(ds.eval_batches(5, T))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, ds.eval_batches(5, T)))
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    n = (hi - lo - 1) // T  # all but the last partial window
    assert len(x) == n and len(batches) == math.ceil(n / 5)
    flat = torch.from_numpy(ds.tokens.astype(np.int64))
    assert torch.equal(x.flatten(), flat[lo:lo + n * T]) and torch.equal(y.flatten(), flat[lo + 1:lo + 1 + n * T])
    spread = torch.cat([b[0] for b in ds.eval_batches(2, T, max_batches=3)])
    assert len(spread) == 6 and torch.equal(spread[0], x[0]) and torch.equal(spread[-1], x[-1])
    starts = window_starts(ds, spread)
    assert (np.diff(starts) >= T).all()  # still non-overlapping


def test_large_vocabularies_use_uint32(tmp_path):
    big = PositionTokenizer(vocab_size=70_000, base=0x4E00 - 65_600)  # ids 65,604..
    ds = prepare_texts([distinct(65_600, 65_700, base=big.base)], big, tmp_path / "ds", val_fraction=0.0)
    assert ds.header["dtype"] == "uint32" and ds.tokens[:3].tolist() == [65_604, 65_605, 65_606]
    assert (tmp_path / "ds" / "tokens.bin").stat().st_size == 4 * 101


def test_open_refuses_mismatched_files(tmp_path, tok):
    prepare_texts([PROSE, ENGLISH * 10], tok, tmp_path / "ds")
    assert TokenDataset.open(tmp_path / "ds", tok).num_tokens > 0
    other = Tokenizer.train([ENGLISH], kind="char", vocab_size=50)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenDataset.open(tmp_path / "ds", other)
    bin_path, header_path = tmp_path / "ds" / "tokens.bin", tmp_path / "ds" / "tokens.json"
    data = bin_path.read_bytes()
    bin_path.write_bytes(data[:-2])
    with pytest.raises(ValueError, match="header says"):
        TokenDataset.open(tmp_path / "ds")
    bin_path.write_bytes(data)
    header = json.loads(header_path.read_text())
    header["documents"][0]["val"] = [0, 5]  # a val range inside the train region
    header_path.write_text(json.dumps(header))
    with pytest.raises(ValueError, match="do not fit"):
        TokenDataset.open(tmp_path / "ds")
    header_path.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid dataset header"):
        TokenDataset.open(tmp_path / "ds")
    header_path.unlink()
    with pytest.raises(FileNotFoundError, match="not a prepared dataset"):
        TokenDataset.open(tmp_path / "ds")


def test_bad_corpora_raise_and_write_nothing(tmp_path, tok):
    _write(tmp_path / "books" / "ok.txt", PROSE.encode("cp1251"))
    _write(tmp_path / "books" / "junk.txt", bytes(range(256)) * 8)
    cases = [(lambda out: prepare_texts(["", "  \n"], tok, out), ValueError, "corpus is empty"),
             (lambda out: prepare_texts(["Да."], tok, out, seq_len=256), ValueError, "fewer than one window of 257"),
             (lambda out: prepare([tmp_path / "missing.txt"], tok, out), FileNotFoundError, "missing.txt"),
             (lambda out: prepare([tmp_path / "books"], tok, out), ValueError, "junk.txt"),
             (lambda out: prepare([tmp_path / "books" / "ok.txt"], tok, out, weights={"nobook": 2.0}),
              ValueError, "nobook")]
    for i, (run, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            run(tmp_path / f"out{i}")
        assert not (tmp_path / f"out{i}").exists()
    # a failed re-prepare leaves the previous dataset as it was
    ds = prepare([tmp_path / "books" / "ok.txt"], tok, tmp_path / "ds")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()}
    with pytest.raises(ValueError):
        prepare_texts(["Да."], tok, tmp_path / "ds", seq_len=256, overwrite=True)
    assert {p.name: p.read_bytes() for p in (tmp_path / "ds").iterdir()} == before == {
        "tokens.bin": before["tokens.bin"], "tokens.json": before["tokens.json"]}  # no temp files either
    assert ds.documents[0].name == "ok.txt"


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_failure_while_writing_leaves_no_partial_files(tmp_path, tok, monkeypatch, overwrite):
    """A new dataset is put in place only where none is (files.put_new, see below), one replacing another renamed."""
    import os

    from lmlab.data import dataset as D

    module, name = (os, "replace") if overwrite else (D, "put_new")
    real = getattr(module, name)
    for fail_at in (1, 2):  # putting tokens.bin into place fails; putting tokens.json fails
        calls = []

        def put(src, dst, fail_at=fail_at, calls=calls):
            calls.append(dst)
            if len(calls) == fail_at:
                raise OSError(28, "No space left on device")
            real(src, dst)

        monkeypatch.setattr(module, name, put)
        with pytest.raises(OSError, match="No space"):
            prepare_texts([PROSE], tok, tmp_path / f"ds{fail_at}", overwrite=overwrite)
        assert [os.path.basename(c) for c in calls] == ["tokens.bin", "tokens.json"][:fail_at]
        assert list((tmp_path / f"ds{fail_at}").iterdir()) == []
        monkeypatch.undo()


def test_prepare_names_and_weights_from_files(tmp_path, tok):
    _write(tmp_path / "ru" / "book.txt", PROSE.encode("koi8_r", errors="replace"))
    _write(tmp_path / "en" / "book.txt", (ENGLISH * 20).encode())
    _write(tmp_path / "en" / "extra.md", (ENGLISH * 5).encode())
    ds = prepare([tmp_path / "en", tmp_path / "ru"], tok, tmp_path / "ds", weights={"extra": 3.0, "ru/book.txt": 0.5})
    assert [(d.name, d.weight) for d in ds.documents] == [("en/book.txt", 1.0), ("en/extra.md", 3.0),
                                                          ("ru/book.txt", 0.5)]


# ---- CLI ----------------------------------------------------------------------------------------------

def test_cli_tokenizer_train_and_data_prepare(tmp_path, capsys):
    _write(tmp_path / "book.txt", (KOI8_PROSE * 5).encode("koi8_r"))
    _write(tmp_path / "more" / "b.html", f"<p>{ENGLISH * 10}</p>".encode())
    assert main(["tokenizer", "train", str(tmp_path / "book.txt"), str(tmp_path / "more"), "--kind", "bpe",
                 "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]) == 0
    out = capsys.readouterr().out
    assert "300 tokens" in out and "2 documents" in out
    assert main(["data", "prepare", str(tmp_path / "book.txt"), str(tmp_path / "more"), "--tokenizer",
                 str(tmp_path / "tok.json"), "--out", str(tmp_path / "ds"), "--preset", "gpt2-tiny",
                 "--weight", "b=2", "--val-fraction", "0.1"]) == 0
    out = capsys.readouterr().out
    ds = TokenDataset.open(tmp_path / "ds", Tokenizer.load(tmp_path / "tok.json"))
    assert [(d.name, d.weight) for d in ds.documents] == [("book.txt", 1.0), ("b.html", 2.0)]
    assert f"train {ds.train_tokens:,}" in out and "tokens per parameter" in out and "Chinchilla" in out
    for argv, message in [(["data", "prepare", str(tmp_path / "missing.txt")], "missing.txt"),
                          (["data", "prepare", str(tmp_path / "book.txt"), "--seq-len", "100000"], "fewer than one"),
                          (["data", "prepare", str(tmp_path / "book.txt"), "--weight", "b"], "NAME=NUMBER")]:
        assert main(argv + ["--tokenizer", str(tmp_path / "tok.json"), "--out", str(tmp_path / "ds2")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lmlab: error:") and message in err and err.count("\n") == 1, err
        assert not (tmp_path / "ds2").exists()
    assert main(["tokenizer", "train", str(tmp_path / "nope"), "--out", str(tmp_path / "t2.json")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "t2.json").exists()


def test_a_dataset_written_meanwhile_is_not_replaced_without_force(tmp_path, monkeypatch):
    """The check for a dataset ran before the documents were read; two `lmlab data prepare` into one folder both
    said "written" and the later one replaced the other's files. Another preparation that finishes while this one
    tokenises (here: inside it) now keeps its files, and this one is refused."""
    from lmlab.data import dataset as D

    tok = Tokenizer.train(["кот сидел на ковре. the cat sat."] * 5, kind="char", vocab_size=60)
    out, header_json = tmp_path / "ds", D._header_json

    def meanwhile(header):
        monkeypatch.setattr(D, "_header_json", header_json)
        prepare_texts(["другая книга, другой набор."], tok, out)  # the other process, done first
        return header_json(header)

    monkeypatch.setattr(D, "_header_json", meanwhile)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        prepare_texts(["кот сидел на ковре."], tok, out)
    theirs = TokenDataset.open(out)
    assert [d.name for d in theirs.documents] == ["text-0"] and theirs.train_tokens + theirs.val_tokens == len(
        tok.encode("другая книга, другой набор.")) + 1
    assert sorted(p.name for p in out.iterdir()) == ["tokens.bin", "tokens.json"]  # no temporary file left
    prepare_texts(["кот сидел на ковре."], tok, out, overwrite=True)  # asked: replaced
    mine = TokenDataset.open(out)
    assert mine.train_tokens + mine.val_tokens == len(tok.encode("кот сидел на ковре.")) + 1


def test_without_hard_links_a_new_dataset_is_still_written_and_another_still_refused(tmp_path, tok, monkeypatch):
    """FAT and some network mounts refuse os.link (EPERM): the dataset goes in by rename where none is."""
    import errno
    import os

    def no_links(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    reference = prepare_texts([PROSE], tok, tmp_path / "reference")
    monkeypatch.setattr(os, "link", no_links)
    prepare_texts([PROSE], tok, tmp_path / "ds")
    for name in ("tokens.bin", "tokens.json"):
        assert (tmp_path / "ds" / name).read_bytes() == (reference.path / name).read_bytes()
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["tokens.bin", "tokens.json"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokens.bin").write_bytes(b"another's")  # one that appeared meanwhile (no header yet)
    with pytest.raises(FileExistsError, match="already holds a dataset"):
        prepare_texts([PROSE], tok, tmp_path / "other")
    assert (tmp_path / "other" / "tokens.bin").read_bytes() == b"another's"
