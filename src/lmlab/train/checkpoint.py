"""Checkpoint directories, shared by the trainer and the labs' own loops (text self-play):

    RUN_DIR/checkpoints/step-N/   written as checkpoints/.tmp-step-N and renamed, so a crash mid-write leaves
                                  the previous checkpoint as the latest complete one; the last K kept
    RUN_DIR/metrics.jsonl         lines after the checkpoint a run resumes from are dropped (logged again)

RNG states travel in state.json as base64 text, and Ctrl-C (SIGINT) or SIGTERM becomes a request to stop
after the current step, so that a checkpoint is written between steps, never in the middle of one.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text, exchange_paths, fix_modes


def b64(state: torch.Tensor) -> str:
    """A byte tensor (torch.get_rng_state(), Generator.get_state()) as JSON-able text."""
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def unb64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def checkpoint_step(checkpoint: str | Path) -> int:
    """The step a checkpoint directory (`.../checkpoints/step-N`) was saved at."""
    return int(Path(checkpoint).name.rsplit("step-", 1)[1])


def checkpoints(run_dir: str | Path) -> list[Path]:
    """RUN_DIR/checkpoints/step-N folders, oldest first. A `.old-step-N` whose step-N is missing (a save of the
    same step killed between its two renames, where the file system cannot swap folders) counts as step-N."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = {checkpoint_step(p): p for p in root.glob("step-*") if p.name[len("step-"):].isdigit()}
    for p in root.glob(".old-step-*"):
        if p.name[len(".old-step-"):].isdigit():
            found.setdefault(checkpoint_step(p), p)
    return [found[k] for k in sorted(found)]


def mismatch(path: str | Path, what: str, missing: Any, unexpected: Any) -> ValueError:
    """A weights file whose tensors are not the model's (safetensors' load_model gives the names as sets)."""
    return ValueError(f"{path} does not match {what}: missing {sorted(missing)[:3]}, "
                      f"unexpected {sorted(unexpected)[:3]}")


def checkpoint_model(checkpoint: str | Path, adapt: Callable[..., Any] | None = None) -> Any:
    """The model of checkpoints/step-N in eval mode, on the CPU (its config.json says which). A LoRA run's
    checkpoint holds the frozen weights beside the adapters: `adapt(model, lora_section, checkpoint)` (its
    config.json's `lora` section; tune.lora.checkpoint_adapters) puts them on as the run had them before the
    weights are read and returns what merges them after, so the model is the one final/ would have been at that
    step. Without `adapt`, such a checkpoint is refused."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    from ..models import ModelConfig, Transformer
    from ..models.io import require_size, stored_values
    path = Path(checkpoint)
    saved = json.loads((path / "config.json").read_text(encoding="utf-8"))
    config = ModelConfig.from_dict(saved["model"])
    require_size(config, stored_values(path / "model.safetensors"), path / "config.json")
    model = Transformer(config)
    with safe_open(str(path / "model.safetensors"), framework="pt") as f:
        lora = any(".lora_" in k for k in f.keys())
    merge = None
    if lora:
        if adapt is None or not isinstance(saved.get("lora"), dict):
            raise ValueError(f"{path} is a checkpoint of a LoRA run (adapters beside the frozen weights)"
                             + (" whose config.json has no lora section to put them on with" if adapt else "")
                             + ": evaluate the run's final/")
        merge = adapt(model, saved["lora"], path)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if missing or unexpected:
        raise mismatch(path, "its config", missing, unexpected)
    if merge is not None:
        merge(model)
    return model.eval()


def no_checkpoint(run_dir: str | Path) -> str:
    """What a resume that finds no checkpoint says: why a run may have none and what to do, or that the folder
    is no run at all (a typo in --out must not be told to delete a folder)."""
    out = Path(run_dir)
    if not (out / "config.json").is_file():
        return f"no checkpoint to resume from in {out / 'checkpoints'}: {out} is not a run folder (no config.json)"
    return (f"no checkpoint to resume from in {out / 'checkpoints'}: the run stopped before its first checkpoint "
            "(--save-every); start it again in a new folder, or delete this one")


def resumed_model(run_dir: str | Path, model: dict[str, Any]) -> Any:
    """The Transformer that a run's config.json (its `model` section) describes, for a resume: its size is checked
    against the last checkpoint's weights before it is allocated."""
    from ..models import ModelConfig, Transformer
    from ..models.io import require_size, stored_values
    config, last = ModelConfig.from_dict(model), latest_checkpoint(run_dir)
    if last is None:
        raise ValueError(no_checkpoint(run_dir))
    require_size(config, stored_values(last / "model.safetensors"), Path(run_dir) / "config.json")
    return Transformer(config)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    return (checkpoints(run_dir) or [None])[-1]


