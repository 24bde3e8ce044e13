"""Training jobs survive what kills processes: `kill -9` of the training process leaves a run that shows as
interrupted and resumes from its last checkpoint, with one metrics line per step (nothing lost, nothing
twice); `kill -9` of the server itself leaves a training process that the next server adopts (watches, can
cancel, and registers when it finishes), and one that finished while no server ran is registered as a normal
finish would have. Uses a real `lmlab serve` process."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from test_server_support import (
    BOOK,
    FAST,
    TINY_MODEL,
    ServerProcess,
    kill_past_a_checkpoint,
    kill_run_process,
    wait_for,
)

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.jobs import Supervisor, process_alive
from lmlab.tokenizers import Tokenizer
from lmlab.train import latest_checkpoint

DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731
LONG = {"books": ["tales.txt"], "max_steps": 100000, "save_every": 3, "log_every": 1, "eval_every": 0, **FAST}


def _status(c, run_id):
    return c.get(f"/api/v1/runs/{run_id}").json()


def _wait(c, run_id, pred, what, timeout=180):
    return wait_for(lambda: (lambda r: r if pred(r) else None)(_status(c, run_id)), timeout, 0.3, what)


def _setup(c, model, **change):
    if "tales.txt" not in c.get("/books").json()["books"]:
        assert c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode(), "text/plain")}).status_code == 201
    assert c.post("/api/v1/models", json={"name": model, **TINY_MODEL}).status_code == 201
    r = c.post("/api/v1/runs", json={"model": model, **LONG, **change})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def _check_resumed(c, ws, run_id, step):
    r = _wait(c, run_id, lambda r: r["status"] not in ("queued", "running"), "the resumed run to finish")
    assert r["status"] == "completed", r
    assert r["resumed_from_step"] == step and r["current_step"] == step + 3
    steps = [m["step"] for m in c.get(f"/api/v1/runs/{run_id}/metrics?limit=100000").json()["metrics"]]
    assert steps == list(range(1, step + 4))
    log = (ws / "runs" / f"run-{run_id}" / "log.txt").read_text()
    assert f"resumed from {ws / 'runs' / f'run-{run_id}' / 'checkpoints' / f'step-{step}'} (step {step})" in log
    lines = [json.loads(x) for x in (ws / "runs" / f"run-{run_id}" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == steps
    assert c.get("/api/v1/models/" + r["model"]).json()["trained_steps"] == step + 3


def test_kill_9_of_the_training_process(tmp_path):
    server = ServerProcess(tmp_path).start()
    pid = None
    try:
        with server.client() as c:
            run_id = _setup(c, "k9")
            pid = _wait(c, run_id, lambda r: (r["checkpoint_step"] or 0) >= 3, "a checkpoint")["pid"]
            kill_past_a_checkpoint(pid, tmp_path / "runs" / f"run-{run_id}")
            r = _wait(c, run_id, lambda r: r["status"] != "running", "the supervisor to notice the death")
            assert r["status"] == "interrupted" and r["exit_code"] == -9 and "SIGKILL" in r["error"]
            assert r["can_resume"] and r["pid"] is None
            step = r["checkpoint_step"]
            assert c.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": step + 3}).status_code == 200
            _check_resumed(c, tmp_path, run_id, step)
    finally:
        kill_run_process(pid)
        server.stop()


def test_kill_9_of_the_server_during_a_job(tmp_path):
    """The training process outlives its server: the next server adopts it (the run stays running, with the
    same process), its cancel stops it at a checkpoint, and the run resumes from there."""
    server = ServerProcess(tmp_path).start()
    pid = None
    try:
        with server.client() as c:
            run_id = _setup(c, "restart")
            r = _wait(c, run_id, lambda r: (r["checkpoint_step"] or 0) >= 3, "a checkpoint")
            pid = r["pid"]
        server.kill(signal.SIGKILL)  # no shutdown hook runs: the child is orphaned, still training
        assert process_alive(pid)
        server = ServerProcess(tmp_path).start()
        with server.client() as c:
            r = _status(c, run_id)
            assert r["status"] == "running" and r["pid"] == pid and r["error"] is None, r
            assert c.post(f"/api/v1/runs/{run_id}/cancel").json()["cancel_requested"] is True
            r = _wait(c, run_id, lambda r: r["status"] != "running", "the adopted process to stop")
            assert r["status"] == "cancelled" and r["pid"] is None and r["can_resume"], r
            assert not process_alive(pid)
            step = r["checkpoint_step"]
            assert step >= 3
            assert c.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": step + 3}).status_code == 200
            _check_resumed(c, tmp_path, run_id, step)
    finally:
        kill_run_process(pid)
        server.stop()


def _frozen_past_a_checkpoint(c, run_id: int, run_dir: Path) -> int:
    """The run's training process, stopped (SIGSTOP) once it has written a checkpoint: it cannot finish before
    the test lets it go on (SIGCONT)."""
    pid = _wait(c, run_id, lambda r: r["pid"], "the training process")["pid"]
    wait_for(lambda: latest_checkpoint(run_dir), 120, 0.01, "a checkpoint on disk")
    os.kill(pid, signal.SIGSTOP)
    return pid


@pytest.mark.parametrize("restart", ["after the process ended", "while it runs"])
def test_a_run_that_finishes_without_its_server_is_registered(restart, tmp_path):
    """kill -9 of the server during a 60-step run whose process then trains to its end: after the server was
    down all along (the process ended first) or after it was adopted by the next server, the run completes as
    if nothing had happened: its final/ becomes the model directory, the model row says so, and the metrics
    are the process's 60 lines."""
    server = ServerProcess(tmp_path).start()
    pid = None
    try:
        with server.client() as c:
            run_id = _setup(c, "finish", max_steps=60)
            run_dir = tmp_path / "runs" / f"run-{run_id}"
            pid = _frozen_past_a_checkpoint(c, run_id, run_dir)
        server.kill(signal.SIGKILL)
        if restart == "after the process ended":
            os.kill(pid, signal.SIGCONT)
            wait_for(lambda: not process_alive(pid), 120, what="the orphaned process to finish")
        server = ServerProcess(tmp_path).start()
        with server.client() as c:
            if restart == "while it runs":
                r = _status(c, run_id)
                assert r["status"] == "running" and r["pid"] == pid, r
                os.kill(pid, signal.SIGCONT)
            r = _wait(c, run_id, DONE, "the run to be finished")
            assert r["status"] == "completed" and r["stop_reason"] == "max_steps" and r["error"] is None, r
            assert r["current_step"] == 60 and r["pid"] is None and r["exit_code"] is None, r
            m = c.get("/api/v1/models/finish").json()
            assert m["trained"] and m["trained_run_id"] == run_id and m["trained_steps"] == 60, m
            model_dir = tmp_path / "models" / "finish"
            for name in ("config.json", "model.safetensors", "tokenizer.json", "training.json"):
                assert (model_dir / name).read_bytes() == (run_dir / "final" / name).read_bytes(), name
            steps = [m["step"] for m in c.get(f"/api/v1/runs/{run_id}/metrics?limit=1000").json()["metrics"]]
            assert steps == list(range(1, 61))
            assert c.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": 80}).status_code == 409  # completed
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        kill_run_process(pid)
        server.stop()


