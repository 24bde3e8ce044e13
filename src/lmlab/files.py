"""Atomic writes, one helper for the whole package: a file is written under a temporary name beside its
target and renamed over it, so a reader never sees half a file and a crash leaves the old file or none.

    with atomic_path(out / "model.safetensors") as tmp:
        save_model(model, str(tmp))
    atomic_write_text(out / "config.json", text)

Files get the mode open() gives a new file, 0666 less the umask: mkstemp's 0600 (and safetensors' own
temporary file, 0600 too) would survive the rename and leave model folders unreadable by the group or by a
web server serving exports.

A file's data is flushed to the disk (fsync) before the rename, and the folder's entry after it: without that,
a power cut soon after a write can leave the new name pointing at a file with no data on some file systems
(the rename reached the journal, the data had not) -- a finished run's checkpoint among them.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# A temporary file's 12 hex digits: this machine (2), the writing process's pid (6) and chance (4). A process
# killed mid-write (SIGKILL, a power cut) leaves its file; the next write of the same name on this machine
# removes such files of processes that are gone, once they are STALE_S old (a checkpoint of GBs each kill).
STALE_S = 600.0
_HOST = hashlib.sha256(os.uname().nodename.encode() if hasattr(os, "uname") else b"").hexdigest()[:2]


def temp_beside(path: str | Path) -> Path:
    """Create an empty, uniquely named hidden file in `path`'s folder (made if missing); the caller renames
    it into place or removes it. Leftovers of earlier writers of `path` that were killed go first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep(path)
    while True:
        tmp = path.with_name(f".{path.name}.{_HOST}{os.getpid() % 2**24:06x}{secrets.token_hex(2)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # the kernel applies the umask
            return tmp
        except FileExistsError:  # this process's own other temporary file of the same name: draw again
            continue


def temp_dir_beside(path: Path) -> Path:
    """Create an empty hidden folder beside `path` to build it in, named .NAME.<host 2><pid 6>.tmp; leftovers of
    earlier writers of `path` that were killed go first (a model's copy each kill, as temp_beside's files). A
    second one this process makes for the same `path` meanwhile gets a random name, which is never swept."""
    _sweep(path)
    tmp = path.with_name(f".{path.name}.{_HOST}{os.getpid() % 2**24:06x}.tmp")
    try:
        tmp.mkdir()
        return tmp
    except FileExistsError:
        return Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))


def _sweep(path: Path) -> None:
    """Remove the temporary files (temp_beside) and folders (temp_dir_beside) of `path` left by processes of
    this machine that are gone, at least STALE_S old. A name of another form (another machine's, an older
    lmlab's) is left alone, as is a link."""
    prefix, now = f".{path.name}.", None
    try:
        entries = os.scandir(path.parent)
    except OSError:
        return
    with entries:
        for entry in entries:
            name = entry.name
            tag = name[len(prefix):-len(".tmp")] if name.startswith(prefix) and name.endswith(".tmp") else ""
            if len(tag) not in (8, 12) or tag[:2] != _HOST or any(c not in "0123456789abcdef" for c in tag):
                continue
            pid = int(tag[2:8], 16)
            try:
                kind = entry.is_file(follow_symlinks=False) if len(tag) == 12 else entry.is_dir(follow_symlinks=False)
                if not kind or pid == os.getpid() % 2**24 or _alive(pid):
                    continue
                now = now or time.time()
                if now - entry.stat(follow_symlinks=False).st_mtime >= STALE_S:
                    if len(tag) == 12:
                        os.unlink(entry.path)
                    else:
                        shutil.rmtree(entry.path)
            except OSError:
                continue


def _alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill(pid, 0) would send CTRL_C_EVENT there: never swept
        return True
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):  # another user's process, or a platform that cannot ask: assume alive
        return True
    return True


