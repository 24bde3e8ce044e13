"""files.staged_dir, a model folder made or replaced as a whole: a process killed at any rename leaves the old
folder or the whole new one, never a half-made one (a killed `lmlab quantize` left config and weights without
a tokenizer, a killed `export hf --force` new weights beside the old tokenizer); a folder that holds files keeps
those the new one does not replace, less the stale ones; two writers of one new folder cannot both win."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lmlab.files import staged_dir

ROOT = Path(__file__).resolve().parents[1]

# a child that writes a 3-file folder through staged_dir and is killed (os._exit, as SIGKILL: no cleanup) just
# before its N-th rename of any kind
CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, sys.argv[3])
    from pathlib import Path
    from lmlab import files
    n, calls = int(sys.argv[2]), [0]
    def dying(real):
        def call(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                os._exit(137)
            return real(*args, **kwargs)
        return call
    os.rename, os.replace = dying(os.rename), dying(os.replace)
    if hasattr(files, "exchange_paths"):
        files.exchange_paths = dying(files.exchange_paths)
    with files.staged_dir(Path(sys.argv[1]), stale=("stale.txt",)) as tmp:
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (tmp / name).write_text("new " + name)
""")


def _state(out: Path) -> dict[str, str] | None:
    return {p.name: p.read_text() for p in sorted(out.iterdir())} if out.is_dir() else None


@pytest.mark.parametrize("existing", [False, True], ids=["new folder", "replaced (--force)"])
def test_a_kill_at_any_rename_leaves_the_old_folder_or_the_whole_new_one(tmp_path, existing):
    new = {n: "new " + n for n in ("config.json", "model.safetensors", "tokenizer.json")}
    for n in range(1, 6):
        out = tmp_path / f"run{n}" / "model"
        old = None
        if existing:
            out.mkdir(parents=True)
            old = {"config.json": "old", "model.safetensors": "old", "tokenizer.json": "old", "notes.txt": "mine",
                   "stale.txt": "old"}
            for name, text in old.items():
                (out / name).write_text(text)
        r = subprocess.run([sys.executable, "-c", CHILD, str(out), str(n), str(ROOT / "src")], capture_output=True,
                           timeout=60)
        assert r.returncode in (0, 137), r.stderr.decode()
        after = _state(out)
        whole_new = {**new, "notes.txt": "mine"} if existing else new
        assert after in ((old, whole_new) if existing else (None, whole_new)), (n, after)