def _dead_run(tmp_path, kind, params, **values):
    """A database and workspace as a killed server leaves them: a run still marked running, whose process
    (pid 0: none) is gone. Returns (db, ws, run id, run dir)."""
    from lmlab.server.db import Database
    from lmlab.server.workspace import Workspace

    ws, db = Workspace(tmp_path), Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    db.add_model("start", ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32).to_dict(), None, "char", 128)
    run = db.add_run("" if kind == "experiment" else "start", [], params, False, params.get("max_steps"), kind=kind)
    db.update_run(run["id"], status="running", pid=None, launches=1, **values)
    run_dir = ws.run_path(run["id"])
    run_dir.mkdir(parents=True)
    return db, ws, run["id"], run_dir


def _final(run_dir, training):
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=128)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32)
    save_pretrained(run_dir / "final", Transformer(cfg), tok, training=training)


def test_a_selfplay_run_that_finished_without_its_server_makes_its_model(tmp_path):
    db, ws, run_id, run_dir = _dead_run(tmp_path, "selfplay", {"new_model": "start-sp", "reward": "seed",
                                                               "iterations": 3})
    _final(run_dir, {"steps": 3, "final_reward": 0.25, "final_kl": 0.01})
    Supervisor(db, ws).recover()
    run, model = db.get_run(run_id), db.get_model("start-sp")
    assert run["status"] == "completed" and run["stop_reason"] == "iterations" and run["pid"] is None, run
    assert model["trained_run_id"] == run_id and model["trained_steps"] == 3, model
    assert model["origin"] == {"kind": "selfplay", "parent": "start", "run_id": run_id, "reward": "seed", "judge": None,
                               "iterations": 3, "final_reward": 0.25, "final_kl": 0.01}
    assert (ws.model_path("start-sp") / "model.safetensors").read_bytes() == \
        (run_dir / "final" / "model.safetensors").read_bytes()
    db.close()


