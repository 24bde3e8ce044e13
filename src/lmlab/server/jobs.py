"""The job supervisor: every run is its own OS process (`lmlab train`, `lmlab selfplay text` for a self-play
run, or `lmlab lab facts EXPERIMENT` / `lmlab selfplay azr` for a lab experiment), never a thread of the web
server and never the model that serves generation.

One supervisor thread, every `poll_s` seconds:
  * tails each live run's `metrics.jsonl` into the database (the UI's charts and SSE read from there);
  * notices exits: 0 -> completed (the run's `final/` becomes the model's directory; for self-play, a new
    model of the workspace, indexed with its origin, which a later training run from scratch clears: its
    weights no longer come from that self-play); killed by a signal or interrupted -> interrupted; a
    cancel request -> cancelled; any other code -> failed, with the child's own `lmlab: error: ...` line
    as the reason. An experiment makes no model: exit 0 with a report.html in its run directory is
    completed, and nothing is registered, unless it was cancelled or stopped with the server (the facts
    lab's training stops early on SIGINT and may still report on the cut-short run). A model directory is
    copied beside its place first and swapped in under the lock only then (workspace.swap_dir), so a large
    copy holds up no request, and a reader sees the old version or the new one, whole;
  * sends SIGINT to its runs whose cancel was asked (through this server or another sharing the database);
  * starts queued runs, first in first out, while fewer than `max_jobs` are running. A run is claimed by a
    conditional UPDATE (status still queued) before anything is launched, so two servers sharing one
    database (PostgreSQL, and a workspace on a shared file system) launch each run once.

Cancel sends SIGINT: training and self-play both finish the step (iteration) under way, write a checkpoint
and exit, so a cancelled run can be resumed. Resume relaunches the run's command (built by commands.py) with
`--resume`: `lmlab train --resume --out RUN_DIR`, or the `lmlab selfplay text ... --out RUN_DIR` it was
started with (the same flags, prompts in RUN_DIR/prompts.json) plus `--resume`, which checks that they match
the run's config.json. A self-play run stopped before final/ leaves no model behind until it is resumed and
completes; a cancel that arrives after final/ is written comes too late (the process exits 0 and the run
completes with its new model).

A run's process is known by its pid and its start time (`process_start`: a pid alone may be reused), and a
run by the server that launched it (`Supervisor.owner`: host, pid and start time of the server). On
start-up, runs still called running whose server is gone (killed on this machine) are taken over: a process
that outlived its server is adopted, watched until it exits and then finished as its own server would have
(its exit status went to no one, so its files tell: a complete final/ of this launch, or report.html, is a
finished run; otherwise it stopped); a process that ended while no server ran is finished so at once. A
graceful stop interrupts instead (shutdown asks each child to checkpoint and exit). Runs of a live server,
and of another machine, are left to their own server.

A lab experiment writes results.json, PNG plots and report.html into its run directory and keeps no
checkpoints: a cancel (SIGINT) ends it, it cannot be resumed, and a stopped one is started again (restart: a new
run of the same request, as is any run that stopped before its first checkpoint; routers/runs.py).
An evaluation (`lmlab eval` or `lmlab compare`, commands.eval_command) is alike: its results file
(commands.product) is what it makes. A run that derives a model from others in one pass (`lmlab quantize`:
commands.DERIVED) keeps no checkpoints either; its RUN_DIR/model becomes the new model params.new_model, as a
self-play run's policy does.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from ..files import atomic_write_text
from ..models import ModelConfig
from ..tokenizers import Tokenizer
from ..train import checkpoint_step, latest_checkpoint
from .commands import DERIVED, DERIVED_DIR, STOP_FILE, child_argv, product, run_command
from .db import STOPPED, Database
from .workspace import (
    MODEL_FILES,
    SPEED_FILE,
    LinkError,
    NotAFile,
    Workspace,
    copy_dir,
    no_links,
    stage_dir,
    swap_dir,
)

log = logging.getLogger("lmlab.server")

KILL_AFTER_S = 30.0  # a child that has not exited this long after SIGINT gets SIGKILL
# What a run's process is called when it stops early. Training and self-play answer SIGINT alike (checkpoint
# and exit), so a stopped run of either kind says the same about what is left and how to continue; a lab
# experiment keeps no checkpoints, so a stopped one is not resumable and is started again.
PROCESS_NAMES = {"train": "training", "selfplay": "self-play", "experiment": "lab experiment", "eval": "evaluation",
                 "quantize": "quantization", "merge": "merge", "tune": "fine-tuning"}
RESUME = "resume to continue from the last checkpoint"
UNWATCHED = "its process ended while no server was watching it"
NOT_RESUMABLE = "this {} keeps no checkpoints and cannot be resumed; start it again"  # PROCESS_NAMES[kind]
NO_CHECKPOINT = "it stopped before its first checkpoint; start it again"


def process_start(pid: int) -> str | None:
    """What tells process `pid` from a later one given the same pid: this boot's id and the process's start in
    clock ticks since boot (field 22 of /proc/PID/stat), exact and unmoved by changes of the wall clock
    (psutil's create_time adds the wall-clock boot time, which NTP moves: giampaolo/psutil#2526). None
    without /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    # the command name (field 2) is in parentheses and may hold spaces and ')': count from the last ')'
    return f"{boot}/{int(stat[stat.rindex(b')') + 2:].split()[19])}"


def process_alive(pid: int | None, start: str | None = None, arg: str | None = None) -> bool:
    """Is `pid` a live process (not a zombie) and, given its `start` (process_start), that same process? A run
    recorded without a start (by an older lmlab) is known by `arg`, its run directory, as one whole argument
    of the command line, never a substring of it (`run-1` is in `run-10`). Without /proc: any process `pid`."""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            status = (proc / "status").read_text()
            args = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        if "\nState:\tZ" in status:
            return False
        if start is not None:
            return process_start(pid) == start
        return arg is None or os.fsencode(arg) in args
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


class Adopted(NamedTuple):
    """A run's process that outlived the server that launched it: not our child, so only its liveness is
    known, not its exit status."""
    pid: int
    start: str | None
    arg: str


def _signal_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # the child leads its own session, so its group id is its pid
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class MetricsTail:
    """Reads whole new lines of a metrics.jsonl as it grows. When the file is replaced or shrinks (the
    trainer rewrites it on resume, dropping lines after the checkpoint), it starts over and says so. The file
    is opened as the workspace opens run files: a link planted in the run's folder is a LinkError, a folder or
    a FIFO in its place is NotAFile (neither is read through, nor blocks)."""

    def __init__(self, ws: Workspace, path: Path) -> None:
        self.ws, self.path = ws, path
        self.inode: int | None = None
        self.offset = 0

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        try:
            f = self.ws.open_file(self.path)
        except NotAFile:
            raise
        except FileNotFoundError:
            return [], False
        with f:
            st = os.fstat(f.fileno())
            restart = self.inode is None or st.st_ino != self.inode or st.st_size < self.offset
            if restart:
                self.inode, self.offset = st.st_ino, 0
            if st.st_size == self.offset and not restart:
                return [], False
            f.seek(self.offset)
            data = f.read()
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next read
        self.offset += end
        lines = []
        for raw in data[:end].splitlines():
            if raw.strip():
                try:
                    lines.append(json.loads(raw))
                except json.JSONDecodeError:
                    continue
        return lines, restart


def _error_from_log(ws: Workspace, path: Path, reason_only: bool = False) -> str | None:
    """The latest launch's own one-line reason (`lmlab: error: ...`), else (unless `reason_only`) the log's last
    line. A log.txt that is a link or no file gives none: its lines would be another file's."""
    try:
        with ws.open_file(path) as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except (OSError, ValueError):  # LinkError is a ValueError
        return None
    for ln in reversed(lines):
        if ln.startswith("$ lmlab "):  # the supervisor's line before each launch: older reasons are not this one's
            break
        if ln.startswith("lmlab: error:"):
            return ln[len("lmlab: error:"):].strip()
    return None if reason_only else lines[-1][-500:] if lines else None


def _is_file(ws: Workspace, path: Path) -> bool:
    """Whether `path` is a regular file of the workspace, reached through no link; LinkError if it or a folder
    on its way is one (a planted `report.html -> /elsewhere` is no report of the run's)."""
    try:
        ws.open_file(path).close()
    except OSError:  # missing, NotAFile, a file where a folder should be
        return False
    return True


def finished_model(ws: Workspace, run: dict[str, Any], final: Path) -> dict[str, Any] | None:
    """final/'s training.json when final/ is a whole model directory written by the run's latest launch, else
    None. save_pretrained writes training.json last, so with it the rest is there. A resumed run's final/ may
    still be the previous launch's, at the step it resumed from: this launch's has more steps (resume asks for
    more), except a self-play or fine-tuning run resumed at its last step to save that model again (the same
    model, which could not be registered the first time). LinkError if final/ is or holds a link: what it
    points to is no model of this run's (its training.json went into the database, its folder into models/)."""
    if os.path.lexists(final):
        no_links(final, ws.root)
    try:
        training = json.loads(ws.read_bytes(final / "training.json"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(training, dict) or not all(_is_file(ws, final / f) for f in ("config.json", "model.safetensors")):
        return None
    steps, since = training.get("steps"), run["resumed_from_step"]
    if since is not None and not (isinstance(steps, int) and (
            steps > since or (run["kind"] in ("selfplay", "tune") and steps == since == run["max_steps"]))):
        return None
    return training


def total_steps(run: dict[str, Any], training: dict[str, Any]) -> int | None:
    """The model's steps after `run`: its parent's (step_offset) and its own, so a continued model's count
    goes on from where it was."""
    steps = training.get("steps")
    return (run["step_offset"] or 0) + steps if isinstance(steps, int) else None


def _wait(proc: subprocess.Popen | Adopted, timeout: float) -> bool:
    """Wait up to `timeout` seconds for a run's process to end; whether it did."""
    if isinstance(proc, subprocess.Popen):
        try:
            proc.wait(timeout=max(0.1, timeout))
            return True
        except subprocess.TimeoutExpired:
            return False
    deadline = time.monotonic() + timeout
    while process_alive(*proc):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


class Supervisor:
    def __init__(self, db: Database, workspace: Workspace, *, max_jobs: int = 1, python: str = sys.executable,
                 poll_s: float = 0.5, env: dict[str, str] | None = None) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs ({max_jobs}) must be >= 1")
        self.db, self.ws = db, workspace
        self.max_jobs, self.python, self.poll_s = max_jobs, python, poll_s
        self.env = env or {}
        # who launched a run: this machine, this server's process (pid and start), and this supervisor (two in
        # one process, as in the tests, are two servers)
        self.owner = f"{socket.gethostname()} {os.getpid()} {process_start(os.getpid())} {uuid.uuid4().hex[:8]}"
        self._procs: dict[int, subprocess.Popen | Adopted] = {}
        self._tails: dict[int, MetricsTail] = {}
        self._tail_errors: dict[int, str] = {}  # the error each run's metrics gave, said once
        self._cancel_sent: dict[int, float] = {}
        # One lock for the supervisor's passes and for the API handlers that check names and runs and then
        # act on them (create/delete a model, queue/resume a run): a check cannot be overtaken by another
        # request or by a finishing run registering its model. Re-entrant: handlers call resume/cancel.
        self.lock = threading.RLock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ---- life cycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self.recover()
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="lmlab-supervisor", daemon=True)
        self._thread.start()

    def _orphaned(self, owner: str | None) -> bool:
        """Is the server that launched a run gone? A run of an older lmlab names none (one server then had the
        database). One on another machine cannot be checked from here: its own server takes it back."""
        if not owner:
            return True
        host, pid, start, _ = owner.split(" ")
        return host == socket.gethostname() and not process_alive(int(pid), None if start == "None" else start)

    def recover(self) -> None:
        """Runs left running by a server that is gone: the process of each, if it outlived that server, is
        adopted (watched by tick, finished when it exits); one that ended meanwhile is finished now."""
        for run in self.db.list_runs(status=["running"]):
            if not self._orphaned(run["owner"]) or not self.db.update_run(
                    run["id"], where={"status": "running", "owner": run["owner"]}, owner=self.owner):
                continue  # its server is alive, or another starting server took it first
            adopted = Adopted(run["pid"], run["pid_start"], str(self.ws.run_path(run["id"])))
            if process_alive(*adopted):
                with self.lock:
                    self._procs[run["id"]] = adopted
                log.warning("run %s: its process (pid %s) outlived the server that launched it; watching it",
                            run["id"], run["pid"])
            else:
                self._catch_up(run["id"])
                self._finish(run["id"], None)

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the loop; ask every child to checkpoint and exit; mark them interrupted (resumable)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            for run_id, proc in self._procs.items():
                self._ask_to_stop(run_id, proc.pid)
            deadline = time.monotonic() + timeout
            for run_id, proc in list(self._procs.items()):
                if not _wait(proc, deadline - time.monotonic()):
                    _signal_group(proc.pid, signal.SIGKILL)
                    _wait(proc, KILL_AFTER_S)
                del self._procs[run_id]
                self._catch_up(run_id)
                self._finish(run_id, None if isinstance(proc, Adopted) else proc.returncode, server_stopped=True)
            self._tails.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # the supervisor must outlive any one bad run
                log.exception("supervisor tick failed")
            self._wake.wait(self.poll_s)
            self._wake.clear()

    def wake(self) -> None:
        self._wake.set()

    # ---- one pass ----------------------------------------------------------------------------------

    def tick(self) -> None:
        ended = []
        with self.lock:
            if self._procs:  # cancels asked through any server sharing the database
                for run in self.db.list_runs(status=["running"]):
                    if run["id"] in self._procs and run["cancel_requested"] and run["id"] not in self._cancel_sent:
                        self._ask_to_stop(run["id"], self._procs[run["id"]].pid)
                        self._cancel_sent[run["id"]] = time.monotonic()
            for run_id, proc in list(self._procs.items()):
                # whether it ended is asked before its metrics are read: lines it wrote just before exiting are
                # read now (read first, they were lost with its tail, and the run kept an earlier step's numbers)
                code = None if isinstance(proc, Adopted) else proc.poll()
                gone = code is not None or (isinstance(proc, Adopted) and not process_alive(*proc))
                self._catch_up(run_id)
                if gone:
                    del self._procs[run_id]  # no signal may reach its pid from now on: it can be reused
                    ended.append((run_id, code))
                elif run_id in self._cancel_sent and time.monotonic() - self._cancel_sent[run_id] > KILL_AFTER_S:
                    _signal_group(proc.pid, signal.SIGKILL)
        for run_id, code in ended:  # outside the lock: registering copies a model directory first
            self._finish(run_id, code)
        with self.lock:
            for run in self.db.queued_runs():
                if len(self._procs) >= self.max_jobs or self._stop.is_set():
                    break
                self._launch(run)

    def _catch_up(self, run_id: int) -> None:
        tail = self._tails.get(run_id)
        if tail is None:
            tail = self._tails[run_id] = MetricsTail(self.ws, self.ws.run_path(run_id) / "metrics.jsonl")
        try:
            lines, restart = tail.read()
        except (OSError, ValueError) as exc:  # this run's own: every tick raised, and no other run finished or
            # started (a folder planted as one run's metrics.jsonl stalled them all); said once, on the run
            error = f"its metrics cannot be read: {exc}"
            if self._tail_errors.get(run_id) != error:
                self._tail_errors[run_id] = error
                self.db.update_run(run_id, error=error)
                log.warning("run %s: %s", run_id, error)
            return
        self._tail_errors.pop(run_id, None)
        if lines or restart:
            self.db.add_metrics(run_id, lines, replace=restart)

    # ---- launching ---------------------------------------------------------------------------------

    def _register_selfplay(self, run: dict[str, Any], final: Path, training: dict[str, Any]) -> None:
        """The policy in `final/` of a self-play or a fine-tuning run becomes the new model (_register_model)."""
        p = run["params"]
        if run["kind"] == "tune":
            # distill: the teacher is the parent
            told = ("loss", "sft_weight", "task", "dataset", "lora_rank", "lora_new_tokens", "lora_hard_tokens",
                    "preset", "mode")
            origin = {"kind": "tune", "parent": run["model_name"], "run_id": run["id"], "method": p["method"],
                      **{k: p[k] for k in told if p.get(k) is not None},
                      "steps": training.get("steps")}
        else:
            origin = {"kind": "selfplay", "parent": run["model_name"], "run_id": run["id"], "reward": p["reward"],
                      "judge": p.get("judge"), "iterations": training.get("steps"),
                      "final_reward": training.get("final_reward"), "final_kl": training.get("final_kl")}
        self._register_model(run, final, origin, total_steps(run, training))

    def _register_derived(self, run: dict[str, Any], made: Path) -> None:
        """A quantized model (commands.DERIVED) becomes the new model; its origin is the run's settings. Its
        steps are its parent's (the weights it was made from)."""
        params = {k: v for k, v in run["params"].items() if k != "new_model"}
        self._register_model(run, made, {"kind": run["kind"], "parent": run["model_name"], "run_id": run["id"],
                                         **params}, run["step_offset"])

    def _register_model(self, run: dict[str, Any], final: Path, origin: dict[str, Any], steps: int | None) -> None:
        """The model directory `final` becomes the new model params.new_model: copied into models/ under a
        dot-name of this run's own, indexed with where it came from (`origin`), then renamed into place; an
        exception says why it was not. Nothing but that copy is ever removed here: a models/<name>/ that exists
        already belongs to someone else (a model made meanwhile, or files put there by hand) and makes the
        registration fail instead."""
        name = run["params"]["new_model"]
        target = self.ws.model_path(name)
        incoming = target.parent / f".{name}.{run['kind']}-{run['id']}"  # not a model name: never indexed
        shutil.rmtree(incoming, ignore_errors=True)  # this run's own, from an attempt cut short
        try:
            copy_dir(final, incoming, self.ws.root)  # stored once (stage_dir); no link followed
            # read from the copy, which is ours: final/ may have changed since it was checked
            cfg = ModelConfig.load(incoming / "config.json")
            kind = Tokenizer.load(incoming / "tokenizer.json").kind
            with self.lock:  # the API creates models under the same lock: the checks below stay true
                if self.db.get_model(name) is not None:
                    raise ValueError(f"a model named {name!r} exists now; it stays in {final}")
                if target.exists():
                    raise ValueError(f"{target} exists though no model of that name is indexed; it stays in {final}")
                parent = self.db.get_model(run["model_name"])
                self.db.add_model(name, cfg.to_dict(), parent["preset"] if parent else None, kind, cfg.vocab_size,
                                  origin=origin, trained_run_id=run["id"], trained_steps=steps)
                try:
                    os.rename(incoming, target)
                except OSError:
                    self.db.delete_model(name)  # the row just added, and nothing else: it has no runs
                    raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)  # gone after the rename; otherwise ours to remove

    def _launch(self, run: dict[str, Any]) -> None:
        run_id = run["id"]
        # the claim: a server sharing the database that read the same queue finds the run no longer queued
        if not self.db.update_run(run_id, where={"status": "queued", "launches": run["launches"]}, status="running",
                                  owner=self.owner, pid=None, pid_start=None, launches=run["launches"] + 1,
                                  started_at=time.time(), finished_at=None, exit_code=None, error=None,
                                  stop_reason=None, cancel_requested=False):
            return
        run_dir = self.ws.run_path(run_id)
        resumed_from = None
        try:
            self.ws.run_dir(run_id).mkdir(parents=True, exist_ok=True)  # LinkError: never written through a link
            if run["resume"]:
                ckpt = latest_checkpoint(run_dir)
                if ckpt is None:
                    raise ValueError("no checkpoint to resume from")
                resumed_from = checkpoint_step(ckpt)
            args, files = run_command(run, self.ws, self.db.get_model)
            for path, text in files.items():
                atomic_write_text(path, text)
            stop_file = run_dir / STOP_FILE
            if stop_file.exists() or stop_file.is_symlink():  # the request of an earlier launch, answered
                stop_file.unlink()
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "LMLAB_STOP_FILE": str(stop_file), **self.env}
            with os.fdopen(self.ws.open(run_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as logf:
                logf.write(f"\n$ lmlab {shlex.join(args)}\n".encode())
                logf.flush()
                proc = subprocess.Popen(child_argv(self.python, args), stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.ws.root, env=env, start_new_session=True)
        except (OSError, ValueError) as exc:
            self.db.update_run(run_id, status="failed", error=f"could not start: {exc}", finished_at=time.time())
            return
        self._procs[run_id] = proc
        self._tails[run_id] = MetricsTail(self.ws, run_dir / "metrics.jsonl")
        self._cancel_sent.pop(run_id, None)
        self.db.update_run(run_id, pid=proc.pid, pid_start=process_start(proc.pid), resumed_from_step=resumed_from)
        log.info("run %s started (pid %s)%s", run_id, proc.pid, f" from step {resumed_from}" if resumed_from else "")

    def _ask_to_stop(self, run_id: int, pid: int) -> None:
        """SIGINT to a run's process (it checkpoints and exits), and the stop file first, which a process still
        starting with SIGINT ignored finds once it can answer (commands.CHILD_BOOTSTRAP)."""
        try:
            os.close(self.ws.open(self.ws.run_path(run_id) / STOP_FILE, os.O_WRONLY | os.O_CREAT))
        except (OSError, ValueError) as exc:  # a run folder gone or made a link meanwhile: the signal still goes
            log.warning("run %s: could not write its stop file: %s", run_id, exc)
        _signal_group(pid, signal.SIGINT)

    def _finish(self, run_id: int, code: int | None, server_stopped: bool = False) -> None:
        """Record how a run's process ended and register what it made. `code` None: its exit status is unknown
        (adopted, or ended while no server ran); what it left tells. Called without the lock held, or by
        shutdown: a model directory is copied first, and the lock is taken for the swap and the records."""
        self._tails.pop(run_id, None)
        self._tail_errors.pop(run_id, None)
        self._cancel_sent.pop(run_id, None)
        run = self.db.get_run(run_id)
        if run is None:  # deleted while it ran
            return
        run_dir = self.ws.run_path(run_id)
        final = run_dir / "final"
        values: dict[str, Any] = {"exit_code": code, "pid": None, "pid_start": None, "finished_at": time.time()}
        # no model to register (an experiment, an evaluation): its report or results are the product, but only of
        # a run that was not stopped: the facts lab answers SIGINT as training does (the step loop returns early)
        # and may still report and exit 0
        made = product(run)
        cut_short = made is not None and (run["cancel_requested"] or server_stopped)
        staged = None
        # what the run made, reached through no link: one planted in its folder would register, or report, files
        # from anywhere as this run's (an outside folder copied in as a model, an outside file's numbers indexed)
        try:
            training = finished_model(self.ws, run, final) if run["kind"] in ("train", "selfplay", "tune") else None
            made_file = made is not None and _is_file(self.ws, run_dir / made)
            derived = run["kind"] in DERIVED and _is_file(self.ws, run_dir / DERIVED_DIR / "model.safetensors")
            linked = None
        except (OSError, LinkError) as exc:  # OSError: final/ unreadable as a folder (walked by no_links)
            training, made_file, derived, linked = None, False, False, exc
        if linked is not None and code in (0, None) and not run["cancel_requested"] and not server_stopped:
            values.update(status="failed", error=f"the {PROCESS_NAMES[run['kind']]} finished, but what it made was "
                                                 f"not used: {linked}")
        elif code in (0, None) and made_file and not cut_short:
            values.update(status="completed", stop_reason="finished", error=None)
        elif code == 0 and made and not cut_short:
            values.update(status="failed", error=f"the {run['kind']} exited without writing {made}")
        elif (code in (0, None) and derived and not run["cancel_requested"] and not server_stopped):
            # written whole, then renamed
            try:
                self._register_derived(run, run_dir / DERIVED_DIR)
                values.update(status="completed", stop_reason="finished", error=None)
            except Exception as exc:  # a database error too: the run must not stay "running"
                values.update(status="failed", error=f"the {PROCESS_NAMES[run['kind']]} finished, but its model "
                                                     f"was not saved: {exc}")
        elif code in (0, None) and run["kind"] in ("selfplay", "tune") and training is not None:
            try:
                self._register_selfplay(run, final, training)
                stop = "iterations" if run["kind"] == "selfplay" else training.get("stop_reason")
                values.update(status="completed", stop_reason=stop, error=None)
            except Exception as exc:  # a database error too: the run must not stay "running"
                values.update(status="failed", error=f"{PROCESS_NAMES[run['kind']]} finished, but its model was "
                                                     f"not saved: {exc}")
        elif code in (0, None) and run["kind"] == "train" and training is not None:
            values.update(status="completed", stop_reason=training.get("stop_reason"), error=None)
            try:
                staged = stage_dir(final, self.ws.model_path(run["model_name"]), self.ws.root)
            except LinkError as exc:  # a link put in final/ after it was checked: no model of this run's
                values.update(status="failed", error=f"the training finished, but what it made was not used: {exc}")
            except (OSError, ValueError) as exc:
                values.update(error=f"trained, but the model directory could not be updated: {exc}")
        elif run["cancel_requested"]:
            values.update(status="cancelled", error=None, stop_reason="cancelled")
        elif code is None and not server_stopped and (reason := _error_from_log(self.ws, run_dir / "log.txt", True)):
            values.update(status="failed", error=reason)
        elif code is None or code < 0 or code in (0, 130) or cut_short:  # 0 without final/: stopped on request
            if made is not None or run["kind"] in DERIVED:
                then = NOT_RESUMABLE.format(PROCESS_NAMES[run["kind"]])
            else:  # "resume" only where there is something to resume from (resume refuses the others)
                then = RESUME if latest_checkpoint(run_dir) is not None else NO_CHECKPOINT
            if server_stopped:
                error = f"the server was stopped; {then}"
            elif code is None:
                error = f"{UNWATCHED}; {then}"
            else:
                error = f"the {PROCESS_NAMES[run['kind']]} process was " + (
                    f"killed by {_signame(-code)}" if code < 0 else "interrupted")
            values.update(status="interrupted", stop_reason="interrupted", error=error)
        else:
            values.update(status="failed", error=_error_from_log(self.ws, run_dir / "log.txt") or f"exit code {code}")
        with self.lock:
            if staged is not None:
                try:
                    swap_dir(staged, self.ws.model_path(run["model_name"]), (*MODEL_FILES, SPEED_FILE))
                    # weights trained from scratch no longer come from the self-play that made the model; weights
                    # trained further from it still do, so continued training keeps the origin
                    cleared = {} if run["init_from_trained"] else {"origin": None}
                    self.db.update_model(run["model_name"], trained_run_id=run_id,
                                         trained_steps=total_steps(run, training), **cleared)
                except (OSError, ValueError) as exc:
                    values.update(error=f"trained, but the model directory could not be updated: {exc}")
            self.db.update_run(run_id, **values)
        log.info("run %s %s (exit %s)", run_id, values["status"], code)

    # ---- requests from the API ---------------------------------------------------------------------

    def submit(self, run_id: int) -> None:
        self.wake()

    def cancel(self, run_id: int) -> dict[str, Any] | None:
        """A queued run is cancelled at once; a running one is asked to stop by the server that runs it (tick
        sends SIGINT), whichever server sharing the database the request came through."""
        with self.lock:
            run = self.db.get_run(run_id)
            if run is None:
                return None
            # only while still queued: a server sharing the database may have launched it meanwhile
            if run["status"] == "queued" and not self.db.update_run(
                    run_id, where={"status": "queued"}, status="cancelled", finished_at=time.time(),
                    stop_reason="cancelled"):
                run = self.db.get_run(run_id) or run
            if run["status"] == "running":
                self.db.update_run(run_id, cancel_requested=True)
            self.wake()
            return self.db.get_run(run_id)

    def resume(self, run_id: int, max_steps: int | None = None,
               ready: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Queue a stopped run to continue from its last checkpoint, to `max_steps` if given (a self-play run's
        iterations); ValueError says why it cannot. `ready(run)`, called after these checks and before the run
        is queued, is the caller's own (the API's: the models the run reads and writes are free)."""
        with self.lock:
            run = self._stopped_run(run_id, "resumed")
            if product(run) is not None or run["kind"] in DERIVED:
                raise ValueError(f"run {run_id}: {NOT_RESUMABLE.format(PROCESS_NAMES[run['kind']])}")
            ckpt = latest_checkpoint(self.ws.run_path(run_id))
            if ckpt is None:
                raise ValueError(f"run {run_id} stopped before its first checkpoint; start a new run instead")
            limit = "iterations" if run["kind"] == "selfplay" else "max_steps"
            params = {**run["params"], **({limit: max_steps} if max_steps is not None else {})}
            step = checkpoint_step(ckpt)
            # self-play may resume at its last iteration as it was: to save its policy again (a failed registration);
            # so may a fine-tuning run that finished (its final/ is there) but whose model could not be registered
            as_it_was = max_steps is None and (limit == "iterations" or (
                run["kind"] == "tune" and (self.ws.run_path(run_id) / "final").is_dir()))
            if params.get(limit) and params[limit] <= step and not as_it_was:
                raise ValueError(f"the last checkpoint is at step {step}; {limit} ({params[limit]}) must be larger "
                                 "to train further")
            if ready is not None:
                ready(run)
            self.db.update_run(run_id, status="queued", resume=True, params=json.dumps(params),
                               max_steps=params.get(limit), queued_at=time.time(), error=None, exit_code=None,
                               finished_at=None, cancel_requested=False, stop_reason=None)
            self.wake()
            return self.db.get_run(run_id)  # type: ignore[return-value]

    def _stopped_run(self, run_id: int, done: str) -> dict[str, Any]:
        """The run, if it is stopped (LookupError if there is none, ValueError if it is not stopped)."""
        run = self.db.get_run(run_id)
        if run is None:
            raise LookupError(f"run {run_id} not found")
        if run["status"] not in STOPPED:
            raise ValueError(f"run {run_id} is {run['status']}; only interrupted, failed or cancelled runs can be "
                             f"{done}")
        return run

    def running(self) -> list[int]:
        with self.lock:
            return list(self._procs)
