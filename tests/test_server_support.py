"""Shared helpers for the web-app tests (no tests here): a book, fast training settings, an in-process
client, a real `lmlab serve` process, polling with a deadline, a kill -9 past a checkpoint, and a throwaway
PostgreSQL server."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("sqlalchemy")

import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from lmlab.server import Settings, build_asgi  # noqa: E402
from lmlab.train import checkpoint_step, latest_checkpoint  # noqa: E402
from lmlab.train.demo_corpus import demo_corpus  # noqa: E402

BOOK = demo_corpus(n_stories=60, seed=3)  # ~18 KB of English and Russian tales
# A tiny model and small batches: a step takes milliseconds, so a run is dominated by process start-up.
TINY_MODEL = {"preset": "gpt2-tiny", "vocab_size": 300, "block_size": 32}
FAST = {"batch_size": 4, "seq_len": 32, "eval_batches": 2, "lr": 1e-3}
TIMEOUT = float(os.environ.get("LMLAB_TEST_TIMEOUT", "180"))  # seconds for one training process to get somewhere


def wait_for(predicate, timeout: float = TIMEOUT, interval: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# Training processes of a tiny model run fastest on one thread, and on a busy 2-core machine two OpenMP
# threads per process spin against each other (steps go from ~10 ms to ~1 s).
CHILD_ENV = {"OMP_NUM_THREADS": "1"}


# LMLAB_TEST_POSTGRES=postgresql+psycopg://USER@HOST:PORT/postgres runs the server tests' state in PostgreSQL:
# each workspace gets a fresh database there, except one whose SQLite database a test wrote itself.
_DATABASES: dict[Path, str] = {}


def database_for(workspace: Path) -> str | None:
    server = os.environ.get("LMLAB_TEST_POSTGRES")
    if server and workspace not in _DATABASES and not (workspace / "lmlab.db").exists():
        _DATABASES[workspace] = new_database(server, f"t{uuid.uuid4().hex}")
    return _DATABASES.get(workspace)


def settings(tmp: Path, **overrides) -> Settings:
    return Settings(workspace=tmp, poll_s=0.2, child_env=CHILD_ENV, **{"database_url": database_for(tmp), **overrides})


# What a script sends with requests that change something (the server refuses them without it or a JSON body)
API_HEADERS = {"X-Lmlab-Request": "1"}


@contextmanager
def client(s: Settings, app=None, base_url: str = "http://127.0.0.1"):
    with TestClient(app or build_asgi(s), base_url=base_url, headers=API_HEADERS) as c:
        yield c


def upload(c, name: str = "tales.txt", data: bytes | None = None):
    return c.post("/api/v1/books", files={"file": (name, BOOK.encode() if data is None else data, "text/plain")})


def run_status(c, run_id: int) -> dict:
    r = c.get(f"/api/v1/runs/{run_id}")
    assert r.status_code == 200, r.text
    return r.json()


def wait_run(c, run_id: int, pred, what: str, timeout: float = TIMEOUT) -> dict:
    return wait_for(lambda: (lambda r: r if pred(r) else None)(run_status(c, run_id)), timeout, what=what)


def finished(c, run_id: int) -> dict:
    """The run once it is neither queued nor running."""
    return wait_run(c, run_id, lambda r: r["status"] not in ("queued", "running"), f"run {run_id}")


@contextmanager
def tiny_workspace(ws: Path, steps: int, save_every: int):
    """A client on `ws` with tales.txt uploaded, `blank` (never trained) and `tiny` trained for `steps` steps;
    c.workspace and c.train_run (the training run's id) are set."""
    with client(settings(ws, max_jobs=1)) as c:
        assert upload(c).status_code == 201
        for name in ("tiny", "blank"):
            assert c.post("/api/v1/models", json={"name": name, **TINY_MODEL}).status_code == 201
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": steps,
                                         "save_every": save_every, "eval_every": 0, **FAST})
        assert r.status_code == 201, r.text
        assert finished(c, r.json()["id"])["status"] == "completed"
        c.workspace, c.train_run = ws, r.json()["id"]
        yield c