@pytest.mark.parametrize("report", [True, False])
def test_an_experiment_that_finished_without_its_server_is_completed_by_its_report(report, tmp_path):
    db, ws, run_id, run_dir = _dead_run(tmp_path, "experiment", {"lab": "azr", "experiment": "azr", "seeds": [0]})
    if report:
        (run_dir / "report.html").write_text("<!doctype html><p>results</p>")
    Supervisor(db, ws).recover()
    run = db.get_run(run_id)
    if report:
        assert run["status"] == "completed" and run["stop_reason"] == "finished" and run["error"] is None, run
    else:  # it ended without its report while no server watched: stopped, not resumable
        assert run["status"] == "interrupted" and "cannot be resumed; start it again" in run["error"], run
    db.close()


@pytest.mark.parametrize("steps", [5, 8])
def test_a_resumed_run_is_completed_by_its_own_final_not_the_previous_launchs(steps, tmp_path):
    """A run that completed at step 5, resumed to 8, whose process then ended without a server: final/ from step
    5 is what the first launch left (the resumed one died before writing its own), final/ from step 8 is the
    resumed launch's."""
    db, ws, run_id, run_dir = _dead_run(tmp_path, "train", {"max_steps": 8}, resume=True, resumed_from_step=5)
    (run_dir / "checkpoints" / "step-5").mkdir(parents=True)
    _final(run_dir, {"steps": steps, "stop_reason": "max_steps"})
    Supervisor(db, ws).recover()
    run, model = db.get_run(run_id), db.get_model("start")
    if steps == 8:
        assert run["status"] == "completed" and model["trained_steps"] == 8 and ws.model_path("start").is_dir(), run
    else:
        assert run["status"] == "interrupted" and "resume to continue from the last checkpoint" in run["error"], run
        assert model["trained_steps"] is None and not ws.model_path("start").exists()
    db.close()


# ---- a cancel that arrives while the run's process is still starting -------------------------------------

def test_a_cancel_while_the_process_starts_with_sigint_ignored_still_stops_it(tmp_path):
    """A server started as a background job (`lmlab serve &`) passes SIGINT ignored to its children until their
    bootstrap sets a handler: a cancel signalled in that window was lost, and the run went on (here an AZR
    experiment to its report) until the 30 s SIGKILL. The stop file the supervisor writes before signalling
    stops it as soon as it can answer."""
    import stat
    import sys
    import time

    from lmlab.server.db import Database
    from lmlab.server.workspace import Workspace

    ws = Workspace(tmp_path / "ws")
    db = Database(ws.sqlite_url())
    slow_start = tmp_path / "python-slow-start"  # SIGINT ignored, then a slow start, as in `lmlab serve &`
    trapped = tmp_path / "trapped"  # written once SIGINT is ignored: a SIGINT before that kills the shell itself
    slow_start.write_text(f"#!/bin/sh\ntrap '' INT\ntouch {trapped}\nsleep 2\nexec {sys.executable} \"$@\"\n")
    slow_start.chmod(slow_start.stat().st_mode | stat.S_IXUSR)
    run = db.add_run("", [], {"lab": "azr", "experiment": "azr", "quick": True, "seeds": [0], "workers": 1}, False,
                     None, kind="experiment")
    sup = Supervisor(db, ws, python=str(slow_start), poll_s=0.1)
    try:
        sup.tick()
        assert db.get_run(run["id"])["status"] == "running"
        deadline = time.monotonic() + 20
        while not trapped.exists():  # as `lmlab serve &` is: ignoring SIGINT before the supervisor ever signals
            assert time.monotonic() < deadline, "the slow start never began"
            time.sleep(0.05)
        sup.cancel(run["id"])
        sup.tick()  # SIGINT now, while the process ignores it
        deadline = time.monotonic() + 20  # under KILL_AFTER_S: the SIGKILL must not be what ends it
        while db.get_run(run["id"])["status"] == "running":
            assert time.monotonic() < deadline, "the cancelled run is still running"
            time.sleep(0.2)
            sup.tick()
        row = db.get_run(run["id"])
        log = (ws.run_path(run["id"]) / "log.txt").read_text()
        assert (row["status"], row["exit_code"]) == ("cancelled", 130), (row, log)
        assert "lmlab: interrupted (asked to stop while starting)" in log
        assert not (ws.run_path(run["id"]) / "report.html").exists()
    finally:
        sup.shutdown(timeout=5)
        db.close()


