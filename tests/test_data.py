"""Reading books in their encodings and formats; token files; windows that never touch validation data."""

import json
import zipfile

import numpy as np
import pytest
import torch

from lmlab.cli import main
from lmlab.data import TokenDataset, find_documents, prepare, prepare_texts, read_document
from lmlab.tokenizers import EOS_ID, Tokenizer

RUSSIAN = (
    "Глава первая\n\n"
    "Старик жил со своею старухой у самого синего моря; они жили в ветхой землянке ровно тридцать лет и три "
    "года. Старик ловил неводом рыбу, старуха пряла свою пряжу. Раз он в море закинул невод, — пришёл невод "
    "с одною тиной. Он в другой раз закинул невод, — пришёл невод с травой морскою.\n\n"
    "В третий раз закинул он невод, — пришёл невод с одною рыбкой, с непростою рыбкой, — золотою. "
    "Как взмолится золотая рыбка! Голосом молвит человечьим: «Отпусти ты, старче, меня в море!»\n"
)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train([RUSSIAN * 4, "Hello world, the quick brown fox. " * 30], kind="bpe", vocab_size=400)


def make_epub(path, chapters):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("mimetype", "application/epub+zip")
        z.writestr("META-INF/container.xml", '<?xml version="1.0"?><container version="1.0" '
                   'xmlns="urn:oasis:names:tc:opendocument:xmlns:container"><rootfiles><rootfile '
                   'full-path="OEBPS/content.opf" media-type="application/oebps-package+xml"/></rootfiles>'
                   '</container>')
        items = "".join(f'<item id="c{i}" href="text/c{i}.xhtml" media-type="application/xhtml+xml"/>'
                        for i in range(len(chapters)))
        spine = "".join(f'<itemref idref="c{i}"/>' for i in reversed(range(len(chapters))))  # order from spine
        z.writestr("OEBPS/content.opf", f'<?xml version="1.0"?><package xmlns="http://www.idpf.org/2007/opf" '
                   f'version="3.0"><manifest>{items}</manifest><spine>{spine}</spine></package>')
        for k, chapter in enumerate(chapters):  # file c{n-1-k} holds chapter k: only the spine knows
            body = "".join(f"<p>{p}</p>" for p in chapter.split("\n\n") if p.strip())
            z.writestr(f"OEBPS/text/c{len(chapters) - 1 - k}.xhtml",
                       f'<?xml version="1.0" encoding="utf-8"?><html xmlns="http://www.w3.org/1999/xhtml">'
                       f'<head><title>x</title><style>p {{}}</style></head><body>{body}</body></html>')


def test_encodings_load_to_the_same_text(tmp_path):
    original = read_document(_write(tmp_path / "utf8.txt", RUSSIAN.encode("utf-8")))
    assert original == RUSSIAN
    for name, data in [("bom.txt", b"\xef\xbb\xbf" + RUSSIAN.encode("utf-8")),
                       ("cp1251.txt", RUSSIAN.encode("cp1251")),
                       ("utf16.txt", RUSSIAN.encode("utf-16")),
                       ("crlf.txt", RUSSIAN.replace("\n", "\r\n").encode("cp1251"))]:
        assert read_document(_write(tmp_path / name, data)) == original, name
    koi8_safe = RUSSIAN.replace("—", "-").replace("«", '"').replace("»", '"')  # KOI8-R has no — « »
    assert read_document(_write(tmp_path / "koi8.txt", koi8_safe.encode("koi8_r"))) == koi8_safe


def test_epub_and_html_give_the_paragraph_text(tmp_path):
    paragraphs = [p for p in RUSSIAN.split("\n\n") if p.strip()]
    make_epub(tmp_path / "book.epub", ["\n\n".join(paragraphs[:2]), paragraphs[2]])
    html = "<html><head><script>var x = 1;</script></head><body>" + "".join(
        f"<p>{p.strip()}</p>" for p in paragraphs) + "</body></html>"
    words = RUSSIAN.split()
    for path in [tmp_path / "book.epub", _write(tmp_path / "book.html", html.encode("cp1251"))]:
        text = read_document(path)
        assert text.split() == words, path.name
        assert "var x" not in text


def test_undecodable_and_missing_files(tmp_path):
    with pytest.raises(ValueError, match="cannot decode"):
        read_document(_write(tmp_path / "junk.txt", bytes(range(256)) * 40))
    with pytest.raises(FileNotFoundError, match="nope"):
        find_documents([tmp_path / "nope.txt"])
    (tmp_path / "dir").mkdir()
    _write(tmp_path / "dir" / "a.txt", b"a")
    _write(tmp_path / "dir" / "skip.bin", b"a")
    assert [p.name for p in find_documents([tmp_path / "dir"])] == ["a.txt"]
    assert [p.name for p in find_documents([str(tmp_path / "dir" / "*.txt")])] == ["a.txt"]


