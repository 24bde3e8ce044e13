"""Lab experiments as web-app jobs, against a real `lmlab serve` process that launches the labs' own CLI
commands: a quick Absolute Zero run goes queued -> running -> completed and its report.html (under a
script-free CSP), results.json and plots are served from its run directory and nothing else is (path
traversal, encoded dots, absolute paths, symlinks, names outside the allow-list); request bodies are
validated field by field against the labs' own lists; a running experiment cancels to `cancelled`; an
experiment never becomes a model and is never resumable. The facts lab's quick runs take minutes here, so it
is checked by the command the server builds (parsed by the real CLI parser), not run end to end."""

from __future__ import annotations

import http.client
import json
import os

import pytest
from test_server_support import (
    FAST,
    TINY_MODEL,
    ServerProcess,
    client,
    kill_run_process,
    run_status,
    settings,
    upload,
    wait_for,
    wait_run,
)

from lmlab.cli import build_parser
from lmlab.configs import parse_seeds
from lmlab.lab.facts.experiments import EXPERIMENTS
from lmlab.server.commands import experiment_command
from lmlab.server.jobs import process_alive
from lmlab.server.workspace import Workspace

QUICK_AZR = {"lab": "azr", "quick": True, "seeds": [0], "workers": 1}  # ~10 s of work on one core
DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A server, and one quick AZR experiment run to its end: (client, server, the run as first returned,
    the statuses seen while polling it, the finished run)."""
    server = ServerProcess(tmp_path_factory.mktemp("ws")).start()
    try:
        with server.client() as c:
            r = c.post("/api/v1/runs/experiment", json=QUICK_AZR)
            assert r.status_code == 201, r.text
            first, seen = r.json(), []

            def finished():
                run = run_status(c, first["id"])
                if not seen or seen[-1] != run["status"]:
                    seen.append(run["status"])
                return run if DONE(run) else None
            last = wait_for(finished, what="the experiment to finish")
            yield c, server, first, seen, last
    finally:
        server.stop()


def test_an_experiment_runs_to_completion_without_a_model(lab):
    c, server, first, seen, run = lab
    assert first["status"] == "queued" and first["kind"] == "experiment" and first["model"] == ""
    assert seen == [s for s in ("queued", "running", "completed") if s in seen], seen  # in order, nothing else
    assert run["status"] == "completed", (run["error"], c.get(f"/api/v1/runs/{run['id']}/log").json())
    assert run["exit_code"] == 0 and run["launches"] == 1 and run["started_at"] <= run["finished_at"]
    assert run["params"] == {"lab": "azr", "experiment": "azr", "quick": True, "seeds": [0], "workers": 1}
    assert run["can_resume"] is False and run["checkpoint_step"] is None
    assert c.get("/api/v1/models").json() == []  # it never appears as a model
    assert [r["id"] for r in c.get("/api/v1/runs", params={"kind": "experiment"}).json()] == [run["id"]]
    lines = c.get(f"/api/v1/runs/{run['id']}/log").json()["lines"]
    assert any(ln.startswith("$ lmlab selfplay azr --out ") and ln.endswith("--seeds 0 --quick --workers 1")
               for ln in lines), lines
    assert c.post(f"/api/v1/runs/{run['id']}/resume", json={}).status_code == 409


def test_its_report_results_and_plots_are_served(lab):
    c, server, _, _, run = lab
    rid = run["id"]
    r = c.get(f"/api/v1/runs/{rid}/report")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src" not in csp and "img-src 'self' data:" in csp
    assert "frame-ancestors 'self'" in csp and r.headers["x-frame-options"] == "SAMEORIGIN"
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "<h1>Absolute Zero miniature</h1>" in r.text and "<script" not in r.text.lower()
    # its plots are inlined (allowed by img-src data:), so the served page shows them without more requests
    assert r.text.count('src="data:image/png;base64,') == 2
    results = c.get(f"/api/v1/runs/{rid}/files/results.json")
    assert results.status_code == 200 and results.headers["content-type"] == "application/json"
    body = json.loads(results.content)
    assert body["experiment"] == "selfplay-azr" and body["seeds"] == [0]
    for plot in ("solve_rate.png", "proposer.png"):
        p = c.get(f"/api/v1/runs/{rid}/files/{plot}")
        assert p.status_code == 200 and p.headers["content-type"] == "image/png"
        assert p.content.startswith(b"\x89PNG\r\n\x1a\n")
        assert p.content == (Workspace(server.workspace).run_path(rid) / plot).read_bytes()


def _raw_get(server, path: str) -> tuple[int, bytes]:
    """GET a path exactly as written (httpx would normalise `..` and re-encode)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_only_its_own_files_are_served(lab, tmp_path):
    c, server, _, _, run = lab
    rid, run_dir = run["id"], Workspace(server.workspace).run_path(run["id"])
    secret = tmp_path / "secret.json"
    secret.write_text('{"x": "SECRET-CONTENT"}')
    (run_dir / "outside.json").symlink_to(secret)          # a symlink out of the run directory
    (run_dir / "inside.png").symlink_to(run_dir / "solve_rate.png")  # a symlink even to its own file
    (run_dir / "sub").mkdir()
    (run_dir / "sub" / "results.json").write_text('{"x": "NESTED-CONTENT"}')
    (run_dir / ".hidden.json").write_text('{"x": "HIDDEN-CONTENT"}')
    base = f"/api/v1/runs/{rid}/files/"
    attempts = ["../../../../etc/passwd", "..%2f..%2f..%2fetc%2fpasswd", "%2e%2e", "%2e%2e%2fresults.json",
                "..", ".", "%2fetc%2fpasswd", f"{secret}", "%2F" + str(secret).lstrip("/").replace("/", "%2F"),
                "outside.json", "inside.png", "sub/results.json", "sub%2fresults.json", ".hidden.json",
                "log.txt", "progress.jsonl", "results.json%00.png", "RESULTS.JSON", "x" * 300]
    for name in attempts:
        status, body = _raw_get(server, base + name)
        assert status in (400, 404, 422), (name, status, body[:200])
        assert b"root:" not in body and b"\x89PNG" not in body and b"-CONTENT" not in body, (name, body[:200])
    status, _ = _raw_get(server, base + "results.json")  # the same raw request for an allowed name works
    assert status == 200


