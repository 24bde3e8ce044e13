"""Atomic writes, one helper for the whole package: a file is written under a temporary name beside its
target and renamed over it, so a reader never sees half a file and a crash leaves the old file or none.

    with atomic_path(out / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    atomic_write_text(out / "config.json", text)

Files get the mode open() gives a new file, 0666 less the umask: mkstemp's 0600 (and safetensors' own
temporary file, 0600 too) would survive the rename and leave model folders unreadable by the group or by a
web server serving exports.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def temp_beside(path: str | Path) -> Path:
    """Create an empty, uniquely named hidden file in `path`'s folder (made if missing); the caller renames
    it into place or removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
    return tmp


def _mode(tmp: Path) -> int:
    return tmp.stat().st_mode & 0o777


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary file to write `path` through: renamed over `path` when the block succeeds, removed when it
    fails."""
    tmp = temp_beside(path)
    mode = _mode(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file with its own 0600 one
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fix_modes(folder: str | Path) -> None:
    """Give every file under `folder`, a temporary folder about to be renamed into place, the mode of a new
    file there (some writers, safetensors among them, leave 0600)."""
    probe = temp_beside(Path(folder) / "mode")
    mode = _mode(probe)
    probe.unlink()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextmanager
def staged_dir(out: Path, *, refuse: Path | None = None, stale: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success its entries replace those of `out`
    (rename, so readers never see half a file) and the `stale` entries it did not produce are removed
    (a previous model's leftovers must not be read with the new one); on failure `out` is untouched."""
    out = Path(out)
    if refuse is not None and out.resolve() == Path(refuse).resolve():
        raise ValueError(f"the output folder must differ from the input folder ({out})")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        fix_modes(tmp)
        out.mkdir(exist_ok=True)
        produced = {entry.name for entry in tmp.iterdir()}
        for entry in sorted(tmp.iterdir()):
            target = out / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
        for name in stale:
            target = out / name
            if name not in produced:
                if target.is_dir() and not target.is_symlink():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def refuse_nonempty(out: Path) -> None:
    """FileExistsError if the folder `out` holds anything: what a user made there is replaced only when asked."""
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; replace what it holds with --force (overwrite=True "
                              "in Python), or choose another folder")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks: how a run records the weights it started from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