def test_what_the_new_folder_does_not_replace_stays_but_the_stale(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    for name in ("a.txt", "mine.txt", "stale.txt"):
        (out / name).write_text("old " + name)
    (out / "sub").mkdir()
    (out / "sub" / "x").write_text("kept")
    with staged_dir(out, stale=("stale.txt",)) as tmp:
        (tmp / "a.txt").write_text("new")
    assert sorted(os.listdir(out)) == ["a.txt", "mine.txt", "sub"] and (out / "sub" / "x").read_text() == "kept"
    assert (out / "a.txt").read_text() == "new" and (out / "mine.txt").read_text() == "old mine.txt"
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no staging folder left
    assert out.stat().st_mode & 0o777 == 0o777 & ~_umask()


def test_two_writers_of_one_new_folder_cannot_both_win(tmp_path):
    out = tmp_path / "q"
    with pytest.raises(FileExistsError, match="was made by another process meanwhile"):
        with staged_dir(out, replace=False) as tmp:  # a new model: the caller found no `out`
            (tmp / "model.safetensors").write_text("mine")
            out.mkdir()  # the other process, first
            (out / "model.safetensors").write_text("theirs")
    assert (out / "model.safetensors").read_text() == "theirs"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("swap", [True, False], ids=["folders swapped", "two renames"])
def test_a_checkpoint_saved_again_at_its_step_is_never_missing(tmp_path, monkeypatch, swap):
    """The same step saved twice (a resume stopped at once): the old step-N was deleted before the new one was
    renamed in, so a kill between left none (with --keep-last 1, the run's only checkpoint). Where folders
    cannot be swapped in one step, a kill between the two renames leaves .old-step-N, which counts as step-N."""
    from lmlab import files
    from lmlab.train import checkpoint
    from lmlab.train.checkpoint import latest_checkpoint, write_checkpoint

    if not swap:
        monkeypatch.setattr(checkpoint, "exchange_paths", lambda a, b: False)
    assert files.exchange_paths is not None
    write_checkpoint(tmp_path, 5, lambda d: (d / "model.safetensors").write_text("first"), keep_last=1)
    calls = []

    def replace(a, b):  # a kill at the second rename
        calls.append((a, b))
        if len(calls) == 2:
            raise KeyboardInterrupt
        os.rename(a, b)
    monkeypatch.setattr(os, "replace", replace)
    try:
        write_checkpoint(tmp_path, 5, lambda d: (d / "model.safetensors").write_text("second"), keep_last=1)
    except KeyboardInterrupt:
        pass
    last = latest_checkpoint(tmp_path)
    assert last is not None and (last / "model.safetensors").read_text() in ("first", "second")
    assert len(calls) == (0 if swap else 2)  # the swap needs no rename of either folder
    write_checkpoint(tmp_path, 6, lambda d: (d / "model.safetensors").write_text("third"), keep_last=1)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["step-6"]  # pruned like any other


def test_a_new_file_is_not_written_over_one_made_meanwhile(tmp_path):
    """Two `tune sft` runs started into one folder: both passed the check for a run there, and the second's
    data copy replaced the first's (whose resume then trained on the other data). A run's copy is now linked
    into place, which refuses a name that exists."""
    from lmlab.files import atomic_path

    target = tmp_path / "data.jsonl"
    with pytest.raises(FileExistsError, match="was written by another process meanwhile"):
        with atomic_path(target, new=True) as tmp:
            tmp.write_text("second run's data")
            target.write_text("first run's data")  # the other process, first
    assert target.read_text() == "first run's data" and [p.name for p in tmp_path.iterdir()] == ["data.jsonl"]
    with atomic_path(tmp_path / "other.jsonl", new=True) as tmp:
        tmp.write_text("x")
    assert (tmp_path / "other.jsonl").read_text() == "x" and (tmp_path / "other.jsonl").stat().st_mode & 0o777 \
        == 0o666 & ~_umask()


def test_a_link_the_current_folder_and_the_folders_mode(tmp_path, monkeypatch):
    """A link to a folder is written through (the link stays, its target is replaced, no stale file left); the
    current folder, which cannot be renamed away, gets the entries moved in; a replaced folder keeps its mode."""
    (tmp_path / "v3").mkdir()
    (tmp_path / "v3" / "stale.txt").write_text("old")
    (tmp_path / "current").symlink_to("v3")
    with staged_dir(tmp_path / "current", stale=("stale.txt",)) as tmp:
        (tmp / "model.safetensors").write_text("new")
    assert (tmp_path / "current").is_symlink() and os.readlink(tmp_path / "current") == "v3"
    assert sorted(os.listdir(tmp_path / "v3")) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "v3"]  # nothing left beside them

    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("mine")
    monkeypatch.chdir(here)
    with staged_dir(Path(".")) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(os.listdir(here)) == ["config.json", "mine.txt"]

    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    os.chmod(private, 0o700)
    (private / "a").write_text("old")
    with staged_dir(private) as tmp:
        (tmp / "a").write_text("new")
    assert private.stat().st_mode & 0o777 == 0o700 and (private / "a").read_text() == "new"



def _two_writers_one_killed(script: str) -> tuple[list[subprocess.Popen], Path, Path]:
    """Two processes that each print the temporary path they write through and wait; the first is killed (-9)."""
    import signal

    import lmlab.files as files
    env = {**os.environ, "PYTHONPATH": str(Path(files.__file__).parents[1])}
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]
    killed, live = (Path(p.stdout.readline().strip()) for p in procs)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait(10)
    return procs, killed, live