# What the Trainer writes into a new run's folder (a user's file of that name would be replaced, appended to or
# deleted): the run files, and what its callbacks and LoRA write. Not RUN_DIR/phase.json, a progress note that
# `lmlab train`'s recipe writes before its checks: a start that failed there must not block the retry.
RUN_FILES = ("config.json", "metrics.jsonl", "resumes.jsonl", "samples.jsonl", "drift.json", "tracker.json",
             "tensorboard", "adapter")


def run_folder(out: str | Path) -> Path:
    """A run's folder as given to the library: "" (which Path reads as the current folder, where a run would
    write among whatever is there) is refused, as the CLI refuses --out ''."""
    if not str(out).strip():
        raise ValueError("the run's folder (out) is empty; name the folder to write the run to")
    if Path(out).exists() and not Path(out).is_dir():  # it said "[Errno 17] File exists" once it got there
        raise ValueError(f"{out} is a file, not a folder; name a folder to write the run to")
    if Path(out).is_symlink() and not Path(out).exists():  # "[Errno 2] No such file or directory: 'OUT/.lock'"
        raise ValueError(f"{out} is a symbolic link to a folder that does not exist; name a folder to write the run to")
    return Path(out)


def refuse_existing_run(run_dir: str | Path, overwrites: tuple[str, ...] = RUN_FILES, command: str = "lmlab train"
                        ) -> None:
    """ValueError if `run_dir` holds another run (checkpoints or a final model), or any of `overwrites`, the
    files a new run writes there (a model directory's config.json, a user's own metrics.jsonl): nothing there
    is overwritten without asking. A new run over another would prune its checkpoints with its own, and a later
    resume could load its weights and save them as the new final/. The one guard of `lmlab train`, `lmlab demo`,
    the tune commands and the library's train(); the callers that write more before the Trainer name those
    too, and the `command` that resumes their runs."""
    out = Path(run_dir)
    # a checkpoint a resume would load: the temporary folder of a first save that was killed is none, and a
    # "resume it" here met "no checkpoint to resume from" there
    if (out / "final").exists() or checkpoints(out):
        raise ValueError(f"{out} already holds a run; resume it ({command} --out {out} --resume) or choose "
                         "another folder")
    if os.environ.get("RANK", "0") not in ("", "0"):  # a DDP rank but the first would find rank 0's own new files
        return                                        # there: rank 0 checks them (torchrun stops the rest if it exits)
    held = [name for name in overwrites if (out / name).exists() or (out / name).is_symlink()]
    if held:
        raise ValueError(f"{out} holds {held[0]}, which a new run would overwrite; choose a new folder for the run "
                         "(if it is what a run stopped before its first checkpoint left, delete the folder)")


RUN_LOCK = ".lock"  # held (flock) by the process that trains the run


# the run folders this process holds, per thread: (folder, thread) -> [file descriptor, holders]
_held: dict[tuple[Path, int], list[int]] = {}