def test_no_training_window_overlaps_validation(tmp_path, tok):
    texts = [RUSSIAN * 3, "Hello world, the quick brown fox. " * 40, RUSSIAN[:500]]
    ds = prepare_texts(texts, tok, tmp_path / "ds", val_fraction=0.1)
    hdr = ds.header
    for d in ds.documents:
        assert d.train[1] <= hdr["train_tokens"] and (d.val[0] == d.val[1] or d.val[0] >= hdr["train_tokens"])
        # the held-out slice is the end of the document itself
        doc_ids = tok.encode(texts[[x.name for x in ds.documents].index(d.name)])
        got = np.concatenate([ds.tokens[d.train[0]:d.train[1]], ds.tokens[d.val[0]:d.val[1]]])
        assert got.tolist() == doc_ids
        assert ds.tokens[d.train[1]] == EOS_ID
    g = torch.Generator().manual_seed(0)
    seq = 32
    for _ in range(300):
        x, y = ds.sample_batch(16, seq, g)
        assert torch.equal(x[:, 1:], y[:, :-1])
        # every window lies in the train region: find each in the flat file
    starts_seen = set()
    g = torch.Generator().manual_seed(1)
    flat = torch.from_numpy(ds.tokens.astype(np.int64))
    for _ in range(50):
        x, y = ds.sample_batch(8, seq, g)
        for row in range(8):
            matches = (flat.unfold(0, seq, 1) == x[row]).all(1).nonzero().flatten().tolist()
            assert any(m + seq < hdr["train_tokens"] for m in matches)
            starts_seen.update(matches)
    val = list(ds.eval_batches(4, seq))
    assert val and all(torch.equal(a[0], b[0]) for a, b in zip(val, ds.eval_batches(4, seq)))
    first_x = val[0][0][0]
    assert torch.equal(first_x, flat[hdr["train_tokens"]:hdr["train_tokens"] + seq])


def test_same_generator_state_same_batches_and_weights_mix(tmp_path, tok):
    a_text, b_text = "Hello world, the quick brown fox. " * 60, RUSSIAN * 3
    ds = prepare_texts([a_text, b_text], tok, tmp_path / "ds", weights=[1.0, 0.0], val_fraction=0.0)
    g = torch.Generator().manual_seed(3)
    g.manual_seed(3)
    state = g.get_state()
    first = [ds.sample_batch(4, 16, g) for _ in range(3)]
    g.set_state(state)
    again = [ds.sample_batch(4, 16, g) for _ in range(3)]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(first, again))
    b_start = ds.documents[1].train[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(50):  # weight 0: windows start only in the first document
        x, _ = ds.sample_batch(8, 16, g)
        flat = torch.from_numpy(ds.tokens[: ds.train_tokens].astype(np.int64))
        for row in x:
            pos = (flat.unfold(0, 16, 1) == row).all(1).nonzero().flatten()
            assert (pos < b_start).any()


def test_prepare_from_files_weights_and_errors(tmp_path, tok):
    _write(tmp_path / "a.txt", RUSSIAN.encode("cp1251"))
    _write(tmp_path / "b.md", ("Hello world. " * 100).encode())
    ds = prepare([tmp_path], tok, tmp_path / "out", weights={"a": 3.0})
    assert [d.name for d in ds.documents] == ["a.txt", "b.md"] and ds.documents[0].weight == 3.0
    assert TokenDataset.open(tmp_path / "out", tok).num_tokens == ds.num_tokens
    other = Tokenizer.train(["something else entirely"], kind="char", vocab_size=50)
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenDataset.open(tmp_path / "out", other)
    with pytest.raises(ValueError, match="empty"):
        prepare_texts(["", "  \n"], tok, tmp_path / "empty")
    assert not (tmp_path / "empty" / "tokens.bin").exists()
    with pytest.raises(ValueError, match="fewer than one window"):
        prepare_texts(["short"], tok, tmp_path / "short", seq_len=256)
    assert not (tmp_path / "short" / "tokens.json").exists()
    assert 0 < ds.unigram_entropy() < np.log(len(tok))
    assert ds.bytes_per_token() > 1.0
    del ds
    (tmp_path / "out" / "tokens.bin").write_bytes(b"\x00\x00")
    with pytest.raises(ValueError, match="header says"):
        TokenDataset.open(tmp_path / "out")


def test_cli_data_prepare_and_tokenizer_train(tmp_path, capsys):
    _write(tmp_path / "book.txt", (RUSSIAN * 5).replace("—", "-").replace("«", "").replace("»", "").encode("koi8_r"))
    assert main(["tokenizer", "train", str(tmp_path / "book.txt"), "--kind", "bpe", "--vocab-size", "300",
                 "--out", str(tmp_path / "tok.json")]) == 0
    assert main(["data", "prepare", str(tmp_path / "book.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "ds"), "--preset", "gpt2-tiny"]) == 0
    out = capsys.readouterr().out
    assert "tokens per parameter" in out
    header = json.loads((tmp_path / "ds" / "tokens.json").read_text())
    assert header["documents"][0]["name"] == "book.txt"
    assert main(["data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", str(tmp_path / "tok.json"),
                 "--out", str(tmp_path / "ds2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lmlab: error:") and "missing.txt" in err and "\n" not in err
    assert not (tmp_path / "ds2").exists()


def _write(path, data):
    path.write_bytes(data)
    return path
