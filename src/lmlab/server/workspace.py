"""The workspace on disk (`books/`, `models/`, `runs/`, the SQLite file) and the checks at its edge:
names that cannot escape their folder or overflow the file system's name length, uploads that are text we
can read (read once, in a child process, and stored beside the book: `books/.{name}.text`), zips of model
directories.

The AZR Model Trainer app joined `file.filename` and model names straight into paths (`BOOKS_DIR / file.filename`), so
`../../anything` wrote anywhere; here every name is validated before it touches a path, and the resolved
path is checked to sit inside its folder as a second line of defence.

Symbolic links: the workspace folder itself may be one (it is resolved once, at start); nothing inside it is
followed, whether it points out of the workspace or not. A link as `books/`, `models/`, `runs/`, `tmp/` or
the database refuses the start; a book, a model folder, a file in one, or a run folder that is or holds a
link is refused with a LinkError naming it (409 in the API, a failed run that says why), and the files the
server opens itself (run logs and reports, the lock file) are opened with O_NOFOLLOW at every step. Listings
go on: a model whose folder is a link lists as unusable, with the reason.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat
import sys
import threading
import unicodedata
import uuid
import zipfile
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from ..data.documents import SUFFIXES
from .extract import extract, read_stored

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


class BadName(ValueError):
    """A user-supplied name that may not become a file name; `key` and `params`, where given, name the rule for
    the web app to say in its language (app.PROBLEMS), as a Problem does."""

    def __init__(self, message: str, key: str | None = None, **params: Any) -> None:
        super().__init__(message)
        self.key, self.params = key, params


class NotAFile(FileNotFoundError):
    """A path of the workspace that is there but is no regular file (a folder, a FIFO, a device)."""


class LinkError(ValueError):
    """A symbolic link in the workspace where the server would read or write: never followed (a planted
    `runs/run-1/log.txt -> /etc/passwd` would be served, a planted `runs/run-2 -> /elsewhere` written)."""


def check_name(name: str, what: str = "name", *, max_len: int = 100, max_bytes: int = MODEL_NAME_BYTES,
               allow_space: bool = False) -> str:
    """Return `name` (NFC) if it is a safe single path component, else raise BadName saying why.
    Letters of any script, digits and `._-()[]+,'` are allowed; no separators, no leading dot; at most
    `max_len` characters and `max_bytes` bytes of UTF-8 (what the file system counts)."""
    if not isinstance(name, str) or not name:
        raise BadName(f"{what} must not be empty")
    name = unicodedata.normalize("NFC", name)
    if len(name) > max_len:
        raise BadName(f"{what} is longer than {max_len} characters", "name_too_long", limit=max_len)
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise BadName(f"{what} is {size} bytes in UTF-8, longer than the limit of {max_bytes} bytes (a file name "
                      f"holds {NAME_MAX} bytes, less what the server adds to it)", "name_too_many_bytes", bytes=size,
                      limit=max_bytes)
    if "\x00" in name:
        raise BadName(f"{what} {name!r} must not contain a NUL character")
    if "/" in name or "\\" in name:
        raise BadName(f"{what} {name!r} must not contain a path separator", "name_separator", name=name)
    if name in (".", "..") or name.startswith((".", "-", " ")) or name.endswith((" ", ".")):
        raise BadName(f"{what} {name!r} must not start with '.', '-' or a space, nor end with '.' or a space",
                      "name_edges", name=name)
    bad = sorted({ch for ch in name if not (ch.isalnum() or ch in _NAME_EXTRA) or (ch == " " and not allow_space)})
    if bad:
        raise BadName(f"{what} {name!r} contains characters that are not allowed: {''.join(bad)!r}",
                      "name_characters", name=name, chars="".join(bad))
    if name.split(".")[0].lower() in _WINDOWS_RESERVED:
        raise BadName(f"{what} {name!r} is a reserved device name", "name_reserved", name=name)
    return name


def check_book_name(name: str) -> str:
    name = check_name(name, "book file name", max_len=200, max_bytes=BOOK_NAME_BYTES, allow_space=True)
    if Path(name).suffix.lower() not in SUFFIXES:
        raise BadName(f"book {name!r} must end in one of {' '.join(SUFFIXES)}", "book_suffix", name=name,
                      suffixes=" ".join(SUFFIXES))
    return name


def inside(folder: Path, name: str) -> Path:
    """folder / name, refusing anything that resolves outside folder, and a symbolic link there or below."""
    path = folder / name
    if path.resolve().parent != folder.resolve() and not path.is_symlink():
        raise BadName(f"{name!r} resolves outside {folder.name}/")
    return no_links(path, folder.parent)


def link_error(path: Path, root: Path) -> LinkError:
    return LinkError(f"{path.relative_to(root)} is a symbolic link; the server follows no links inside its "
                     "workspace: remove it")


def no_links(path: Path, root: Path) -> Path:
    """`path`, unless it or anything below it is a symbolic link: LinkError naming the first one found,
    relative to `root`. (os.walk does not descend into linked folders; each name is checked with lstat.)"""
    below = (Path(top, n) for top, dirs, files in os.walk(path) for n in dirs + files)
    found = path if path.is_symlink() else next((p for p in below if p.is_symlink()), None)
    if found is not None:
        raise link_error(found, root)
    return path


def remove_entry(path: Path) -> None:
    """Remove a file, a folder tree or a symbolic link (the link, never what it points to)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


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
        self.tasks = self.root / "tasks"  # the workspace's own evaluation tasks (NAME.yaml + NAME.jsonl)
        self.datasets = self.root / "datasets"  # fine-tuning data: NAME.jsonl, its kind in .NAME.jsonl.json
        for d in (self.books, self.models, self.runs, self.tmp, self.tasks, self.datasets):
            if d.is_symlink():
                raise LinkError(f"{d} is a symbolic link, which the server does not follow; make the workspace "
                                "folder itself the link instead")
            d.mkdir(parents=True, exist_ok=True)

    def book_path(self, name: str) -> Path:
        return inside(self.books, check_book_name(name))

    def text_path(self, name: str) -> Path:
        """Where the text read from the book `name` is stored (see extract.py)."""
        return self.books / f".{check_book_name(name)}{TEXT_SUFFIX}"

    def model_path(self, name: str) -> Path:
        """models/<name>; LinkError if the folder or a file in it is a symbolic link."""
        return inside(self.models, check_name(name, "model name"))

    def run_path(self, run_id: int) -> Path:
        """runs/run-<id>, unchecked: run_dir before reading or writing files in it."""
        return self.runs / f"run-{int(run_id)}"

    def run_dir(self, run_id: int) -> Path:
        """runs/run-<id>; LinkError if it or anything in it is a symbolic link."""
        return no_links(self.run_path(run_id), self.root)

    def open(self, path: Path, flags: int = os.O_RDONLY, mode: int = 0o644) -> int:
        """os.open of a path inside the workspace without following a symbolic link at any step: one folder
        at a time with O_NOFOLLOW, relative to the one before (a link swapped in after a check is refused
        too); where the platform cannot (Windows), each step is checked with lstat first. LinkError names it."""
        parts = path.relative_to(self.root).parts
        nofollow = getattr(os, "O_NOFOLLOW", 0)
        if os.open not in os.supports_dir_fd or not nofollow:
            for i in range(1, len(parts) + 1):
                if self.root.joinpath(*parts[:i]).is_symlink():
                    raise link_error(self.root.joinpath(*parts[:i]), self.root)
            return os.open(path, flags, mode)
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        for i, part in enumerate(parts):
            last = i + 1 == len(parts)
            try:
                fd_next = os.open(part, (flags if last else os.O_RDONLY | os.O_DIRECTORY) | nofollow, mode, dir_fd=fd)
            except OSError as exc:  # ELOOP on Linux and macOS, EMLINK on FreeBSD
                if exc.errno == errno.ELOOP or self.root.joinpath(*parts[:i + 1]).is_symlink():
                    raise link_error(self.root.joinpath(*parts[:i + 1]), self.root) from None
                raise
            finally:
                os.close(fd)
            fd = fd_next
        return fd

    def open_file(self, path: Path) -> BinaryIO:
        """A regular file inside the workspace opened for reading as `open` does; NotAFile for anything else
        (O_NONBLOCK: a planted FIFO would block the open forever)."""
        fd = self.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise NotAFile(f"{path.relative_to(self.root)} is not a file")
            return os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise

    def read_bytes(self, path: Path) -> bytes:
        """The bytes of a regular file inside the workspace (open_file)."""
        with self.open_file(path) as f:
            return f.read()

    def sqlite_url(self) -> str:
        db = self.root / "lmlab.db"
        if db.is_symlink():
            raise LinkError(f"{db} is a symbolic link, which the server does not follow: remove it")
        return f"sqlite:///{db}"


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

MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation.json", "training.json",
               "quantization.json", "chat_template.jinja")  # a chat model without its template is not one
SPEED_FILE = "speed.json"  # the decoding speed measured for the weights beside it (routers/modelpage.py)
HF_TOKENIZER_DIR = "hf_tokenizer"  # an imported model's own tokenizer, as transformers saved it (lmlab.interop)


def model_files(path: Path) -> list[str]:
    """The model directory's known files (names relative to `path`) that are there as files, links not followed:
    MODEL_FILES and the files of hf_tokenizer/, without which a model imported with a foreign vocabulary has
    no tokenizer."""
    names = list(MODEL_FILES)
    folder = path / HF_TOKENIZER_DIR
    if folder.is_dir() and not folder.is_symlink():
        try:
            names += sorted(f"{HF_TOKENIZER_DIR}/{f.name}" for f in folder.iterdir())
        except FileNotFoundError:  # removed meanwhile
            pass
    return [n for n in names if (path / n).is_file() and not (path / n).is_symlink()]


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
        for name in model_files(path):
            with open(path / name, "rb") as src, zf.open(f"{arcname}/{name}", "w", force_zip64=True) as dst:
                while block := src.read(chunk):
                    dst.write(block)
                    yield sink.take()
    yield sink.take()


# Held only for the renames of a swap and for taking a snapshot (links, no copying): a reader's snapshot is then
# wholly the old directory or wholly the new one. A directory cannot be exchanged by one portable rename.
_SWAP_LOCK = threading.Lock()