def sync(path: str | Path) -> None:
    """fsync a file or a folder (a folder's entries: a rename into it); where the system cannot (a folder on
    some platforms), nothing."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _mode(tmp: Path) -> int:
    return tmp.stat().st_mode & 0o777


@contextmanager
def atomic_path(path: str | Path, *, new: bool = False) -> Iterator[Path]:
    """A temporary file to write `path` through: renamed over `path` when the block succeeds, removed when it
    fails. `new`: `path` must not exist by then (linked into place, which refuses an existing name): a file
    another process wrote meanwhile, such as a second run started into the same folder, is not replaced."""
    tmp = temp_beside(path)
    mode = _mode(tmp)
    try:
        yield tmp
        os.chmod(tmp, mode)  # a writer may have replaced the file with its own 0600 one
        sync(tmp)
        if not new:
            os.replace(tmp, path)
        else:
            try:
                put_new(tmp, path)
            except FileExistsError:
                raise FileExistsError(f"{path} was written by another process meanwhile (a second run started "
                                      "into the same folder?); nothing was replaced") from None
        sync(tmp.parent)
    finally:
        tmp.unlink(missing_ok=True)


def put_new(tmp: str | Path, path: str | Path) -> None:
    """Put the written file `tmp` in place as `path`, which must not exist: FileExistsError, and nothing replaced,
    where it does (a file another process wrote meanwhile). `tmp` stays for the caller to remove."""
    try:
        os.link(tmp, path)  # refuses an existing name
    except FileExistsError:
        raise
    except OSError:  # no hard links there (vfat, some network mounts): claim the name, then rename over
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(path)  # the empty name claimed above, not a file of someone else's
            raise


def fix_modes(folder: str | Path) -> None:
    """Give every file under `folder`, a temporary folder about to be renamed into place, the mode of a new
    file there (some writers, safetensors among them, leave 0600)."""
    probe = temp_beside(Path(folder) / "mode")
    mode = _mode(probe)
    probe.unlink()
    for path in Path(folder).rglob("*"):
        if path.is_file() and not path.is_symlink():
            os.chmod(path, mode)
            sync(path)  # each file's data on the disk before the folder is renamed into place
        elif path.is_dir() and not path.is_symlink():
            sync(path)
    sync(folder)


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _dir_mode(parent: Path) -> int:
    """The mode a folder made in `parent` gets (0777 less the umask; mkdtemp's is 0700)."""
    probe = parent / f".mode.{secrets.token_hex(6)}.tmp"
    os.mkdir(probe)
    try:
        return _mode(probe)
    finally:
        os.rmdir(probe)


def _link_tree(src: Path, dst: Path) -> None:
    """dst: the same files as src, hard-linked (copied where links are not possible): kept across a swap."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    if src.is_dir() and not src.is_symlink():
        shutil.copytree(src, dst, symlinks=True, copy_function=link)
    elif src.is_symlink():
        os.symlink(os.readlink(src), dst)
    else:
        link(str(src), str(dst))


def exchange_paths(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux's renameat2 with RENAME_EXCHANGE, through the C library); False where
    that is not available (another system, an old kernel or C library, a file system without it)."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _move_entries(tmp: Path, out: Path, stale: tuple[str, ...]) -> None:
    """tmp's entries moved into `out` one by one (each a rename), and the `stale` ones it did not produce
    removed: for a folder that cannot itself be renamed (the current folder, or one above it)."""
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


@contextmanager
def staged_dir(out: Path, *, refuse: Path | None = None, stale: tuple[str, ...] = (),
               replace: bool = True) -> Iterator[Path]:
    """Yield an empty temporary folder beside `out`; on success it becomes `out` in one rename, so a reader (or
    a process killed meanwhile) sees the old folder or the whole new one, never a half-made one. Where `out`
    holds files, those the new folder does not replace are kept (hard links into it) but for the `stale` ones
    (a previous model's leftovers must not be read with the new one); the folder keeps its mode. On failure
    `out` is untouched. With replace=False (a new model: the caller refused an existing `out`), a folder that
    holds anything by then, another process's, is not replaced: FileExistsError.

    A link to a folder is written through (its target is the folder replaced; the link stays). The current
    folder, or one above it, cannot be renamed away: there the entries are moved in one by one, as before."""
    out = Path(out)
    if refuse is not None and out.resolve() == Path(refuse).resolve():
        raise ValueError(f"the output folder must differ from the input folder ({out})")
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder")
    out = Path(os.path.abspath(out.resolve() if out.is_symlink() else out))
    cwd = Path.cwd()
    in_place = out == cwd or out in cwd.parents
    if in_place:
        out.mkdir(parents=True, exist_ok=True)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(out / out.name if in_place else out)
    aside: Path | None = None
    swapped = False
    try:
        yield tmp
        fix_modes(tmp)
        if in_place:
            _move_entries(tmp, out, stale)
            sync(out)
            return
        os.chmod(tmp, out.stat().st_mode & 0o7777 if out.is_dir() else _dir_mode(out.parent))
        produced = {entry.name for entry in tmp.iterdir()}
        if replace and out.is_dir() and any(out.iterdir()):
            for entry in out.iterdir():
                if entry.name not in produced and entry.name not in stale:
                    _link_tree(entry, tmp / entry.name)
            if exchange_paths(tmp, out):  # the new folder is `out` and the old one `tmp`, in one step
                sync(out.parent)
                return
            aside = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.rename(out, aside / "old")  # elsewhere: two renames, the only moment without `out`
        try:
            os.rename(tmp, out)  # replaces an empty folder; refuses one that holds anything
            swapped = True
            sync(out.parent)
        except OSError as exc:
            if aside is not None:
                os.rename(aside / "old", out)  # the old folder back where it was
            if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                raise FileExistsError(f"{out} was made by another process meanwhile; nothing was replaced") from exc
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and (swapped or not (aside / "old").exists()):  # never the only copy left
            shutil.rmtree(aside, ignore_errors=True)


# Bytes in one path component on Linux (ext4, XFS, Btrfs) and macOS (APFS); a folder made with staged_dir is first
# named .NAME.XXXXXXXX.tmp beside its place, 14 bytes more.
NAME_MAX = 255
COMPONENT_BYTES = NAME_MAX - len("..XXXXXXXX.tmp")
# the longest file name temp_beside can put a temporary beside: .NAME.<host 2><pid 6><random 4>.tmp
FILE_NAME_BYTES = NAME_MAX - len(f"..{_HOST}{0:06x}{0:04x}.tmp")


def check_component(name: str, what: str) -> str:
    """`name` if it is one plain folder name to make under another (MODEL/sae/NAME), else ValueError saying why:
    a separator, "..", a NUL or a leading dot ("../../x" was a folder beside the model; ".x" one that lists skip),
    or more UTF-8 bytes than a file name holds."""
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{what} must not be empty")
    if "/" in name or "\\" in name or "\x00" in name:
        raise ValueError(f"{what} {name!r} must be one folder name, without a path separator or NUL")
    if name.startswith("."):
        raise ValueError(f"{what} {name!r} must not start with '.'")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > COMPONENT_BYTES:
        raise ValueError(f"{what} is {size} bytes in UTF-8, longer than the limit of {COMPONENT_BYTES} (a file name "
                         f"holds {NAME_MAX}, less the temporary name's)")
    return name


def refuse_nonempty(out: Path) -> None:
    """FileExistsError if the folder `out` holds anything: what a user made there is replaced only when asked."""
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty; replace what it holds with --force (overwrite=True "
                              "in Python), or choose another folder")


def refuse_existing(path: Path) -> None:
    """FileExistsError if the file `path` exists (a link too): a user's file is replaced only when asked."""
    if path.exists() or path.is_symlink():
        raise FileExistsError(f"{path} exists; replace it with --force (overwrite=True in Python), or choose another "
                              "name")


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB blocks: how a run records the weights it started from."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
