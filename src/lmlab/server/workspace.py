"""The workspace on disk (`books/`, `models/`, `runs/`, the SQLite file) and the checks at its edge:
names that cannot escape their folder, uploads that are text we can read, zips of model directories.

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
import zipfile
from collections.abc import Iterator
from pathlib import Path

from ..data.documents import SUFFIXES, decode_bytes, read_document

BOOK_SUFFIXES = SUFFIXES
_NAME_EXTRA = set(" ._-()[]+,'")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


class NameError_(ValueError):
    """A user-supplied name that may not become a file name."""


def check_name(name: str, what: str = "name", *, max_len: int = 100, allow_space: bool = False) -> str:
    """Return `name` (NFC) if it is a safe single path component, else raise NameError_ saying why.
    Letters of any script, digits and `._-()[]+,'` are allowed; no separators, no leading dot."""
    if not isinstance(name, str) or not name:
        raise NameError_(f"{what} must not be empty")
    name = unicodedata.normalize("NFC", name)
    if len(name) > max_len:
        raise NameError_(f"{what} is longer than {max_len} characters")
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
    name = check_name(name, "book file name", max_len=200, allow_space=True)
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

    def model_path(self, name: str) -> Path:
        return inside(self.models, check_name(name, "model name"))

    def run_path(self, run_id: int) -> Path:
        return self.runs / f"run-{int(run_id)}"

    def sqlite_url(self) -> str:
        return f"sqlite:///{self.root / 'lmlab.db'}"


# ---- books ------------------------------------------------------------------------------------------

def read_book(path: Path, shown_name: str | None = None) -> tuple[str, str]:
    """(normalised text, encoding label) of a book file, read exactly as training will read it;
    ValueError (naming the book, not the temporary file) if it cannot be read as text."""
    try:
        text = read_document(path)
    except Exception as exc:  # untrusted bytes meet zip/XML/PDF parsers: any failure means "unreadable"
        message = str(exc).replace(str(path), shown_name or path.name) or type(exc).__name__
        if (shown_name or path.name) not in message:
            message = f"{shown_name or path.name}: cannot read it as a book ({message})"
        raise ValueError(message) from None
    return text, encoding_label(path.read_bytes() if path.suffix.lower() not in (".epub", ".pdf") else b"",
                                path.suffix.lower())


def encoding_label(data: bytes, suffix: str) -> str:
    """Which encoding the reader found: BOMs, UTF-8, or the legacy Russian code page it chose."""
    if suffix in (".epub", ".pdf"):
        return suffix[1:]
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if data.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    try:
        data.decode("utf-8")
        return "utf-8"
    except UnicodeDecodeError:
        pass
    try:
        best = decode_bytes(data)
    except ValueError:
        return "unknown"
    return next((e for e in ("cp1251", "koi8_r") if _decodes_to(data, e, best)), "legacy")


def _decodes_to(data: bytes, encoding: str, text: str) -> bool:
    try:
        return data.decode(encoding) == text
    except UnicodeDecodeError:
        return False


def text_stats(text: str) -> dict[str, int]:
    return {"chars": len(text), "words": len(text.split()), "lines": text.count("\n") + (1 if text else 0),
            "unique_chars": len(set(text))}


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
