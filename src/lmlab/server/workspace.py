"""The workspace on disk (`books/`, `models/`, `runs/`, the SQLite file) and the checks at its edge:
names that cannot escape their folder or overflow the file system's name length, uploads that are text we
can read (read once, in a child process, and stored beside the book: `books/.{name}.text`), zips of model
directories.

Seed 000 joined `file.filename` and model names straight into paths (`BOOKS_DIR / file.filename`), so
`../../anything` wrote anywhere; here every name is validated before it touches a path, and the resolved
path is checked to sit inside its folder as a second line of defence.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import threading
import unicodedata
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..data.documents import SUFFIXES
from .extract import extract, read_stored

BOOK_SUFFIXES = SUFFIXES
TEXT_SUFFIX = ".text"  # books/.{name}.text: a book's text, read once (extract.py); hidden, so never a book
# Bytes in one path component on Linux (ext4, XFS, Btrfs) and macOS (APFS); NTFS counts 255 UTF-16 units,
# never more than the UTF-8 bytes. A name must leave room for the longest name the server derives from it in
# the same folder: models/.{name}.selfplay-{run id} (a self-play policy on its way in, jobs.py; run ids go up
# to 2**62) is longer than .{name}.incoming, .{name}.old (replace_dir) and .{name}.XXXXXXXX.tmp (staged_dir).
NAME_MAX = 255
MODEL_NAME_BYTES = NAME_MAX - len(f"..selfplay-{2**62}")
BOOK_NAME_BYTES = NAME_MAX - len(f".{TEXT_SUFFIX}")
_NAME_EXTRA = set(" ._-()[]+,'")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class NameError_(ValueError):
    """A user-supplied name that may not become a file name."""


def check_name(name: str, what: str = "name", *, max_len: int = 100, max_bytes: int = MODEL_NAME_BYTES,
               allow_space: bool = False) -> str:
    """Return `name` (NFC) if it is a safe single path component, else raise NameError_ saying why.
    Letters of any script, digits and `._-()[]+,'` are allowed; no separators, no leading dot; at most
    `max_len` characters and `max_bytes` bytes of UTF-8 (what the file system counts)."""
    if not isinstance(name, str) or not name:
        raise NameError_(f"{what} must not be empty")
    name = unicodedata.normalize("NFC", name)
    if len(name) > max_len:
        raise NameError_(f"{what} is longer than {max_len} characters")
    if len(name.encode("utf-8", "surrogatepass")) > max_bytes:
        raise NameError_(f"{what} is {len(name.encode('utf-8', 'surrogatepass'))} bytes in UTF-8, longer than the "
                         f"limit of {max_bytes} bytes (a file name holds {NAME_MAX} bytes, less what the server "
                         "adds to it)")
    if "/" in name or "\\" in name or "\x00" in name:
        raise NameError_(f"{what} {name!r} must not contain a path separator")
    if name in (".", "..") or name.startswith((".", "-", " ")) or name.endswith((" ", ".")):
        raise NameError_(f"{what} {name!r} must not start with '.', '-' or a space, nor end with '.' or a space")
    bad = sorted({ch for ch in name if not (ch.isalnum() or ch in _NAME_EXTRA) or (ch == " " and not allow_space)})
    if bad:
        raise NameError_(f"{what} {name!r} contains characters that are not allowed: {''.join(bad)!r}")
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise NameError_(f"{what} {name!r} is a reserved device name")
    return name


def check_book_name(name: str) -> str:
    name = check_name(name, "book file name", max_len=200, max_bytes=BOOK_NAME_BYTES, allow_space=True)
    if Path(name).suffix.lower() not in BOOK_SUFFIXES:
        raise NameError_(f"book {name!r} must end in one of {' '.join(BOOK_SUFFIXES)}")
    return name


def inside(folder: Path, name: str) -> Path:
    """folder / name, refusing anything that resolves outside folder (symlinks included)."""
    path = (folder / name).resolve()
    if path.parent != folder.resolve():
        raise NameError_(f"{name!r} resolves outside {folder.name}/")
    return path


def default_workspace() -> Path:
    """The user's data directory: $XDG_DATA_HOME/lmlab, ~/Library/Application Support/lmlab, %LOCALAPPDATA%."""
    if os.environ.get("LMLAB_WORKSPACE"):
        return Path(os.environ["LMLAB_WORKSPACE"]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA", Path.home() / "AppData" / "Local")) / "lmlab"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "lmlab"
    return Path(os.environ.get("XDG_DATA_HOME", Path.home() / ".local" / "share")) / "lmlab"


class Workspace:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        self.books = self.root / "books"
        self.models = self.root / "models"
        self.runs = self.root / "runs"
        self.tmp = self.root / "tmp"
        for d in (self.books, self.models, self.runs, self.tmp):
            d.mkdir(parents=True, exist_ok=True)

    def book_path(self, name: str) -> Path:
        return inside(self.books, check_book_name(name))

    def text_path(self, name: str) -> Path:
        """Where the text read from the book `name` is stored (see extract.py)."""
        return self.books / f".{check_book_name(name)}{TEXT_SUFFIX}"

    def model_path(self, name: str) -> Path:
        return inside(self.models, check_name(name, "model name"))

    def run_path(self, run_id: int) -> Path:
        return self.runs / f"run-{int(run_id)}"

    def sqlite_url(self) -> str:
        return f"sqlite:///{self.root / 'lmlab.db'}"


# ---- books ------------------------------------------------------------------------------------------

def store_text(ws: Workspace, book: Path, name: str, *, timeout_s: float, memory_bytes: int) -> dict:
    """Read `book` (shown as the book `name`) in a child process, store its text as ws.text_path(name), and
    return the header (size, mtime_ns, encoding, chars, words, lines, unique_chars); extract.Refused if the
    book cannot be read within the limits."""
    tmp = ws.tmp / f"text-{uuid.uuid4().hex}"
    header = extract(book, tmp, name, timeout_s=timeout_s, memory_bytes=memory_bytes)
    os.replace(tmp, ws.text_path(name))
    return header


def book_text(ws: Workspace, name: str, chars: int = 0, **limits: float) -> tuple[dict, str]:
    """(header, first `chars` characters) of the book's stored text, read again first if it is missing or
    older than the book (`limits`: those of store_text)."""
    book, stored = ws.book_path(name), ws.text_path(name)
    found = read_stored(stored, book, chars)
    if found is None:
        store_text(ws, book, name, **limits)
        found = read_stored(stored, book, chars)
    if found is None:
        raise ValueError(f"{name} changed while it was being read; try again")
    return found


# ---- model directories ------------------------------------------------------------------------------

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation.json", "training.json")


class ZipSink(io.RawIOBase):
    """A write-only, unseekable stream: zipfile then writes data descriptors and never seeks back."""

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.pos = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # noqa: ANN001
        self.chunks.append(bytes(b))
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks.clear()
        return data


def zip_model_dir(path: Path, arcname: str, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Stream a zip of the model directory's known files (no symlinks, nothing else) in ~1 MiB pieces,
    so a large model is never held in memory whole."""
    sink = ZipSink()
    with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name in MODEL_FILES:
            f = path / name
            if not f.is_file() or f.is_symlink():
                continue
            with open(f, "rb") as src, zf.open(f"{arcname}/{name}", "w", force_zip64=True) as dst:
                while block := src.read(chunk):
                    dst.write(block)
                    yield sink.take()
    yield sink.take()


# Held only for the renames of a swap and for taking a snapshot (links, no copying): a reader's snapshot is then
# wholly the old directory or wholly the new one. A directory cannot be exchanged by one portable rename.
_SWAP = threading.Lock()


def stage_dir(src: Path, dst: Path) -> Path:
    """A copy of src beside dst, for swap_dir to put in dst's place: the slow part, done before any lock."""
    tmp = dst.parent / f".{dst.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    return tmp


def swap_dir(staged: Path, dst: Path) -> None:
    """Put the staged copy in dst's place, so that dst is never half-written and no snapshot mixes the two."""
    old = dst.parent / f".{dst.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    with _SWAP:
        if dst.exists():
            os.replace(dst, old)
        os.replace(staged, dst)
    shutil.rmtree(old, ignore_errors=True)  # a snapshot keeps its own links to the old files


def snapshot_dir(src: Path, dest: Path) -> Path:
    """dest (made here) holding the model files of src as they are at this moment, as hard links taken while no
    swap_dir runs: a reader of dest sees one version of the model, whole, however long it reads, and nothing is
    copied. (Copies where the file system has no hard links.) The caller removes dest."""
    dest.mkdir(parents=True)
    with _SWAP:
        for name in MODEL_FILES:
            f = src / name
            if f.is_symlink() or not f.is_file():
                continue
            try:
                os.link(f, dest / name)
            except FileNotFoundError:  # removed meanwhile (the model deleted): the reader finds it missing
                continue
            except OSError:
                shutil.copy2(f, dest / name)
    return dest