def lock_run(run_dir: str | Path) -> tuple[Path, int] | None:
    """Hold the run folder for this process: an exclusive flock on RUN/.lock, given up by unlock_run (or when the
    process ends: a killed run leaves no stale lock). ValueError when another process (or another thread of this
    one) holds it: two processes training into one folder wrote each other's steps into metrics.jsonl and
    renamed each other's checkpoints away. The thread that holds it may take it again (`lmlab train` claims its
    folder before the tokenizer and the data, the Trainer then before the first step): one unlock_run each.
    None where the system has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        return None
    key = (Path(run_dir).resolve(), threading.get_ident())
    if key in _held:
        _held[key][1] += 1
        return key
    try:  # never through a link: the web app deletes runs holding this lock, and must not touch a file elsewhere
        fd = os.open(Path(run_dir) / RUN_LOCK, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
    except OSError as exc:
        if not (Path(run_dir) / RUN_LOCK).is_symlink():
            raise
        raise ValueError(f"{Path(run_dir) / RUN_LOCK} is a symbolic link, not the run's lock file; remove it") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise ValueError(f"{run_dir} is being trained by another process; wait for it to end (or stop it) before "
                         "resuming it or starting a run there") from None
    _held[key] = [fd, 1]
    return key


def unlock_run(key: tuple[Path, int] | None) -> None:
    """Give up one hold lock_run returned (the flock goes with the last)."""
    if key is None or key not in _held:
        return
    held = _held[key]
    held[1] -= 1
    if held[1] == 0:
        del _held[key]
        os.close(held[0])


def claim_run(run_dir: str | Path, overwrites: tuple[str, ...], command: str = "lmlab train"
              ) -> tuple[tuple[Path, int] | None, bool]:
    """(lock_run's key, whether this call made the folder): RUN_DIR made if missing and held before the first
    file of a new run is written, then checked again for what refuse_existing_run refuses. Two `lmlab train`
    into one folder both passed the first check and wrote each other's tokenizer and data before the Trainer's
    lock refused one; the one refused then deleted the folder it thought it had made, with the other's data."""
    out = Path(run_dir)
    try:
        out.mkdir(parents=True)
        created = True
    except FileExistsError:
        created = False
    key = lock_run(out)
    try:
        refuse_existing_run(out, overwrites, command)  # what another process wrote before it let go
    except BaseException:
        unlock_run(key)
        raise
    return key, created


def write_checkpoint(run_dir: str | Path, step: int, fill: Callable[[Path], None], keep_last: int = 0,
                     keep: float | None = None) -> Path:
    """RUN_DIR/checkpoints/step-N: `fill(folder)` writes the files into a temporary folder that is then renamed,
    and nothing half-written survives a failure. Keeps the last `keep_last` checkpoints (0: all), and the one
    of step `keep`."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        fix_modes(tmp)
        if final.exists():  # the same step saved again (resumed and stopped at once): replace it, never leaving
            if not exchange_paths(tmp, final):  # a moment without it (with keep_last 1, the run's only one)
                old = root / f".old-step-{step}"  # elsewhere: found by checkpoints() until the new one is in
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old)
        else:
            shutil.rmtree(root / f".old-step-{step}", ignore_errors=True)  # a killed swap's: superseded now
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if keep_last:
        for old_checkpoint in checkpoints(run_dir)[:-keep_last]:
            if checkpoint_step(old_checkpoint) != keep:
                shutil.rmtree(old_checkpoint, ignore_errors=True)
    return final


def trim_metrics(path: str | Path, step: int, *, rewrite: bool = True) -> list[dict[str, Any]]:
    """The metrics lines of steps <= `step`: those after the checkpoint a run resumes from will be logged again.
    With `rewrite` the file keeps only them (atomically). A line that does not parse (cut short by a kill) is
    dropped with the rest: it was being written after the last line the checkpoint covers."""
    path = Path(path)
    kept: list[tuple[str, dict[str, Any]]] = []
    for line in path.read_text(encoding="utf-8").splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if row["step"] <= step:
            kept.append((line, row))
    if rewrite:
        atomic_write_text(path, "".join(line + "\n" for line, _ in kept))
    return [row for _, row in kept]


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM sets `requested`: the loop finishes its step, saves a checkpoint and stops (the
    web app's cancel and a cluster's preemption notice both arrive this way). A second signal raises
    KeyboardInterrupt at once. Handlers go in only on the main thread (Python's rule) and come out on exit."""

    def __init__(self, say: Callable[[str], None] | None = None) -> None:
        self.requested = False
        self._say = say
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self._say:
            self._say(f"\n{signal.Signals(signum).name}: stopping after this step (again to stop now)")

    def install(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self

    def restore(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}

    def __enter__(self) -> StopOnSignal:
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.restore()