def test_the_lines_a_run_writes_just_before_it_exits_are_not_lost(tmp_path):
    """The supervisor read a run's new metrics lines, then asked whether its process had ended: a process that
    wrote its last lines and exited in between ended with them unread, and the run kept an earlier step's loss,
    tokens and clock (so its tokens/s mean too). Fails with the read before the question."""
    db, ws, run_id, run_dir = _dead_run(tmp_path, "train", {"max_steps": 2})
    metrics = run_dir / "metrics.jsonl"
    line = lambda step: json.dumps({"step": step, "tokens": 128 * step, "elapsed_s": 0.5 * step,  # noqa: E731
                                    "loss": 5.0 - step}) + "\n"
    metrics.write_text(line(1))
    _final(run_dir, {"steps": 2, "stop_reason": "max_steps"})

    class Exits:  # the training process: its last line, then its exit, between one read and the next
        pid = 0

        def poll(self):
            if metrics.read_text().count("\n") == 1:
                with open(metrics, "a") as f:
                    f.write(line(2))
            return 0

    sup = Supervisor(db, ws)
    sup._procs[run_id] = Exits()
    sup._catch_up(run_id)  # an earlier pass read step 1
    assert db.get_run(run_id)["current_step"] == 1
    sup.tick()
    run = db.get_run(run_id)
    assert run["status"] == "completed", run
    assert (run["current_step"], run["tokens"], run["last_loss"]) == (2, 256, 3.0), run
    assert [m["step"] for m in db.get_metrics(run_id)] == [1, 2]
    db.close()


def _two_running(tmp_path):
    """Runs 1 and 2 marked running, each with a process that has exited (1 with code 1, 2 with 0 and its final/);
    run 2 wrote one metrics line. Returns (db, ws, supervisor)."""
    db, ws, bad, bad_dir = _dead_run(tmp_path, "train", {"max_steps": 2})
    good = db.add_run("start", [], {"max_steps": 2}, False, 2)["id"]
    db.update_run(good, status="running", pid=None, launches=1)
    good_dir = ws.run_path(good)
    good_dir.mkdir()
    (good_dir / "metrics.jsonl").write_text(json.dumps({"step": 2, "tokens": 256, "elapsed_s": 1.0, "loss": 3.0})
                                            + "\n")
    _final(good_dir, {"steps": 2, "stop_reason": "max_steps"})

    class Exited:
        pid = 0

        def __init__(self, code):
            self.code = code

        def poll(self):
            return self.code

    sup = Supervisor(db, ws)
    sup._procs[bad], sup._procs[good] = Exited(1), Exited(0)
    assert (bad, good) == (1, 2)
    return db, ws, sup


@pytest.mark.parametrize("plant", ["folder", "fifo"])
def test_a_metrics_file_that_is_no_file_fails_its_run_not_the_supervisor(plant, tmp_path):
    """A folder or a FIFO in place of one running run's metrics.jsonl: open() of the folder raised in every tick
    before any run finished or started (a FIFO blocked it), so every run stalled. Now that run's error says so
    once and the other run finishes."""
    db, ws, sup = _two_running(tmp_path)
    metrics = ws.run_path(1) / "metrics.jsonl"
    metrics.mkdir() if plant == "folder" else os.mkfifo(metrics)
    sup._procs[1].code = None  # still running
    sup.tick()
    sup.tick()
    assert db.get_run(1)["status"] == "running"
    assert db.get_run(1)["error"] == "its metrics cannot be read: runs/run-1/metrics.jsonl is not a file"
    run = db.get_run(2)
    assert (run["status"], run["current_step"], run["last_loss"]) == ("completed", 2, 3.0), run
    db.close()


