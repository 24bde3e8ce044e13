"""Training jobs survive what kills processes: `kill -9` of the training process, and `kill -9` of the
server itself. Both leave a run that shows as interrupted and resumes from its last checkpoint, with one
metrics line per step (nothing lost, nothing twice). Uses a real `lmlab serve` process."""

from __future__ import annotations

import json
import os
import signal

from test_server_support import (
    BOOK,
    FAST,
    TINY_MODEL,
    ServerProcess,
    kill_past_a_checkpoint,
    kill_run_process,
    wait_for,
)

LONG = {"books": ["tales.txt"], "max_steps": 100000, "save_every": 3, "log_every": 1, "eval_every": 0, **FAST}


def _status(c, run_id):
    return c.get(f"/api/v1/runs/{run_id}").json()


def _wait(c, run_id, pred, what, timeout=180):
    return wait_for(lambda: (lambda r: r if pred(r) else None)(_status(c, run_id)), timeout, 0.3, what)


def _setup(c, model):
    if "tales.txt" not in c.get("/books").json()["books"]:
        assert c.post("/api/v1/books", files={"file": ("tales.txt", BOOK.encode(), "text/plain")}).status_code == 201
    assert c.post("/api/v1/models", json={"name": model, **TINY_MODEL}).status_code == 201
    r = c.post("/api/v1/runs", json={"model": model, **LONG})
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
    server = ServerProcess(tmp_path).start()
    pid = None
    try:
        with server.client() as c:
            run_id = _setup(c, "restart")
            r = _wait(c, run_id, lambda r: (r["checkpoint_step"] or 0) >= 3, "a checkpoint")
            pid = r["pid"]
        server.kill(signal.SIGKILL)  # no shutdown hook runs: the child is orphaned, still training
        assert os.path.exists(f"/proc/{pid}") or os.name != "posix"
        server = ServerProcess(tmp_path).start()
        with server.client() as c:
            r = _status(c, run_id)
            assert r["status"] == "interrupted" and "server stopped" in r["error"], r
            # the orphan was asked to checkpoint and exit; resume waits for it, then continues from its last
            # checkpoint (which may be later than the one seen before the server died)
            wait_for(lambda: not os.path.exists(f"/proc/{pid}") or
                     "State:\tZ" in open(f"/proc/{pid}/status").read(), 60, 0.3, "the orphan to exit")
            step = _status(c, run_id)["checkpoint_step"]
            assert step >= 3
            assert c.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": step + 3}).status_code == 200
            _check_resumed(c, tmp_path, run_id, step)
    finally:
        kill_run_process(pid)
        server.stop()