def test_a_running_experiment_cancels(lab):
    c, server, _, _, _ = lab
    # the full-size AZR run takes minutes: it is still running when the cancel arrives, on any machine
    r = c.post("/api/v1/runs/experiment", json={"lab": "azr", "seeds": [1], "workers": 1})
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    running = wait_run(c, rid, lambda r: r["status"] == "running" or DONE(r), "the experiment to start")
    try:
        assert running["status"] == "running", running
        none_yet = c.get(f"/api/v1/runs/{rid}/report")
        assert none_yet.status_code == 404 and "no report yet" in none_yet.json()["detail"]
        assert c.post(f"/api/v1/runs/{rid}/cancel").json()["cancel_requested"] is True
        run = wait_run(c, rid, DONE, "the cancelled experiment to stop")
        assert run["status"] == "cancelled" and run["stop_reason"] == "cancelled", run
        assert run["can_resume"] is False and run["pid"] is None
        assert not process_alive(running["pid"])
        r = c.post(f"/api/v1/runs/{rid}/resume", json={})
        assert r.status_code == 409 and "keeps no checkpoints and cannot be resumed" in r.json()["detail"], r.text
        assert c.get("/api/v1/models").json() == []
        assert c.delete(f"/api/v1/runs/{rid}").status_code == 204
    finally:
        kill_run_process(running["pid"])


def test_other_runs_serve_no_files(tmp_path):
    with client(settings(tmp_path)) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
        r = c.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 2, **FAST})
        rid = r.json()["id"]
        for path in ("report", "files/config.json"):
            r = c.get(f"/api/v1/runs/{rid}/{path}")
            assert r.status_code == 404 and "only lab experiment runs serve files" in r.json()["detail"], r.text
        assert c.get("/api/v1/runs/99/report").json()["detail"] == "run 99 not found"


BAD = [({"lab": "nope"}, "lab"),
       ({"lab": "facts"}, "experiment"),
       ({"lab": "facts", "experiment": "nope"}, "experiment"),
       ({"lab": "facts", "experiment": "all"}, "experiment"),  # the CLI's `all` nests its reports
       ({"lab": "azr", "experiment": "phases"}, "experiment"),
       ({"lab": "azr", "seeds": [-1]}, "seeds"),
       ({"lab": "azr", "seeds": [0, 0]}, "seeds"),
       ({"lab": "azr", "seeds": [0, 1, 2, 3, 4, 5]}, "seeds"),
       ({"lab": "azr", "seeds": []}, "seeds"),
       ({"lab": "azr", "seeds": "0,1"}, "seeds"),
       ({"lab": "azr", "workers": 0}, "workers"),
       ({"lab": "azr", "workers": (os.cpu_count() or 1) + 1}, "workers"),
       ({"lab": "azr", "quick": "maybe"}, "quick"),
       ({"lab": "azr", "out": "/tmp/x"}, "out")]


def test_bad_bodies_are_422_naming_the_field(tmp_path):
    with client(settings(tmp_path)) as c:
        for body, field in BAD:
            r = c.post("/api/v1/runs/experiment", json=body)
            assert r.status_code == 422, (body, r.text)
            errors = r.json()["detail"]
            assert [e["loc"] for e in errors] == [["body", field]] or (
                field == "seeds" and all(e["loc"][:2] == ["body", "seeds"] for e in errors)), (body, errors)
            assert all(e["msg"] for e in errors)
        assert "must be one of " + ", ".join(EXPERIMENTS) in c.post(
            "/api/v1/runs/experiment", json={"lab": "facts", "experiment": "nope"}).json()["detail"][0]["msg"]
        assert c.get("/api/v1/runs").json() == []  # nothing was queued
        info = c.get("/api/v1/info").json()
        assert info["facts_experiments"] == list(EXPERIMENTS) and info["max_seeds"] == 5


