"""A book's text, read in a child process with a time budget and a memory cap, and stored beside the book.

An upload is untrusted: EPUB and PDF are compressed, and their readers (zipfile, XML, pypdf) are large. So the
server never reads a book in its own process: `extract` runs this file as a script (`python -I extract.py`),
which caps its own address space (RLIMIT_AS), loads lmlab/data/documents.py by path (importing the lmlab
package would bring in torch and its gigabytes of address space), reads the book with the limits of
documents.py, and writes one header line of JSON (the book's size and mtime, its encoding and text statistics)
followed by the text. A book that needs more memory or time than allowed costs the server nothing but the wait.
Only the standard library may be imported at the top of this file.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
from pathlib import Path

_DOCUMENTS = Path(__file__).resolve().parent.parent / "data" / "documents.py"
HEADER_LIMIT = 4096  # bytes of the header line a reader accepts
HEADER_KEYS = ("size", "mtime_ns", "encoding", "chars", "words", "lines", "unique_chars")
_READ_SLOTS = threading.BoundedSemaphore(2)  # books read at once: each child may take its whole memory cap


class Refused(ValueError):
    """A book the server will not take: `status` is the HTTP answer (413 too large, 422 unreadable); `key` and
    `params` the reason as the web app says it in its language (app.PROBLEMS)."""

    def __init__(self, status: int, message: str, key: str, params: dict) -> None:
        super().__init__(message)
        self.status, self.key, self.params = status, key, params


def _refusal(status: int, error: str, key: str, **params: object) -> dict:
    return {"status": status, "error": error, "key": key, "params": params}


def _unreadable(status: int, shown: str, reason: str, error: str | None = None) -> dict:
    """The book cannot be read, for `reason`; said after the book's name unless it names the book itself."""
    error = error or (reason if shown in reason else f"{shown}: {reason}")
    return _refusal(status, error, "book_unreadable", name=shown, reason=reason)


def extract(book: Path, out: Path, shown: str, *, timeout_s: float, memory_bytes: int) -> dict:
    """Read `book` in a child process into `out` (header line + text); the header, or Refused naming `shown`."""
    cmd = [sys.executable, "-I", str(Path(__file__).resolve()), str(book), str(out), shown, str(memory_bytes)]
    try:
        # stderr is dropped: pypdf logs a warning per oddity, and a crafted file can have millions of them
        with _READ_SLOTS:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                  timeout=timeout_s)
        result = json.loads(proc.stdout or b"null") or _unreadable(
            422, shown, f"the reader stopped without an answer (exit code {proc.returncode})")
    except subprocess.TimeoutExpired:  # run() has killed the child
        result = _refusal(422, f"{shown}: reading it took longer than the limit of {timeout_s:g} s",
                          "book_read_timeout", name=shown, limit=f"{timeout_s:g}")
    except ValueError:
        result = _unreadable(422, shown, "the reader's answer was not JSON")
    if "error" in result:
        out.unlink(missing_ok=True)
        raise Refused(result["status"], result["error"], result["key"], result["params"])
    return result


def read_stored(path: Path, book: Path, chars: int = 0) -> tuple[dict, str] | None:
    """(header, first `chars` characters) of the stored text `path`, or None if it is missing or was not read
    from `book` as it is now (another size or modification time: the files are the truth)."""
    try:
        st = book.stat()
        # never through a symbolic link (a planted `.book.txt.text -> elsewhere` is read again, and replaced)
        with open(os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)), encoding="utf-8") as f:
            header = json.loads(f.readline(HEADER_LIMIT))
            if any(k not in header for k in HEADER_KEYS) or (header["size"], header["mtime_ns"]) != (
                    st.st_size, st.st_mtime_ns):
                return None
            return header, f.read(chars) if chars else ""
    except (OSError, ValueError, TypeError):  # TypeError: a header that is not an object
        return None


# ---- the child ------------------------------------------------------------------------------------------

def text_stats(text: str) -> dict[str, int]:
    words = sum(1 for _ in re.finditer(r"\S+", text))  # as len(text.split()), without a list of every word
    return {"chars": len(text), "words": words, "lines": text.count("\n") + (1 if text else 0),
            "unique_chars": len(set(text))}


def _read(book: Path, out: Path, shown: str) -> dict:
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmlab_documents", _DOCUMENTS)
    documents = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(documents)
    try:
        text = documents.read_document(book)
    except Exception as exc:  # untrusted bytes meet zip/XML/PDF parsers: any failure means "unreadable"
        message = str(exc).replace(str(book), shown) or type(exc).__name__
        return _unreadable(413 if isinstance(exc, documents.TooLarge) else 422, shown,
                           message.removeprefix(f"{shown}: "),
                           message if shown in message else f"{shown}: cannot read it as a book ({message})")
    if not text or text.isspace():
        return _refusal(422, f"{shown} has no text in it", "book_no_text", name=shown)
    suffix = book.suffix.lower()
    st = book.stat()
    header = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
              "encoding": documents.encoding_label(b"" if suffix in (".epub", ".pdf") else book.read_bytes(), suffix),
              **text_stats(text)}
    with open(out, "w", encoding="utf-8", newline="") as f:
        f.write(json.dumps(header) + "\n")
        f.write(text)
    return header


def main(argv: list[str]) -> None:
    book, out, shown, memory = Path(argv[0]), Path(argv[1]), argv[2], int(argv[3])
    try:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    except (ImportError, ValueError, OSError):
        pass  # Windows has no rlimits and macOS does not enforce this one: the time budget still holds
    try:
        result = _read(book, out, shown)
    except MemoryError:
        result = _refusal(413, f"{shown}: reading it needs more than the limit of {memory / 2**20:.0f} MiB of "
                          "memory", "book_read_memory", name=shown, limit=f"{memory / 2**20:.0f}")
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # no clean-up of a heap that may be huge


if __name__ == "__main__":
    main(sys.argv[1:])