def test_links_planted_in_a_running_runs_folder_are_not_read_through(tmp_path):
    """metrics.jsonl and log.txt of a running run replaced by links to files outside the workspace: the outside
    metrics were served as the run's, and the outside file's last line became the run's error."""
    db, ws, sup = _two_running(tmp_path)
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    (outside / "secret.jsonl").write_text(json.dumps({"step": 7, "loss": 1.0, "secret": "S3CRET"}) + "\n")
    (outside / "secret.txt").write_text("root:x:0:0:S3CRET\n")
    run_dir = ws.run_path(1)
    (run_dir / "metrics.jsonl").symlink_to(outside / "secret.jsonl")
    (run_dir / "log.txt").symlink_to(outside / "secret.txt")
    sup.tick()
    run = db.get_run(1)
    assert db.get_metrics(1) == [] and (run["status"], run["error"]) == ("failed", "exit code 1"), run
    assert db.get_run(2)["status"] == "completed"
    assert (outside / "secret.jsonl").read_text().count("\n") == 1


def test_a_run_stopped_before_its_first_checkpoint_is_started_again_as_a_new_run(tmp_path):
    """A run killed before its first checkpoint, or cancelled while it waited in the queue, had nothing to
    resume from, and the app offered only Delete (the settings had to be entered again). Start again submits the
    stopped run's request anew, through the endpoint that made it: a new run with the same settings, checked as
    a new start is (the model's consent: a from-scratch run of a model trained since is refused as a new one
    is), the stopped run and its files left as they were. A run with a checkpoint is resumed, not started again."""
    server = ServerProcess(tmp_path).start()
    pid = None
    try:
        with server.client() as c:
            first = _setup(c, "again", save_every=100000)
            queued = _setup(c, "waited", max_steps=6, save_every=1000)
            assert _status(c, queued)["status"] == "queued"
            assert c.post(f"/api/v1/runs/{queued}/cancel").json()["status"] == "cancelled"
            r = _status(c, queued)
            assert not r["can_resume"] and r["can_restart"], r
            assert c.post(f"/api/v1/runs/{queued}/resume", json={}).status_code == 409

            pid = _wait(c, first, lambda r: r["current_step"] >= 3, "steps before any checkpoint")["pid"]
            os.kill(pid, signal.SIGKILL)
            r = _wait(c, first, lambda r: r["status"] != "running", "the supervisor to notice the death")
            assert r["status"] == "interrupted" and r["checkpoint_step"] is None, r
            assert not r["can_resume"] and r["can_restart"], r
            old_dir = tmp_path / "runs" / f"run-{first}"
            old_files = sorted(p.name for p in old_dir.iterdir())
            r = c.post(f"/api/v1/runs/{first}/restart")
            assert r.status_code == 201, r.text
            again = r.json()
            assert again["id"] not in (first, queued) and again["status"] in ("queued", "running")
            assert again["model"] == "again" and again["books"] == ["tales.txt"]
            assert again["params"] == _status(c, first)["params"]
            assert _status(c, first)["status"] == "interrupted"  # the stopped run, as it was
            assert sorted(p.name for p in old_dir.iterdir()) == old_files
            pid = _wait(c, again["id"], lambda r: r["status"] == "running" and r["current_step"] >= 2,
                        "the new run's steps")["pid"]
            assert c.post(f"/api/v1/runs/{again['id']}/cancel").status_code == 200
            r = _wait(c, again["id"], DONE, "the cancel's checkpoint")
            assert r["status"] == "cancelled" and r["can_resume"] and not r["can_restart"], r
            r = c.post(f"/api/v1/runs/{again['id']}/restart")
            assert r.status_code == 409 and "resume it instead" in r.json()["detail"], r.text

            r = c.post(f"/api/v1/runs/{queued}/restart")
            assert r.status_code == 201, r.text
            done = _wait(c, r.json()["id"], DONE, "the run that had waited")
            assert done["status"] == "completed" and done["current_step"] == 6, done
            # model "waited" is trained now: starting the cancelled from-scratch run again asks, as a new run would
            r = c.post(f"/api/v1/runs/{queued}/restart")
            assert r.status_code == 409 and "already has trained weights" in r.json()["detail"], r.text
            assert c.post(f"/api/v1/runs/{done['id']}/restart").status_code == 409  # completed
    finally:
        kill_run_process(pid)
        server.stop()