def test_a_killed_writers_temporary_file_goes_with_the_next_write(tmp_path, monkeypatch):
    """A process killed inside atomic_path left its hidden temporary file for good (a half-written checkpoint
    of GBs at each kill). The next write of the same name on this machine removes those of processes that are
    gone (once STALE_S old); a live writer's, another machine's, a folder and other names are left alone."""

    import lmlab.files as files
    target = tmp_path / "model.safetensors"
    script = textwrap.dedent(f"""
        import sys, time
        from lmlab.files import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    procs, killed, live = _two_writers_one_killed(script)
    try:
        gone = f"{procs[0].pid % 2**24:06x}"  # the killed writer's pid: these differ from its file but in what
        other_host = target.with_name(f".{target.name}.{'00' if files._HOST != '00' else '01'}{gone}1234.tmp")
        folder = target.with_name(f".{target.name}.{files._HOST}{gone}abcd.tmp")
        other_host.write_bytes(b"x")
        folder.mkdir()
        files.atomic_write_text(target, "new")  # not STALE_S old yet: kept
        assert killed.exists()
        monkeypatch.setattr(files, "STALE_S", 0.0)
        files.atomic_write_text(target, "newer")
        assert not killed.exists() and live.exists() and other_host.exists() and folder.is_dir()
        assert target.read_text() == "newer"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)



def test_a_killed_writers_staged_folder_goes_with_the_next_write(tmp_path, monkeypatch):
    """A process killed inside staged_dir (export, quantize, merge, lora merge, data filter and dedup) left its
    hidden folder, a whole model's copy, for good (a kill -9 review: 69 MB a kill). The next staged write of the
    same folder removes those of writers that are gone (once STALE_S old); a live writer's stays."""

    import lmlab.files as files
    out = tmp_path / "export"
    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from lmlab.files import staged_dir
        with staged_dir(Path({str(out)!r})) as tmp:
            (tmp / "model.safetensors").write_bytes(b"half" * 1000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    procs, killed, live = _two_writers_one_killed(script)
    try:
        assert killed.is_dir() and live.is_dir() and killed.parent == live.parent == tmp_path
        monkeypatch.setattr(files, "STALE_S", 0.0)
        with files.staged_dir(out) as tmp:
            (tmp / "config.json").write_text("{}")
        assert not killed.exists() and live.is_dir() and (out / "config.json").read_text() == "{}"
    finally:
        for p in procs:
            p.kill()
            p.wait(10)

def test_data_reaches_the_disk_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """Nothing was fsync'ed: after a power cut a renamed file could have its name and no data. Now a file is
    synced before it is renamed into place, and its folder after; a staged folder's files and folders too."""
    import lmlab.files as files
    events = []
    real_fsync, real_replace, real_rename = os.fsync, os.replace, os.rename
    monkeypatch.setattr(os, "fsync", lambda fd: events.append(("sync", os.fstat(fd).st_ino)) or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append(("rename", os.stat(a).st_ino)) or real_replace(a, b))
    monkeypatch.setattr(os, "rename", lambda a, b: events.append(("rename", os.stat(a).st_ino)) or real_rename(a, b))
    files.atomic_write_text(tmp_path / "a.txt", "x")
    ino, folder = (tmp_path / "a.txt").stat().st_ino, tmp_path.stat().st_ino
    assert events == [("sync", ino), ("rename", ino), ("sync", folder)], events
    events.clear()
    with files.staged_dir(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        (tmp / "c.json").write_text("{}")
    out = tmp_path / "out"
    synced = [i for kind, i in events if kind == "sync"]
    inodes = {p.stat().st_ino for p in (out, out / "sub", out / "sub" / "w.bin", out / "c.json")}
    assert events.index(("rename", out.stat().st_ino)) == len(events) - 2 and events[-1] == ("sync", folder)
    assert set(synced[:-1]) == inodes, events


def test_put_new_without_hard_links_leaves_no_empty_claim_when_the_rename_fails(tmp_path, monkeypatch):
    """Where os.link is refused (vfat), the name is claimed by an empty file, then renamed over: a rename that
    failed left that empty file under the name (an empty tokens.bin, an empty data copy)."""
    import errno
    import os

    from lmlab.files import put_new

    tmp, path = tmp_path / "tmp", tmp_path / "tokens.bin"
    tmp.write_bytes(b"data")

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "link", no_link)
    monkeypatch.setattr(os, "replace", full)
    with pytest.raises(OSError, match="No space"):
        put_new(tmp, path)
    assert not path.exists() and tmp.read_bytes() == b"data"
    monkeypatch.undo()
    path.write_bytes(b"theirs")
    with pytest.raises(FileExistsError):
        put_new(tmp, path)
    assert path.read_bytes() == b"theirs"