def link_or_copy(src: str | Path, dst: str | Path) -> None:
    """A hard link of src at dst, or a copy where the file system has none (or src is on another one). The copy
    is written beside dst and renamed onto it: an entry already at dst (a symbolic link planted there) is
    replaced, never written through. A src that is a symbolic link is linked or copied as the link (os.link
    follows it by default: a file swapped for a link during a copy would be the file it points to)."""
    try:
        os.link(src, dst, follow_symlinks=False)
        return
    except (OSError, NotImplementedError):  # NotImplementedError: no linkat
        pass
    tmp = Path(dst).with_name(f".{Path(dst).name}.copy")
    try:
        shutil.copy2(src, tmp, follow_symlinks=False)
        os.replace(tmp, dst)
    finally:
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()


def copy_dir(src: Path, dst: Path, root: Path) -> None:
    """src's files linked (see link_or_copy) into dst, a new folder. LinkError naming it (relative to `root`) if
    src is or holds a symbolic link, and dst is removed: links are copied as links and looked for in the copy,
    so one put in src after a check is not followed either (copytree would copy what it points to)."""
    if src.is_symlink():
        raise link_error(src, root)
    shutil.copytree(src, dst, symlinks=True, copy_function=link_or_copy)
    found = next((Path(top, n) for top, dirs, files in os.walk(dst) for n in dirs + files if Path(top, n).is_symlink()),
                 None)
    if found is not None or src.is_symlink():
        shutil.rmtree(dst, ignore_errors=True)
        raise link_error(src / found.relative_to(dst) if found is not None else src, root)


