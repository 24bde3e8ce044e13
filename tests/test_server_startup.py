"""`lmlab serve` refuses to start in one line (`lmlab: error: ...`, exit 2) before anything runs: a busy port, a
workspace another server holds, a planted `.server.lock` link, a database URL it cannot open. A refused start
leaves queued runs queued (the supervisor used to start before uvicorn bound its port)."""

from __future__ import annotations

import os
import socket

import pytest
from test_server_support import free_port

from lmlab.cli import main
from lmlab.models import ModelConfig
from lmlab.server import Settings
from lmlab.server.app import AppState
from lmlab.server.db import Database
from lmlab.server.jobs import Supervisor
from lmlab.server.workspace import Workspace


def serve(tmp_path, *flags):
    return main(["serve", "--workspace", str(tmp_path), "--port", str(free_port()), *flags])


def test_a_busy_port_leaves_the_queue_alone(tmp_path, capsys):
    db = Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    db.add_model("start", ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32).to_dict(), None, "char", 128)
    run_id = db.add_run("start", [], {"max_steps": 5}, False, 5)["id"]
    db.close()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--workspace", str(tmp_path), "--port", str(port)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == f"lmlab: error: cannot listen on 127.0.0.1:{port}: Address already in use", err
    db = Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    run = db.get_run(run_id)
    assert (run["status"], run["launches"], run["error"]) == ("queued", 0, None), run
    db.close()


def test_a_second_server_on_the_workspace_is_one_line(tmp_path, capsys):
    first = AppState(Settings(workspace=tmp_path))
    first.lock_workspace()
    try:
        assert serve(tmp_path) == 2
    finally:
        first.unlock_workspace()
        first.db.close()
    assert capsys.readouterr().err.splitlines()[-1] == \
        f"lmlab: error: another lmlab serve is using the workspace {Workspace(tmp_path).root}"


def test_a_planted_server_lock_link_is_one_line(tmp_path, capsys):
    (tmp_path / "elsewhere").write_text("keep")
    Workspace(tmp_path)
    os.symlink(tmp_path / "elsewhere", tmp_path / ".server.lock")
    assert serve(tmp_path) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1].startswith("lmlab: error: ") and ".server.lock" in err, err
    assert (tmp_path / "elsewhere").read_text() == "keep"


@pytest.mark.parametrize("url, message", [
    ("nonsense://x", "cannot open the database nonsense://x: Can't load plugin: sqlalchemy.dialects:nonsense"),
    ("notaurl", "cannot open the database notaurl:...: Could not parse SQLAlchemy URL from given URL string"),
    # nothing listens on port 1; the password is not printed
    ("postgresql+psycopg://me:secret@127.0.0.1:1/lab",
     "cannot open the database postgresql+psycopg://me:***@127.0.0.1:1/lab: "),
])
def test_a_database_that_cannot_be_opened_is_one_line(tmp_path, capsys, url, message):
    if url.startswith("postgresql"):
        pytest.importorskip("psycopg")
    assert serve(tmp_path / "ws", "--database-url", url) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "secret" not in err and len(err.splitlines()) == 1, err
    assert err.startswith(f"lmlab: error: {message}"), err
    assert not (tmp_path / "ws").exists()  # its folders were made first: a refused start left a workspace

    (tmp_path / "kept").mkdir()  # a workspace path below folders that exist: only the folders made go
    assert serve(tmp_path / "kept" / "a" / "ws", "--database-url", url) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())


def test_a_sqlite_file_inside_a_new_workspace_opens(tmp_path):
    """The given database may live in the workspace it names, which does not exist yet: its folders come first."""
    url = f"sqlite:///{tmp_path / 'new' / 'ws' / 'lab.db'}"
    state = AppState(Settings(workspace=tmp_path / "new" / "ws", database_url=url))
    try:
        assert state.db.list_models() == [] and (tmp_path / "new" / "ws" / "lab.db").is_file()
    finally:
        state.db.close()


def test_a_run_stopped_before_its_first_checkpoint_is_not_offered_a_resume(tmp_path):
    ws, db = Workspace(tmp_path), Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    db.add_model("start", ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32).to_dict(), None, "char", 128)
    bare, saved = (db.add_run("start", [], {"max_steps": 5}, False, 5)["id"] for _ in range(2))
    for run_id in (bare, saved):
        db.update_run(run_id, status="running", pid=None, launches=1)
        ws.run_path(run_id).mkdir(parents=True)
    (ws.run_path(saved) / "checkpoints" / "step-2").mkdir(parents=True)
    Supervisor(db, ws).recover()
    assert db.get_run(bare)["error"] == ("its process ended while no server was watching it; it stopped before its "
                                         "first checkpoint; start it again")
    assert db.get_run(saved)["error"] == ("its process ended while no server was watching it; resume to continue "
                                          "from the last checkpoint")
    db.close()