LINKED = "is a symbolic link; the server follows no links inside its workspace: remove it"


@pytest.mark.parametrize("plant", ["final", "training.json", "tokenizer.json", "report.html", "derived"])
def test_links_planted_in_a_finished_runs_output_fail_the_run(plant, tmp_path):
    """A finished run whose final/ (or a file in it), report or derived model/ is a link to something outside the
    workspace: the outside folder was copied into models/ as the model, an outside training.json's numbers
    became the model's origin and steps in the database, an outside file passed as an experiment's report. Now
    the run fails saying which link, nothing is registered, and nothing outside is read or changed."""
    outside = tmp_path.parent / f"{tmp_path.name}-outside"
    outside.mkdir()
    _final(outside, {"steps": 3, "final_reward": "S3CRET", "stop_reason": "S3CRET"})  # outside/final
    (outside / "final" / "S3CRET.txt").write_text("S3CRET")
    before = {p.name: p.read_bytes() for p in (outside / "final").iterdir()}
    if plant in ("final", "tokenizer.json"):
        db, ws, run_id, run_dir = _dead_run(tmp_path, "train", {"max_steps": 3})
        new = "start"
    elif plant == "training.json":
        db, ws, run_id, run_dir = _dead_run(tmp_path, "selfplay", {"new_model": "sp", "reward": "seed",
                                                                   "iterations": 3})
        new = "sp"
    elif plant == "report.html":
        db, ws, run_id, run_dir = _dead_run(tmp_path, "experiment", {"lab": "azr", "experiment": "azr", "seeds": [0]})
        new = None
    else:
        db, ws, run_id, run_dir = _dead_run(tmp_path, "quantize", {"new_model": "q", "to": "int8", "method": "rtn"})
        new = "q"
    linked = {"final": run_dir / "final", "training.json": run_dir / "final" / "training.json",
              "tokenizer.json": run_dir / "final" / "tokenizer.json", "report.html": run_dir / "report.html",
              "derived": run_dir / "model"}[plant]
    if plant in ("training.json", "tokenizer.json"):
        _final(run_dir, {"steps": 3, "final_reward": 0.5, "stop_reason": "max_steps"})
        linked.unlink()
    linked.symlink_to(outside / "final" / {"final": "", "derived": "", "report.html": "S3CRET.txt"}.get(plant, plant))
    Supervisor(db, ws).recover()
    run = db.get_run(run_id)
    made = {"train": "training", "selfplay": "self-play", "experiment": "lab experiment",
            "quantize": "quantization"}[run["kind"]]
    assert (run["status"], run["error"]) == (
        "failed", f"the {made} finished, but what it made was not used: {linked.relative_to(tmp_path)} {LINKED}"), run
    assert "S3CRET" not in json.dumps([run, db.list_models()], default=str)
    assert sorted(p.name for p in ws.models.iterdir()) == []
    if new is not None:
        assert db.get_model(new) is None or db.get_model(new)["trained_steps"] is None
    assert {p.name: p.read_bytes() for p in (outside / "final").iterdir()} == before
    db.close()


def test_staging_a_model_folder_follows_no_link(tmp_path):
    """A folder of final/ that is a link (one may be swapped in after final/ was checked): copytree went into it
    and the outside folder's files were linked into models/ as the model's; the copy now keeps links as links and
    refuses them. link_or_copy, given a link, links the link (os.link follows it where link(2) does, as on macOS):
    the file it points to is never linked into models/."""
    from lmlab.server.workspace import LinkError, link_or_copy, stage_dir

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "tokenizer.json").write_text("S3CRET")
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")
    (tmp_path / "final" / "hf_tokenizer").symlink_to(outside)
    (tmp_path / "models").mkdir()
    with pytest.raises(LinkError, match=f"^final/hf_tokenizer {LINKED}$"):
        stage_dir(tmp_path / "final", tmp_path / "models" / "m", tmp_path)
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == []
    assert os.stat(outside / "tokenizer.json").st_nlink == 1
    (tmp_path / "final" / "model.safetensors").symlink_to(outside / "tokenizer.json")
    link_or_copy(tmp_path / "final" / "model.safetensors", tmp_path / "copy")
    assert (tmp_path / "copy").is_symlink() and os.stat(outside / "tokenizer.json").st_nlink == 1