def stage_dir(src: Path, dst: Path, root: Path) -> Path:
    """src's files linked (see copy_dir) beside dst, for swap_dir to put in dst's place. A run's final/
    becomes the model's directory this way: the weights are stored once, however many runs' versions are
    kept, and stay the model's when the run is deleted. Safe because no file of a model directory is ever
    written in place: save_pretrained and every JSON write replace files by rename (lmlab.files)."""
    tmp = dst.parent / f".{dst.name}.incoming"
    shutil.rmtree(tmp, ignore_errors=True)
    copy_dir(src, tmp, root)
    return tmp


def swap_dir(staged: Path, dst: Path, replaced: Collection[str] | None = None) -> None:
    """Put the staged copy in dst's place, so that dst is never half-written and no snapshot mixes the two.
    With `replaced` (the names the staged copy stands for), every other entry of dst is kept: linked into the
    new directory as it is (links are not followed), at the last moment, so that nothing saved beside a model
    (its steering directions, its sparse autoencoders) is lost when a run gives the model new weights."""
    old = dst.parent / f".{dst.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    with _SWAP_LOCK:
        if dst.exists():
            if replaced is not None:
                for entry in dst.iterdir():
                    if entry.name in replaced or os.path.lexists(staged / entry.name):
                        continue
                    if entry.is_dir() and not entry.is_symlink():
                        shutil.copytree(entry, staged / entry.name, symlinks=True, copy_function=link_or_copy)
                    elif entry.is_symlink():
                        os.symlink(os.readlink(entry), staged / entry.name)
                    else:
                        link_or_copy(entry, staged / entry.name)
            os.replace(dst, old)
        os.replace(staged, dst)
    shutil.rmtree(old, ignore_errors=True)  # a snapshot keeps its own links to the old files


def snapshot_dir(src: Path, dest: Path) -> Path:
    """dest (made here) holding the model files of src as they are at this moment, as hard links taken while no
    swap_dir runs: a reader of dest sees one version of the model, whole, however long it reads, and nothing is
    copied. (Copies where the file system has no hard links.) The caller removes dest."""
    dest.mkdir(parents=True)
    with _SWAP_LOCK:
        for name in model_files(src):
            f = src / name
            (dest / name).parent.mkdir(exist_ok=True)
            try:
                os.link(f, dest / name)
            except FileNotFoundError:  # removed meanwhile (the model deleted): the reader finds it missing
                continue
            except OSError:
                shutil.copy2(f, dest / name)
    return dest


def snapshot_checkpoint(ckpt: Path, dest: Path) -> Path:
    """dest (made here) as a model directory of a checkpoint (RUN_DIR/checkpoints/step-N): its weights and
    the run's tokenizer.json linked (see link_or_copy), config.json the run config's model part. A self-play
    checkpoint holds weights and optimizer state only: its tokenizer.json and config.json are those of the
    run's final model (self-play changes neither). Checkpoint files are never rewritten, only pruned: one
    pruned meanwhile is FileNotFoundError. The caller removes dest."""
    from ..models import ModelConfig  # the workspace module itself needs no torch
    dest.mkdir(parents=True)
    run_dir, own = ckpt.parent.parent, (ckpt / "config.json").is_file()
    files = [ckpt / "model.safetensors", run_dir / "tokenizer.json"] if own else \
        [ckpt / "model.safetensors", run_dir / "final" / "tokenizer.json", run_dir / "final" / "config.json"]
    for f in files:
        if f.is_symlink():
            raise FileNotFoundError(f"{f.name} of {ckpt.name} is a symbolic link")
        link_or_copy(f, dest / f.name)
    template = run_dir / "chat_template.jinja"  # a chat fine-tuning run's (lmlab tune sft): its versions chat too
    if template.is_file() and not template.is_symlink():
        link_or_copy(template, dest / template.name)
    if own:
        run_config = json.loads((ckpt / "config.json").read_text(encoding="utf-8"))
        ModelConfig.from_dict(run_config["model"]).save(dest / "config.json")
    return dest
