"""Books on the server: decompression bombs refused by a real server whose memory stays put, text read once
and served from the stored copy, name lengths counted in bytes, and books in use never replaced."""

from __future__ import annotations

import json
import os
import signal
import threading
import zipfile
from pathlib import Path

import pytest
from test_data import PARAGRAPHS, make_epub, make_pdf
from test_server_support import (
    API_HEADERS,
    BOOK,
    TINY_MODEL,
    ServerProcess,
    TestClient,
    client,
    settings,
    upload,
    wait_for,
)

from lmlab import __version__
from lmlab.data.documents import read_document
from lmlab.server import build_asgi
from lmlab.server.extract import text_stats

PDF_REFUSAL = ("bomb.pdf: the PDF goes past one of pypdf's reading limits; refused (a stream may unpack to at "
               "most 32 MiB; pypdf: Limit reached while decompressing.")
HEADROOM = 200 * 2**20  # what a refused bomb may add to the server's peak memory


def peak_rss(pid: int) -> int:
    """The process's peak resident memory (VmHWM), in bytes."""
    line = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def extractor_of(pid: int) -> int | None:
    """The pid of the server's book-reading child process (extract.py), if one is running."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in children:
            try:
                if b"extract.py" in Path(f"/proc/{child}/cmdline").read_bytes():
                    return int(child)
            except OSError:
                pass
    return None


def bombs(folder: Path) -> tuple[Path, Path]:
    """An EPUB whose chapter unpacks to 258 MiB (from ~0.7 MB) and a PDF whose page unpacks to 64 MiB."""
    make_epub(folder / "bomb.epub", [["a" * 1017]], repeat=2**18)
    make_pdf(folder / "bomb.pdf", [b" " * (64 * 2**20)], flate=True)
    return folder / "bomb.epub", folder / "bomb.pdf"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_bombs_are_refused_by_a_real_server_whose_memory_stays_put(tmp_path):
    epub, pdf = bombs(tmp_path)
    with zipfile.ZipFile(epub) as z:
        info = z.getinfo("OEBPS/text/chap 0.xhtml")
    assert info.file_size >= 256 * 2**20
    server = ServerProcess(tmp_path / "ws").start()
    try:
        c = server.client()
        assert upload(c).status_code == 201
        assert c.get("/api/v1/books/tales.txt/preview").status_code == 200
        idle = peak_rss(server.proc.pid)

        answer = {}
        sending = threading.Thread(target=lambda: answer.update(r=c.post(
            "/api/v1/books", files={"file": ("bomb.epub", epub.read_bytes())})))
        sending.start()
        # Freeze the child reading the bomb: the server must answer meanwhile, from its own process.
        child = wait_for(lambda: extractor_of(server.proc.pid), 60, 0.001, "the server to start reading the book")
        os.kill(child, signal.SIGSTOP)
        try:
            wait_for(lambda: "State:\tT" in Path(f"/proc/{child}/status").read_text(), 10, 0.001, "it to stop")
            with server.client() as other:
                info_answer = other.get("/api/v1/info")
            assert info_answer.status_code == 200 and info_answer.json()["version"] == __version__
            assert sending.is_alive()  # the bomb is still being read
        finally:
            os.kill(child, signal.SIGCONT)
        sending.join(120)
        r = answer["r"]
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == (f"bomb.epub: OEBPS/text/chap 0.xhtml unpacks to more than 100 times its "
                                      f"packed size ({info.compress_size} bytes); refused as a decompression bomb")

        r = c.post("/api/v1/books", files={"file": ("bomb.pdf", pdf.read_bytes())})
        assert r.status_code == 413, r.text
        assert r.json()["detail"].startswith(PDF_REFUSAL), r.text

        peak = peak_rss(server.proc.pid)
        assert peak <= idle + HEADROOM, f"server peak memory went from {idle >> 20} to {peak >> 20} MiB"
        assert [b["name"] for b in c.get("/api/v1/books").json()] == ["tales.txt"]
        assert sorted(p.name for p in (tmp_path / "ws" / "books").iterdir()) == [".tales.txt.text", "tales.txt"]
        assert list((tmp_path / "ws" / "tmp").iterdir()) == []
    finally:
        server.stop()


def test_a_book_past_the_time_budget_is_refused(tmp_path):
    make_pdf(tmp_path / "long.pdf", [f"Page {i} of a long book." for i in range(3000)])  # ~1.5 s to read
    with client(settings(tmp_path / "ws", extract_timeout_s=0.5)) as c:
        r = c.post("/api/v1/books", files={"file": ("long.pdf", (tmp_path / "long.pdf").read_bytes())})
        assert r.status_code == 422
        assert r.json() == {"detail": "long.pdf: reading it took longer than the limit of 0.5 s",
                            "error": {"key": "book_read_timeout", "params": {"name": "long.pdf", "limit": "0.5"}}}
        assert c.get("/api/v1/books").json() == []
        assert list((tmp_path / "ws" / "tmp").iterdir()) == []


def test_books_are_read_once_and_served_from_the_stored_text(tmp_path):
    make_epub(tmp_path / "book.epub", [PARAGRAPHS[:3], PARAGRAPHS[3:]])
    make_pdf(tmp_path / "book.pdf", ["First page of the book.", "Second page (here)."])
    ws = tmp_path / "ws"
    with client(settings(ws)) as c:
        for name in ("book.epub", "book.pdf"):
            text = read_document(tmp_path / name)
            r = c.post("/api/v1/books", files={"file": (name, (tmp_path / name).read_bytes())})
            assert r.status_code == 201, r.text
            stats = {k: r.json()[k] for k in ("chars", "words", "lines", "unique_chars")}
            assert stats == text_stats(text) and r.json()["encoding"] == name[-3:].replace("pub", "epub")
            assert {k: v for k, v in c.get(f"/api/v1/books/{name}").json().items() if k in stats} == stats
            assert c.get(f"/api/v1/books/{name}/preview?chars=12").json() == {
                "name": name, "text": text[:12], "truncated": True}
            stored = ws / "books" / f".{name}.text"
            header, body = stored.read_text(encoding="utf-8").split("\n", 1)
            assert body == text
            # Detail and preview read the stored text, not the book: change the text, keep the header.
            stored.write_text(header + "\nstored", encoding="utf-8")
            assert c.get(f"/api/v1/books/{name}/preview").json()["text"] == "stored"
            # A book newer than its stored text is read again: the files are the truth.
            st = (ws / "books" / name).stat()
            os.utime(ws / "books" / name, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
            assert c.get(f"/api/v1/books/{name}/preview?chars=100000").json()["text"] == text
            stored.unlink()  # and a missing one too, or one whose header is not ours
            assert c.get(f"/api/v1/books/{name}").json()["chars"] == len(text) and stored.is_file()
            stored.write_text('["size"]\nnot ours', encoding="utf-8")
            assert c.get(f"/api/v1/books/{name}/preview?chars=100000").json()["text"] == text
        assert c.delete("/api/v1/books/book.pdf").status_code == 204
        assert not (ws / "books" / ".book.pdf.text").exists()

    # Start-up reads books put into books/ by hand the same way, keeps refusing bombs, drops orphaned texts.
    bombs(ws / "books")
    (ws / "books" / "hand.txt").write_text(BOOK, encoding="utf-8")
    (ws / "books" / ".gone.txt.text").write_text("{}\nleft behind", encoding="utf-8")
    with client(settings(ws)) as c:
        assert sorted(b["name"] for b in c.get("/api/v1/books").json()) == ["book.epub", "hand.txt"]
        assert json.loads((ws / "books" / ".hand.txt.text").read_text(encoding="utf-8").split("\n", 1)[0])[
            "chars"] == len(read_document(ws / "books" / "hand.txt"))
        assert not (ws / "books" / ".gone.txt.text").exists()
        assert not (ws / "books" / ".bomb.epub.text").exists() and not (ws / "books" / ".bomb.pdf.text").exists()


# ---- names: what the file system counts ----------------------------------------------------------------

LONG_BOOK = "Я" * 127 + ".txt"  # 131 characters, 258 bytes of UTF-8
LONG_MODEL = "名" * 100          # 100 characters, 300 bytes
BOOK_LIMIT = ("book file name is 258 bytes in UTF-8, longer than the limit of 249 bytes (a file name holds 255 bytes, "
              "less what the server adds to it)")
MODEL_LIMIT = ("model name is 300 bytes in UTF-8, longer than the limit of 225 bytes (a file name holds 255 bytes, "
               "less what the server adds to it)")


def test_long_non_ascii_names_are_refused_on_both_api_families(tmp_path):
    # /api/v1 names the rule for the web app to say in its language (app.py's Problem); the AZR app's own
    # endpoints answer as they always did
    book_problem = {"key": "name_too_many_bytes", "params": {"bytes": 258, "limit": 249}}
    model_problem = {"key": "name_too_many_bytes", "params": {"bytes": 300, "limit": 225}}
    with client(settings(tmp_path)) as c:
        for path, error in (("/api/v1/books", {"error": book_problem}), ("/upload_book", {})):
            r = c.post(path, files={"file": (LONG_BOOK, BOOK.encode(), "text/plain")})
            assert (r.status_code, r.json()) == (400, {"detail": BOOK_LIMIT, **error}), path
        r = c.get(f"/api/v1/books/{LONG_BOOK}")
        assert (r.status_code, r.json()) == (400, {"detail": BOOK_LIMIT, "error": book_problem})
        r = c.post("/api/v1/models", json={"name": LONG_MODEL, **TINY_MODEL})
        assert (r.status_code, r.json()) == (400, {"detail": MODEL_LIMIT, "error": model_problem})
        r = c.post("/create_model", json={"name": LONG_MODEL, "vocab_size": 300, "d_model": 32, "num_layers": 1,
                                          "num_heads": 2, "d_ff": 64, "max_seq_len": 32})
        assert (r.status_code, r.json()) == (400, {"detail": MODEL_LIMIT})
        r = c.post("/train", json={"model_name": LONG_MODEL, "book_file": "tales.txt"})
        assert (r.status_code, r.json()) == (400, {"detail": MODEL_LIMIT})
        # At the limits: the longest names the server derives from them still fit in 255 bytes.
        at_limit = "Я" * 122 + ".txt"  # 248 bytes; its stored text .{name}.text is 254
        assert upload(c, at_limit).status_code == 201
        assert (tmp_path / "books" / f".{at_limit}.text").is_file()
        assert c.post("/api/v1/models", json={"name": "名" * 75, **TINY_MODEL}).status_code == 201  # 225 bytes
        assert len(f".{'名' * 75}.selfplay-{2**62}".encode()) == 255


# ---- a book in use is not replaced -------------------------------------------------------------------------

def test_a_book_in_use_is_not_overwritten(tmp_path):
    # No lifespan: the supervisor does not start, so the run stays queued (a queued run reads its book later).
    c = TestClient(build_asgi(settings(tmp_path)), base_url="http://127.0.0.1", headers=API_HEADERS)
    assert upload(c).status_code == 201
    assert c.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
    run = c.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}).json()
    assert run["status"] == "queued"
    busy = f"book 'tales.txt' is in use by run(s) [{run['id']}]"
    other = b"Another book altogether."
    r = c.post("/api/v1/books?overwrite=true", files={"file": ("tales.txt", other, "text/plain")})
    named = {"key": "book_in_use", "params": {"name": "tales.txt", "runs": str(run["id"])}}  # said in Russian too
    assert (r.status_code, r.json()) == (409, {"detail": busy, "error": named})
    r = c.post("/upload_book", files={"file": ("tales.txt", other, "text/plain")})
    assert (r.status_code, r.json()) == (400, {"detail": busy})  # 400: the app's answer for a busy model
    assert (r := c.delete("/api/v1/books/tales.txt")).status_code == 409 and r.json() == {"detail": busy,
                                                                                          "error": named}
    assert (tmp_path / "books" / "tales.txt").read_bytes() == BOOK.encode()
    assert c.get("/api/v1/books/tales.txt/preview?chars=20").json()["text"] == read_document(
        tmp_path / "books" / "tales.txt")[:20]
    assert c.post(f"/api/v1/runs/{run['id']}/cancel").json()["status"] == "cancelled"
    r = c.post("/api/v1/books?overwrite=true", files={"file": ("tales.txt", other, "text/plain")})
    assert r.status_code == 201 and r.json()["chars"] == len(other)
    assert c.get("/api/v1/books/tales.txt/preview").json()["text"] == other.decode()
    assert c.post("/upload_book", files={"file": ("tales.txt", BOOK.encode(), "text/plain")}).status_code == 200
    assert (tmp_path / "books" / "tales.txt").read_bytes() == BOOK.encode()


def test_an_upload_that_ends_second_does_not_replace_the_first(tmp_path, monkeypatch):
    """Two uploads of one new name: both were checked before their (long) reading and both stored, the second
    over the first. The check is made again under the lock that stores them."""
    import lmlab.server.services as services
    c = TestClient(build_asgi(settings(tmp_path)), base_url="http://127.0.0.1", headers=API_HEADERS)
    real = services.extract

    def other_upload_ends_meanwhile(*args, **kw):  # what the other upload leaves once it has stored its file
        (tmp_path / "books" / "race.txt").write_bytes(b"First one.")
        return real(*args, **kw)

    monkeypatch.setattr(services, "extract", other_upload_ends_meanwhile)
    r = c.post("/api/v1/books", files={"file": ("race.txt", b"Second one.", "text/plain")})
    monkeypatch.setattr(services, "extract", real)
    assert (r.status_code, r.json()["error"]) == (409, {"key": "book_exists", "params": {"name": "race.txt"}})
    assert (tmp_path / "books" / "race.txt").read_bytes() == b"First one."
    assert not [p for p in (tmp_path / "tmp").iterdir()]  # the refused upload's files are gone
