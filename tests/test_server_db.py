"""Two servers on one database: each queued run is launched by exactly one of them (claimed by a conditional
UPDATE), a starting server leaves the other's running runs alone, a cancel reaches a run through either
server, and a process is known by its pid and its start time, never by a substring of its command line
(`run-1` is not `run-10`). On SQLite and on a real PostgreSQL server, started here when its programs are
installed (Debian: `apt-get install postgresql`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from test_server_support import new_database, postgres_server, wait_for

from lmlab.server.db import MIGRATIONS, Database, schema_drift
from lmlab.server.jobs import Supervisor, process_alive, process_start
from lmlab.server.workspace import Workspace

AZR = {"lab": "azr", "experiment": "azr", "seeds": [0]}  # an experiment: a run that needs no model


@pytest.fixture(scope="module")
def postgres():
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'lmlab.db'}"
    return new_database(request.getfixturevalue("postgres"), f"t{uuid.uuid4().hex}")


def _fake_python(tmp_path, body: str) -> str:
    """An executable standing in for the Python that runs a job (`PYTHON -c CODE lmlab-args...`): `body` is
    its shell script, so a launch costs no interpreter start-up."""
    path = tmp_path / "python"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def _sleeper(*args: str) -> subprocess.Popen:
    """A process whose command line holds `args`, returned once it does: between fork and exec the child's
    /proc/PID/cmdline is still its parent's (pytest's)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)", *args])
    want = [os.fsencode(a) for a in args]
    deadline = time.monotonic() + 30
    while Path("/proc").is_dir() and not all(a in Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
                                             for a in want):
        assert time.monotonic() < deadline, "the child never started"
        time.sleep(0.01)
    return proc


def test_the_schema_migrates_and_runs_are_claimed_once(url):
    db = Database(url)
    try:
        assert db.version == MIGRATIONS[-1][0] and schema_drift(db.engine) == []
        Database(url).close()  # re-opening applies nothing twice
        run = db.add_run("", [], AZR, False, None, kind="experiment")
        assert db.update_run(run["id"], where={"status": "queued"}, status="running", owner="a") is True
        assert db.update_run(run["id"], where={"status": "queued"}, status="running", owner="b") is False
        assert db.update_run(run["id"], where={"owner": None}, owner="c") is False
        assert db.get_run(run["id"])["owner"] == "a"
    finally:
        db.close()


def test_version_4_adds_run_lineage_to_a_version_3_database_even_half_done(url):
    """A database of version 3 with a run, one of version 4's columns already added (pysqlite commits each
    ALTER at once, so a start-up cut short leaves that): opening it migrates to 4, the run keeps its row with
    no parent, and a new run records its parent and step offset."""
    from sqlalchemy import create_engine, text

    from lmlab.server.db import migrate

    engine = create_engine(url)
    assert migrate(engine, MIGRATIONS[:3]) == 3
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO runs (model_name, books, params, init_from_trained, status, resume, "
                          "cancel_requested, current_step, launches, metrics_epoch, created_at, updated_at, kind) "
                          "VALUES ('m', '[]', '{}', false, 'completed', false, false, 12, 1, 0, 1.0, 1.0, 'train')"))
        conn.execute(text("ALTER TABLE runs ADD COLUMN parent_run_id INTEGER"))
    engine.dispose()
    db = Database(url)
    try:
        assert db.version == MIGRATIONS[-1][0] and schema_drift(db.engine) == []
        old = db.list_runs()[0]
        assert (old["current_step"], old["parent_run_id"], old["step_offset"]) == (12, None, None)
        new = db.add_run("m", [], {}, True, 4, parent_run_id=old["id"], step_offset=12)
        assert (db.get_run(new["id"])["parent_run_id"], db.get_run(new["id"])["step_offset"]) == (old["id"], 12)
    finally:
        db.close()


def test_a_deleted_runs_id_is_never_given_again(url):
    """SQLite gave the largest rowid again once its row was deleted: a model's lineage, a link or an open tab
    naming the deleted run then reached another. A database of version 4 goes on from its largest id."""
    from sqlalchemy import create_engine, text

    from lmlab.server.db import migrate

    engine = create_engine(url)
    assert migrate(engine, MIGRATIONS[:4]) == 4
    with engine.begin() as conn:
        for _ in range(2):
            conn.execute(text("INSERT INTO runs (model_name, books, params, init_from_trained, status, resume, "
                              "cancel_requested, current_step, launches, metrics_epoch, created_at, updated_at, "
                              "kind) VALUES ('m', '[]', '{}', false, 'completed', false, false, 1, 1, 0, 1.0, 1.0, "
                              "'train')"))
    engine.dispose()
    db = Database(url)
    try:
        assert sorted(r["id"] for r in db.list_runs()) == [1, 2]
        ids = []
        for _ in range(3):
            ids.append(db.add_run("m", [], {}, False, 4)["id"])
            db.delete_run(ids[-1])
        assert ids == [3, 4, 5]
        assert db.add_run("m", [], {}, False, 4)["id"] == 6
    finally:
        db.close()


