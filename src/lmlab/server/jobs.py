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
    lab's training stops early on SIGINT and may still report on the cut-short run);
  * starts queued runs, first in first out, while fewer than `max_jobs` are running.

Cancel sends SIGINT: training and self-play both finish the step (iteration) under way, write a checkpoint
and exit, so a cancelled run can be resumed. Resume relaunches the run's command with `--resume`: `lmlab
train --resume --out RUN_DIR`, or the `lmlab selfplay text ... --out RUN_DIR` it was started with (the same
flags, prompts in RUN_DIR/prompts.json) plus `--resume`, which checks that they match the run's
config.json. A self-play run stopped before final/ leaves no model behind until it is resumed and
completes; a cancel that arrives after final/ is written comes too late (the process exits 0 and the run
completes with its new model). On start-up, runs the database still calls running belonged to a server
that died: they become interrupted, and a child process that outlived that server is asked (SIGINT) to
checkpoint and exit before any resume starts.

A lab experiment writes results.json, PNG plots and report.html into its run directory and keeps no
checkpoints: a cancel (SIGINT) ends it, it cannot be resumed, and a stopped one is started again.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..lab.selfplay.text import SETTING_FLAGS
from ..models import ModelConfig
from ..models.config import atomic_write_text
from ..tokenizers import Tokenizer
from ..train import checkpoint_step, latest_checkpoint
from .db import Database
from .workspace import Workspace, replace_dir

log = logging.getLogger("lmlab.server")

# The child: `lmlab train ...`, with SIGINT and SIGTERM restored to KeyboardInterrupt. Python leaves
# SIGINT ignored when its parent ignored it (true of background jobs of a non-interactive shell), and
# SIGTERM would otherwise kill without a checkpoint.
_CHILD = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
          "signal.signal(signal.SIGTERM, signal.default_int_handler); "
          "from lmlab.cli import main; sys.exit(main(sys.argv[1:]))")
KILL_AFTER_S = 30.0  # a child that has not exited this long after SIGINT gets SIGKILL
# What a run's process is called when it stops early. Training and self-play answer SIGINT alike (checkpoint
# and exit), so a stopped run of either kind says the same about what is left and how to continue; a lab
# experiment keeps no checkpoints, so a stopped one is not resumable and is started again.
_WHAT = {"train": "training", "selfplay": "self-play", "experiment": "lab experiment"}
ASKED = "was asked to save a checkpoint and exit"
SERVER_STOPPED = "the server was stopped; resume to continue from the last checkpoint"
NOT_RESUMABLE = "a lab experiment keeps no checkpoints and cannot be resumed; start it again"


def process_alive(pid: int | None, marker: str | None = None) -> bool:
    """Is `pid` a live process (and, where /proc exists, one whose command line mentions `marker`)?"""
    if not pid:
        return False
    proc = Path(f"/proc/{pid}")
    if proc.is_dir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = (proc / "status").read_text()
        except OSError:
            return False
        if "\nState:\tZ" in status:
            return False
        return marker is None or marker in cmdline
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


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
    trainer rewrites it on resume, dropping lines after the checkpoint), it starts over and says so."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.inode: int | None = None
        self.offset = 0

    def read(self) -> tuple[list[dict[str, Any]], bool]:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return [], False
        restart = self.inode is None or st.st_ino != self.inode or st.st_size < self.offset
        if restart:
            self.inode, self.offset = st.st_ino, 0
        if st.st_size == self.offset and not restart:
            return [], False
        with open(self.path, "rb") as f:
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


def _error_from_log(path: Path) -> str | None:
    """The child's own one-line reason (`lmlab: error: ...`), else its last line."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    for ln in reversed(lines):
        if ln.startswith("lmlab: error:"):
            return ln[len("lmlab: error:"):].strip()
    return lines[-1][-500:] if lines else None


def _signame(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _flags(params: dict[str, Any]) -> list[str]:
    out = []
    for key, value in params.items():
        if value is None:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + key.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def experiment_command(params: dict[str, Any], out: Path) -> list[str]:
    """The lab's own CLI command for an experiment run's params (lab, experiment, quick, seeds, workers),
    writing into `out`: `lab facts EXPERIMENT --out OUT --seeds 0,1 ...` or `selfplay azr --out OUT ...`."""
    seeds = ",".join(str(s) for s in params["seeds"])
    if params["lab"] == "facts":
        args = ["lab", "facts", params["experiment"], "--out", str(out), "--seeds", seeds]
    elif params["lab"] == "azr":
        # `lmlab selfplay azr --seeds 3` means a count (seeds 0..2); a trailing comma makes one seed a list
        args = ["selfplay", "azr", "--out", str(out), "--seeds", seeds + ("," if len(params["seeds"]) == 1 else "")]
    else:
        raise ValueError(f"unknown lab {params['lab']!r}")
    if params.get("quick"):
        args.append("--quick")
    if params.get("workers"):
        args += ["--workers", str(params["workers"])]
    return args


class Supervisor:
    def __init__(self, db: Database, workspace: Workspace, *, max_jobs: int = 1, python: str = sys.executable,
                 poll_s: float = 0.5, env: dict[str, str] | None = None) -> None:
        if max_jobs < 1:
            raise ValueError(f"max_jobs ({max_jobs}) must be >= 1")
        self.db, self.ws = db, workspace
        self.max_jobs, self.python, self.poll_s = max_jobs, python, poll_s
        self.env = env or {}
        self._procs: dict[int, subprocess.Popen] = {}
        self._tails: dict[int, MetricsTail] = {}
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

    def recover(self) -> None:
        """Runs left 'running' by a previous server become interrupted; their processes, if still alive,
        are asked to checkpoint and exit (a queued resume waits until they have)."""
        for run in self.db.list_runs(status=["running"]):
            run_dir = self.ws.run_path(run["id"])
            alive = process_alive(run["pid"], str(run_dir))
            if alive:
                _signal_group(run["pid"], signal.SIGINT)
            self._catch_up(run["id"])
            note = "the server stopped while this run was running"
            if alive:
                note += f"; its process (pid {run['pid']}) " + (ASKED if run["kind"] != "experiment" else "was stopped")
            if run["kind"] == "experiment":
                note += f"; {NOT_RESUMABLE}"
            self.db.update_run(run["id"], status="interrupted", error=note, finished_at=time.time(),
                               pid=run["pid"] if alive else None)
            log.warning("run %s: %s", run["id"], note)

    def shutdown(self, timeout: float = 20.0) -> None:
        """Stop the loop; ask every child to checkpoint and exit; mark them interrupted (resumable)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            for proc in self._procs.values():
                _signal_group(proc.pid, signal.SIGINT)
            deadline = time.monotonic() + timeout
            for run_id, proc in list(self._procs.items()):
                try:
                    proc.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait()
                self._catch_up(run_id)
                self._finish(run_id, proc.returncode, server_stopped=True)
            self._procs.clear()
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
        with self.lock:
            for run_id, proc in list(self._procs.items()):
                self._catch_up(run_id)
                code = proc.poll()
                if code is not None:
                    self._finish(run_id, code)
                elif run_id in self._cancel_sent and time.monotonic() - self._cancel_sent[run_id] > KILL_AFTER_S:
                    _signal_group(proc.pid, signal.SIGKILL)
            for run in self.db.queued_runs():
                if len(self._procs) >= self.max_jobs or self._stop.is_set():
                    break
                run_dir = self.ws.run_path(run["id"])
                if process_alive(run["pid"], str(run_dir)):  # the previous server's child is still saving
                    if time.time() - (run["queued_at"] or 0) > KILL_AFTER_S:
                        _signal_group(run["pid"], signal.SIGKILL)
                    continue
                self._launch(run)

    def _catch_up(self, run_id: int) -> None:
        tail = self._tails.get(run_id)
        if tail is None:
            tail = self._tails[run_id] = MetricsTail(self.ws.run_path(run_id) / "metrics.jsonl")
        lines, restart = tail.read()
        if lines or restart:
            self.db.add_metrics(run_id, lines, replace=restart)

    # ---- launching ---------------------------------------------------------------------------------

    def command(self, run: dict[str, Any]) -> list[str]:
        """`lmlab train ...`, `lmlab selfplay text ...` or a lab experiment's command for this run (as run by the
        child: python -c <_CHILD> train ...), with --resume when it continues from a checkpoint."""
        run_dir = self.ws.run_path(run["id"])
        if run["kind"] == "experiment":
            return experiment_command(run["params"], run_dir)
        if run["kind"] == "selfplay":
            return self._selfplay_command(run, run_dir) + (["--resume"] if run["resume"] else [])
        if run["resume"]:
            args = ["train", "--out", str(run_dir), "--resume"]
        else:
            model = self.db.get_model(run["model_name"])
            if model is None:
                raise ValueError(f"model {run['model_name']!r} no longer exists")
            args = ["train", *[str(self.ws.book_path(b)) for b in run["books"]]]
            if run["init_from_trained"]:
                args += ["--init", str(self.ws.model_path(run["model_name"]))]
            else:
                config_file = run_dir / "model_config.json"
                config_file.write_text(json.dumps(model["config"], indent=2), encoding="utf-8")
                args += ["--config", str(config_file), "--tokenizer-kind", model["tokenizer_kind"],
                         "--vocab-size", str(model["tokenizer_vocab"])]
            args += ["--out", str(run_dir)]
        return args + _flags(run["params"])

    def _selfplay_command(self, run: dict[str, Any], run_dir: Path) -> list[str]:
        p = run["params"]
        for name in (run["model_name"], p.get("judge")):
            if name and self.db.get_model(name) is None:
                raise ValueError(f"model {name!r} no longer exists")
        args = ["selfplay", "text", "--model", str(self.ws.model_path(run["model_name"])), "--out", str(run_dir),
                "--reward", p["reward"]]
        if p.get("judge"):
            args += ["--judge", str(self.ws.model_path(p["judge"]))]
        if p.get("prompts"):  # a file, not arguments: a command line is public (ps, /proc) and logged
            prompts_file = run_dir / "prompts.json"
            atomic_write_text(prompts_file, json.dumps(p["prompts"], ensure_ascii=False))
            args += ["--prompts-file", str(prompts_file)]
        return args + _flags({k: p[k] for k in SETTING_FLAGS if k in p})

    def _register_selfplay(self, run: dict[str, Any], final: Path, training: dict[str, Any]) -> None:
        """The policy in `final/` becomes the new model: copied into models/ under a dot-name of this run's
        own, indexed with where it came from, then renamed into place; an exception says why it was not.
        Nothing but that copy is ever removed here: a models/<name>/ that exists already belongs to someone
        else (a model made meanwhile, or files put there by hand) and makes the registration fail instead."""
        p = run["params"]
        name = p["new_model"]
        cfg = ModelConfig.load(final / "config.json")
        kind = Tokenizer.load(final / "tokenizer.json").kind
        target = self.ws.model_path(name)
        incoming = target.parent / f".{name}.selfplay-{run['id']}"  # not a model name: never indexed
        shutil.rmtree(incoming, ignore_errors=True)  # this run's own, from an attempt cut short
        origin = {"kind": "selfplay", "parent": run["model_name"], "run_id": run["id"], "reward": p["reward"],
                  "judge": p.get("judge"), "iterations": training.get("steps"),
                  "final_reward": training.get("final_reward"), "final_kl": training.get("final_kl")}
        try:
            shutil.copytree(final, incoming)
            with self.lock:  # the API creates models under the same lock: the checks below stay true
                if self.db.get_model(name) is not None:
                    raise ValueError(f"a model named {name!r} exists now; the policy stays in {final}")
                if target.exists():
                    raise ValueError(f"{target} exists though no model of that name is indexed; the policy "
                                     f"stays in {final}")
                parent = self.db.get_model(run["model_name"])
                self.db.add_model(name, cfg.to_dict(), parent["preset"] if parent else None, kind, cfg.vocab_size,
                                  origin=origin, trained_run_id=run["id"], trained_steps=training.get("steps"))
                try:
                    os.rename(incoming, target)
                except OSError:
                    self.db.delete_model(name)  # the row just added, and nothing else: it has no runs
                    raise
        finally:
            shutil.rmtree(incoming, ignore_errors=True)  # gone after the rename; otherwise ours to remove

    def _launch(self, run: dict[str, Any]) -> None:
        run_id = run["id"]
        run_dir = self.ws.run_path(run_id)
        resumed_from = None
        try:
            self.ws.run_dir(run_id).mkdir(parents=True, exist_ok=True)  # LinkError: never written through a link
            if run["resume"]:
                ckpt = latest_checkpoint(run_dir)
                if ckpt is None:
                    raise ValueError("no checkpoint to resume from")
                resumed_from = checkpoint_step(ckpt)
            args = self.command(run)
            env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
            with os.fdopen(self.ws.open(run_dir / "log.txt", os.O_WRONLY | os.O_APPEND | os.O_CREAT), "ab") as logf:
                logf.write(f"\n$ lmlab {shlex.join(args)}\n".encode())
                logf.flush()
                proc = subprocess.Popen([self.python, "-c", _CHILD, *args], stdout=logf, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, cwd=self.ws.root, env=env, start_new_session=True)
        except (OSError, ValueError) as exc:
            self.db.update_run(run_id, status="failed", error=f"could not start: {exc}", finished_at=time.time())
            return
        self._procs[run_id] = proc
        self._tails[run_id] = MetricsTail(run_dir / "metrics.jsonl")
        self._cancel_sent.pop(run_id, None)
        self.db.update_run(run_id, status="running", pid=proc.pid, started_at=time.time(), finished_at=None,
                           exit_code=None, error=None, stop_reason=None, cancel_requested=False,
                           launches=run["launches"] + 1, resumed_from_step=resumed_from)
        log.info("run %s started (pid %s)%s", run_id, proc.pid, f" from step {resumed_from}" if resumed_from else "")

    def _finish(self, run_id: int, code: int, server_stopped: bool = False) -> None:
        self._procs.pop(run_id, None)
        self._tails.pop(run_id, None)
        self._cancel_sent.pop(run_id, None)
        run = self.db.get_run(run_id)
        if run is None:  # deleted while it ran
            return
        run_dir = self.ws.run_path(run_id)
        final = run_dir / "final"
        training = {}
        if (final / "training.json").is_file():
            try:
                training = json.loads((final / "training.json").read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                training = {}
        values: dict[str, Any] = {"exit_code": code, "pid": None, "finished_at": time.time()}
        # no model to register: its report is the product, but only of a run that was not stopped: the facts
        # lab answers SIGINT as training does (the step loop returns early) and may still report and exit 0
        cut_short = run["kind"] == "experiment" and (run["cancel_requested"] or server_stopped)
        if code == 0 and run["kind"] == "experiment" and not cut_short:
            if (run_dir / "report.html").is_file():
                values.update(status="completed", stop_reason="finished", error=None)
            else:
                values.update(status="failed", error="the experiment exited without writing report.html")
        elif code == 0 and run["kind"] == "selfplay" and (final / "model.safetensors").is_file():
            try:
                self._register_selfplay(run, final, training)
                values.update(status="completed", stop_reason="iterations", error=None)
            except Exception as exc:  # a database error too: the run must not stay "running"
                values.update(status="failed", error=f"self-play finished, but its model was not saved: {exc}")
        elif code == 0 and (final / "model.safetensors").is_file():
            values.update(status="completed", stop_reason=training.get("stop_reason"), error=None)
            try:
                replace_dir(final, self.ws.model_path(run["model_name"]))
                # weights trained from scratch no longer come from the self-play that made the model; weights
                # trained further from it still do, so continued training keeps the origin
                cleared = {} if run["init_from_trained"] else {"origin": None}
                self.db.update_model(run["model_name"], trained_run_id=run_id, trained_steps=training.get("steps"),
                                     **cleared)
            except (OSError, ValueError) as exc:
                values.update(error=f"trained, but the model directory could not be updated: {exc}")
        elif run["cancel_requested"]:
            values.update(status="cancelled", error=None, stop_reason="cancelled")
        elif code < 0 or code in (0, 130) or cut_short:  # 0 without final/: the trainer stopped early on request
            how = f"killed by {_signame(-code)}" if code < 0 else "interrupted"
            stopped = SERVER_STOPPED if run["kind"] != "experiment" else f"the server was stopped; {NOT_RESUMABLE}"
            values.update(status="interrupted", stop_reason="interrupted",
                          error=stopped if server_stopped else f"the {_WHAT[run['kind']]} process was {how}")
        else:
            values.update(status="failed", error=_error_from_log(run_dir / "log.txt") or f"exit code {code}")
        self.db.update_run(run_id, **values)
        log.info("run %s %s (exit %s)", run_id, values["status"], code)

    # ---- requests from the API ---------------------------------------------------------------------

    def submit(self, run_id: int) -> None:
        self.wake()

    def cancel(self, run_id: int) -> dict[str, Any] | None:
        with self.lock:
            run = self.db.get_run(run_id)
            if run is None:
                return None
            if run["status"] == "queued":
                self.db.update_run(run_id, status="cancelled", finished_at=time.time(), stop_reason="cancelled")
            elif run["status"] == "running":
                self.db.update_run(run_id, cancel_requested=True)
                proc = self._procs.get(run_id)
                pid = proc.pid if proc else run["pid"]
                if pid:
                    _signal_group(pid, signal.SIGINT)
                    self._cancel_sent[run_id] = time.monotonic()
            self.wake()
            return self.db.get_run(run_id)

    def resume(self, run_id: int, max_steps: int | None = None,
               ready: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Queue a stopped run to continue from its last checkpoint, to `max_steps` if given (a self-play run's
        iterations); ValueError says why it cannot. `ready(run)`, called after these checks and before the run
        is queued, is the caller's own (the API's: the models the run reads and writes are free)."""
        with self.lock:
            run = self.db.get_run(run_id)
            if run is None:
                raise LookupError(f"run {run_id} not found")
            if run["status"] not in ("interrupted", "failed", "cancelled"):
                raise ValueError(f"run {run_id} is {run['status']}; only interrupted, failed or cancelled runs "
                                 "can be resumed")
            if run["kind"] == "experiment":
                raise ValueError(f"run {run_id}: {NOT_RESUMABLE}")
            ckpt = latest_checkpoint(self.ws.run_path(run_id))
            if ckpt is None:
                raise ValueError(f"run {run_id} stopped before its first checkpoint; start a new run instead")
            limit = "iterations" if run["kind"] == "selfplay" else "max_steps"
            params = {**run["params"], **({limit: max_steps} if max_steps is not None else {})}
            step = checkpoint_step(ckpt)
            # self-play may resume at its last iteration as it was: to save its policy again (a failed registration)
            as_it_was = limit == "iterations" and max_steps is None
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

    def running(self) -> list[int]:
        with self.lock:
            return list(self._procs)