@pytest.mark.parametrize("params", [
    {"lab": "facts", "experiment": "plateau", "quick": True, "seeds": [3, 5], "workers": 2},
    {"lab": "facts", "experiment": "memory", "quick": False, "seeds": [7]},
    {"lab": "azr", "experiment": "azr", "quick": True, "seeds": [4]},
    {"lab": "azr", "experiment": "azr", "quick": False, "seeds": [0, 2], "workers": 1}])
def test_the_command_is_the_labs_own(params, tmp_path):
    """The argv the supervisor launches, read back by the real `lmlab` parser and the lab's seed parser."""
    args = build_parser().parse_args(experiment_command(params, tmp_path))
    assert args.out == str(tmp_path) and args.quick is params["quick"]
    assert args.workers == params.get("workers", 2 if params["lab"] == "azr" else None)
    if params["lab"] == "facts":
        assert (args.lab, args.verb) == ("facts", params["experiment"])
        assert parse_seeds(args.seeds) == params["seeds"]
    else:
        assert args.mode == "azr" and parse_seeds(args.seeds) == params["seeds"]


@pytest.mark.parametrize("stopped_by", ["cancel", "server stop"])
def test_an_experiment_stopped_early_is_not_completed_by_its_partial_report(stopped_by, tmp_path):
    """The facts lab answers SIGINT as training does (the step loop stops early and returns), so a lab stopped
    by a cancel or a server stop may still write report.html from a cut-short run and exit 0: that run was
    stopped, and its report is no result."""
    from lmlab.server.db import Database
    from lmlab.server.jobs import Supervisor

    ws = Workspace(tmp_path)
    db = Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    run = db.add_run("", [], {"lab": "facts", "experiment": "plateau", "seeds": [0]}, False, None, kind="experiment")
    db.update_run(run["id"], status="running", cancel_requested=stopped_by == "cancel")
    ws.run_path(run["id"]).mkdir(parents=True)
    (ws.run_path(run["id"]) / "report.html").write_text("<!doctype html><p>does not hold</p>")
    Supervisor(db, ws)._finish(run["id"], 0, server_stopped=stopped_by == "server stop")
    done = db.get_run(run["id"])
    expected = "cancelled" if stopped_by == "cancel" else "interrupted"
    assert done["status"] == expected and done["stop_reason"] == expected, done
    if stopped_by == "server stop":
        assert "cannot be resumed; start it again" in done["error"], done


def test_the_token_in_a_report_link_stays_out_of_the_access_log(tmp_path):
    """The UI's report link and frame (like its downloads) carry the API token as ?token=, and uvicorn logs
    every request line: the log shows the request, not the token."""
    token = "not-in-the-log-0123"
    server = ServerProcess(tmp_path / "ws", token=token).start()
    try:
        with server.client() as c:
            del c.headers["authorization"]  # the token goes in the URL, as in the UI's links
            r = c.get(f"/api/v1/runs/1/report?lines=2&token={token}")
            assert r.status_code == 404, r.text  # authorised: there is no run 1
            logged = wait_for(lambda: [line for line in server.log.read_text().splitlines()
                                       if "/api/v1/runs/1/report" in line], 30, what="the request in the log")
    finally:
        server.stop()
    assert "token=***" in logged[0] and "lines=2" in logged[0], logged
    assert token not in server.log.read_text().replace(f"/?token={token}", ""), "only the printed address has it"


@pytest.mark.parametrize("status", ["cancelled", "interrupted", "failed"])
def test_a_stopped_experiment_serves_no_report(status, tmp_path):
    """A facts lab stopped by a cancel or with its server (an orphan outliving a killed server is asked to
    stop) can still write report.html from its cut-short run: only a completed run's report is a result."""
    from lmlab.server.db import Database

    db = Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    run = db.add_run("", [], {"lab": "facts", "experiment": "phases", "seeds": [0]}, False, None, kind="experiment")
    db.update_run(run["id"], status=status)
    db.close()
    run_dir = Workspace(tmp_path).run_path(run["id"])
    run_dir.mkdir(parents=True)
    for name in ("report.html", "results.json"):
        (run_dir / name).write_text("{}")
    with client(settings(tmp_path)) as c:
        for path in ("report", "files/report.html", "files/results.json"):
            r = c.get(f"/api/v1/runs/{run['id']}/{path}")
            assert r.status_code == 404 and f"is {status}" in r.json()["detail"], (path, r.text)