def sse_events(c, path: str, method: str = "GET", until: str = "end", **request) -> list[tuple[str, dict]]:
    """(event, data) pairs of a Server-Sent Events endpoint, read until its `until` event (or its end)."""
    events, event = [], None
    with c.stream(method, path, **request) as r:
        assert r.headers["content-type"].startswith("text/event-stream"), (r.status_code, r.headers)
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: "):
                events.append((event, json.loads(line[6:])))
                if event == until:
                    break
    return events


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`lmlab serve` as a real OS process (uvicorn, signals, restarts), driven over HTTP."""

    def __init__(self, workspace: Path, *extra: str, token: str | None = None) -> None:
        self.workspace, self.extra, self.token = workspace, extra, token
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = workspace / f"serve-{self.port}.log"

    def start(self) -> ServerProcess:
        workspace_arg = ["--workspace", str(self.workspace), "--port", str(self.port)]
        if database_for(self.workspace):
            workspace_arg += ["--database-url", database_for(self.workspace)]
        token = ["--api-token", self.token] if self.token else []
        self.workspace.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "lmlab.cli", "serve", *workspace_arg, *token,
                                          *self.extra], stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, env={**os.environ, **CHILD_ENV})

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"lmlab serve exited: {self.log.read_text()[-2000:]}")
            try:
                return self.client().get("/api/v1/info").status_code == 200
            except httpx.HTTPError:
                return False
        wait_for(up, 60, 0.3, "the server to start")
        return self

    def client(self) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.Client(base_url=self.url, headers={**API_HEADERS, **headers}, timeout=60)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def stop(self) -> None:
        self.kill(signal.SIGTERM)


@contextmanager
def held_once_started(c, run_id: int):
    """The run's process, stopped (SIGSTOP) once it has imported its libraries, and continued on leaving: a
    cancel sent meanwhile reaches it before it can finish. Past torch's import: seen in CI under load, a SIGINT
    landing inside a C extension's import surfaced as another exception (exit 1); lmlab.models imports
    safetensors' extension after torch, inside the command's handler."""
    pid = wait_for(lambda: c.get(f"/api/v1/runs/{run_id}").json()["pid"], 60, 0.01, f"run {run_id} to start")
    wait_for(lambda: "_safetensors_rust" in Path(f"/proc/{pid}/maps").read_text(), 60, 0.01,
             f"run {run_id} to import its libraries")
    os.kill(pid, signal.SIGSTOP)
    try:
        yield pid
    finally:
        os.kill(pid, signal.SIGCONT)


def kill_run_process(pid: int | None) -> None:
    """Test clean-up: end a training process group that outlived its server."""
    if pid:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def kill_past_a_checkpoint(pid: int, run_dir: Path) -> None:
    """SIGKILL a training or self-play process at a moment when it has logged steps after its latest checkpoint
    (those lines must be dropped on resume). The process is frozen (SIGSTOP) while its files are read, so what
    was seen is what it leaves; the server's view (current_step) lags the files by a poll and cannot tell."""
    def logged_past_checkpoint():
        os.kill(pid, signal.SIGSTOP)
        # the signal is delivered asynchronously: on its own core the process may write on for a moment
        wait_for(lambda: "State:\tT" in open(f"/proc/{pid}/status").read(), 10, 0.001, "the process to stop")
        ckpt = latest_checkpoint(run_dir)
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        if ckpt is not None and lines and json.loads(lines[-1])["step"] > checkpoint_step(ckpt):
            return True
        os.kill(pid, signal.SIGCONT)
        return False
    wait_for(logged_past_checkpoint, 60, 0.05, "steps logged after a checkpoint")
    os.kill(pid, signal.SIGKILL)


def postgres_bin() -> Path | None:
    """The folder of PostgreSQL's server programs: Debian's `postgresql` package keeps initdb and pg_ctl off
    PATH, in /usr/lib/postgresql/VERSION/bin."""
    found = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)),
                                           None)
    return Path(found).parent if found else None


@contextmanager
def postgres_server():
    """A throwaway PostgreSQL cluster in a temporary folder, on a free port of 127.0.0.1, trusting local
    connections: yields the SQLAlchemy URL of its `postgres` database. The server refuses to run as root, so
    under root it runs as the `postgres` user (runuser). Skips the test where the programs or the driver
    (psycopg 3) are missing."""
    pytest.importorskip("psycopg")
    bindir = postgres_bin()
    if bindir is None:
        pytest.skip("PostgreSQL's server programs are not installed (Debian: apt-get install postgresql)")
    as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder = Path(tempfile.mkdtemp(prefix="lmlab-pg-"))
    if as_user:
        shutil.chown(folder, "postgres")
    data, port = folder / "data", free_port()

    def pg(*args: str) -> None:
        subprocess.run([*as_user, *args], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                       stdin=subprocess.DEVNULL, cwd=folder, timeout=120)
    try:
        pg(str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
        pg(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(folder / "log"), "-w", "-o",
           f"-p {port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off", "start")
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
        finally:
            pg(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def new_database(server_url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `server_url` (its `postgres` database); its URL."""
    from sqlalchemy import create_engine, text

    engine = create_engine(server_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    engine.dispose()
    return server_url.rsplit("/", 1)[0] + "/" + name