def test_two_servers_launch_each_queued_run_once(url, tmp_path):
    """Two supervisors with their own database connections over one workspace folder (as two machines sharing
    a file system and a PostgreSQL server would be) both read the same 8 queued runs before either launches
    one (a barrier holds each after its read): each run is launched once, by one of them."""
    n = 8
    root = tmp_path / "shared"
    dbs = [Database(url), Database(url)]
    runs = [dbs[0].add_run("", [], AZR, False, None, kind="experiment")["id"] for _ in range(n)]
    barrier = threading.Barrier(2, timeout=60)
    for db in dbs:
        read = db.queued_runs
        db.queued_runs = lambda read=read: (read(), barrier.wait())[0]  # both have read the queue: go on
    python = _fake_python(tmp_path, "exec sleep 300")
    sups = [Supervisor(db, Workspace(root), max_jobs=n, python=python) for db in dbs]
    try:
        ticks = [threading.Thread(target=s.tick) for s in sups]
        for t in ticks:
            t.start()
        for t in ticks:
            t.join()
        launched = [sorted(s.running()) for s in sups]
        assert sorted(launched[0] + launched[1]) == runs, launched
        for run_id in runs:
            run = dbs[1].get_run(run_id)
            assert run["status"] == "running" and run["launches"] == 1, run
            log = (root / "runs" / f"run-{run_id}" / "log.txt").read_text()
            assert log.count("$ lmlab ") == 1, log
            owner = sups[0] if run_id in launched[0] else sups[1]
            assert run["owner"] == owner.owner and run["pid_start"] == process_start(run["pid"]), run
    finally:
        for s, db in zip(sups, dbs):
            s.shutdown(timeout=10)
            db.close()


def test_a_starting_server_leaves_the_other_servers_runs_and_a_cancel_reaches_them(url, tmp_path):
    """Server B starts while server A runs a job: B's recovery neither interrupts nor adopts it (A is alive); a
    cancel asked through B reaches the process through A, which finishes the run."""
    root = tmp_path / "shared"
    db_a, db_b = Database(url), Database(url)
    run_id = db_a.add_run("", [], AZR, False, None, kind="experiment")["id"]
    # a run's process starts with SIGINT ignored (commands.child_argv) until its bootstrap restores it and then
    # stops at once if the stop file is there (a cancel that came first), as this does
    answers = ("import os, signal, sys, time; signal.signal(signal.SIGINT, signal.SIG_DFL); "
               "os.path.exists(os.environ.get(\"LMLAB_STOP_FILE\", \"\")) and sys.exit(130); time.sleep(300)")
    a = Supervisor(db_a, Workspace(root), python=_fake_python(tmp_path, f"exec {sys.executable} -c '{answers}'"),
                   poll_s=0.05)
    b = Supervisor(db_b, Workspace(root), poll_s=0.05)
    try:
        a.tick()
        pid = db_a.get_run(run_id)["pid"]
        assert process_alive(pid)
        b.start()
        run = db_b.get_run(run_id)
        assert run["status"] == "running" and run["owner"] == a.owner and run["error"] is None, run
        assert b.running() == [] and process_alive(pid)
        assert b.cancel(run_id)["cancel_requested"] is True
        a.start()
        run = wait_for(lambda: (lambda r: r if r["status"] != "running" else None)(db_b.get_run(run_id)), 60,
                       what="the cancelled run to stop")
        # it dies of SIGINT, or, if the cancel came before its handler, exits 130 as the bootstrap does
        assert run["status"] == "cancelled" and run["exit_code"] in (-signal.SIGINT, 130), run
    finally:
        for s, db in ((a, db_a), (b, db_b)):
            s.shutdown(timeout=10)
            db.close()


def test_a_process_is_known_by_its_pid_and_start_time(tmp_path):
    proc = _sleeper(str(tmp_path / "runs" / "run-10"))
    try:
        start = process_start(proc.pid)
        assert start is not None and process_alive(proc.pid, start)
        assert not process_alive(proc.pid, start + "0")  # a later process that was given the same pid
        # a run recorded without a start time (by an older lmlab): its run directory, as one whole argument
        assert process_alive(proc.pid, None, str(tmp_path / "runs" / "run-10"))
        assert not process_alive(proc.pid, None, str(tmp_path / "runs" / "run-1"))
    finally:
        proc.kill()
        proc.wait()
    assert not process_alive(proc.pid, start) and not process_alive(proc.pid)


@pytest.mark.parametrize("recorded_start", ["none (an older lmlab)", "another process's"])
def test_recovery_does_not_take_run_10s_process_for_run_1s(recorded_start, tmp_path):
    """Run 1 was left running by a killed server, with a pid that now belongs to run 10's process (whose
    command line contains `run-1` as a substring): the next server neither signals nor adopts that process,
    and finishes run 1 as stopped."""
    ws = Workspace(tmp_path)
    db = Database(ws.sqlite_url())
    ids = [db.add_run("", [], AZR, False, None, kind="experiment")["id"] for _ in range(10)]
    assert ids[0] == 1 and ids[-1] == 10
    other = _sleeper("--out", str(ws.run_path(10)))
    try:
        start = {} if recorded_start.startswith("none") else {"pid_start": process_start(os.getpid())}
        db.update_run(1, status="running", pid=other.pid, **start)
        ws.run_path(1).mkdir()
        sup = Supervisor(db, ws)
        sup.recover()
        assert sup.running() == [] and other.poll() is None  # not signalled
        run = db.get_run(1)
        assert run["status"] == "interrupted" and run["pid"] is None, run
    finally:
        other.kill()
        other.wait()
        db.close()
