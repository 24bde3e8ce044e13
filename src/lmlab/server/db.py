"""The server's database: what the workspace holds (books, models, runs, metrics), indexed for the API.

The files stay the truth for weights and text; the database holds names, settings, job state and the
metrics stream, so the UI survives a closed tab and the server survives a restart. SQLite in the workspace
by default; any SQLAlchemy URL (PostgreSQL) works, since only SQLAlchemy Core and portable types are used.

Migrations are a versioned list of functions (`MIGRATIONS`), each run once in its own transaction and
recorded in `schema_version`. On SQLite that transaction does not cover DDL (pysqlite commits each ALTER
as it runs), so a migration must also be safe to run again over its own half-done work. That is all
Alembic would do for these four tables, without its ini file, env.py and template engine; a database
newer than this code is refused rather than guessed at.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import (
    Boolean,
    Column,
    Connection,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import Engine

# ---- the current schema (what queries use); must equal the result of running every migration ----------

metadata = MetaData()

books = Table(
    "books", metadata,
    Column("name", String(200), primary_key=True),
    Column("size_bytes", Integer, nullable=False),
    Column("chars", Integer, nullable=False),
    Column("encoding", String(32), nullable=False),
    Column("created_at", Float, nullable=False),
)

models = Table(
    "models", metadata,
    Column("name", String(100), primary_key=True),
    Column("config", Text, nullable=False),            # ModelConfig JSON
    Column("preset", String(64)),
    Column("tokenizer_kind", String(16), nullable=False),
    Column("tokenizer_vocab", Integer, nullable=False),
    Column("trained_run_id", Integer),                 # the run whose final weights models/<name>/ holds
    Column("trained_steps", Integer),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Column("origin", Text),                            # JSON: how a derived model was made (self-play of ...)
)

runs = Table(
    "runs", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("model_name", String(100), nullable=False, index=True),
    Column("books", Text, nullable=False),             # JSON list of book names
    Column("params", Text, nullable=False),            # JSON TrainConfig fields
    Column("init_from_trained", Boolean, nullable=False),
    Column("status", String(16), nullable=False, index=True),
    Column("resume", Boolean, nullable=False),         # the next launch continues from the last checkpoint
    Column("cancel_requested", Boolean, nullable=False),
    Column("pid", Integer),
    Column("exit_code", Integer),
    Column("error", Text),
    Column("stop_reason", String(32)),
    Column("current_step", Integer, nullable=False),
    Column("max_steps", Integer),
    Column("tokens", Integer),
    Column("last_loss", Float),
    Column("last_val_loss", Float),
    Column("best_val_loss", Float),
    Column("lr", Float),
    Column("tokens_per_s", Float),
    Column("resumed_from_step", Integer),
    Column("launches", Integer, nullable=False),
    Column("metrics_epoch", Integer, nullable=False),  # bumped when metrics are re-read (after a resume)
    Column("created_at", Float, nullable=False),
    Column("queued_at", Float),
    Column("started_at", Float),
    Column("finished_at", Float),
    Column("updated_at", Float, nullable=False),
    Column("kind", String(16), nullable=False, server_default="train"),  # train | selfplay | experiment
    Column("last_reward", Float),                      # self-play: the latest iteration's mean reward
    Column("last_kl", Float),                          # ... and its KL to the starting model
    Column("pid_start", String(80)),                   # with pid, which process: jobs.process_start
    Column("owner", String(300)),                      # the server that launched it: Supervisor.owner
    Column("parent_run_id", Integer),                  # continued from: the run whose weights it started from
    Column("step_offset", Integer),                    # the model's steps before this run (its parent's total)
)

metrics = Table(
    "metrics", metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
    Column("step", Integer, nullable=False),
    Column("loss", Float),
    Column("val_loss", Float),
    Column("lr", Float),
    Column("tokens_per_s", Float),
    Column("elapsed_s", Float),
    Column("data", Text, nullable=False),              # the whole metrics.jsonl line
    Index("ix_metrics_run_step", "run_id", "step"),
)

# The last run id ever given (one row): a deleted run's id is never given again, so a link, a model's lineage or
# an open tab that names it cannot reach another run (SQLite reuses the largest rowid once its row is deleted).
run_ids = Table("run_ids", metadata, Column("last", Integer, nullable=False))

ACTIVE = ("queued", "running")
STOPPED = ("interrupted", "failed", "cancelled")  # resumed, or started again, by the user


# ---- migrations -------------------------------------------------------------------------------------

def _v1_initial(conn: Connection) -> None:
    # Frozen copy of the first schema: later migrations alter it; this function never changes.
    md = MetaData()
    Table("books", md, Column("name", String(200), primary_key=True),
          Column("size_bytes", Integer, nullable=False), Column("chars", Integer, nullable=False),
          Column("encoding", String(32), nullable=False), Column("created_at", Float, nullable=False))
    Table("models", md, Column("name", String(100), primary_key=True), Column("config", Text, nullable=False),
          Column("preset", String(64)), Column("tokenizer_kind", String(16), nullable=False),
          Column("tokenizer_vocab", Integer, nullable=False), Column("trained_run_id", Integer),
          Column("trained_steps", Integer), Column("created_at", Float, nullable=False),
          Column("updated_at", Float, nullable=False))
    Table("runs", md, Column("id", Integer, primary_key=True, autoincrement=True),
          Column("model_name", String(100), nullable=False, index=True), Column("books", Text, nullable=False),
          Column("params", Text, nullable=False), Column("init_from_trained", Boolean, nullable=False),
          Column("status", String(16), nullable=False, index=True), Column("resume", Boolean, nullable=False),
          Column("cancel_requested", Boolean, nullable=False), Column("pid", Integer), Column("exit_code", Integer),
          Column("error", Text), Column("stop_reason", String(32)), Column("current_step", Integer, nullable=False),
          Column("max_steps", Integer), Column("tokens", Integer), Column("last_loss", Float),
          Column("last_val_loss", Float), Column("best_val_loss", Float), Column("lr", Float),
          Column("tokens_per_s", Float), Column("resumed_from_step", Integer),
          Column("launches", Integer, nullable=False), Column("metrics_epoch", Integer, nullable=False),
          Column("created_at", Float, nullable=False), Column("queued_at", Float), Column("started_at", Float),
          Column("finished_at", Float), Column("updated_at", Float, nullable=False))
    Table("metrics", md, Column("id", Integer, primary_key=True, autoincrement=True),
          Column("run_id", Integer, ForeignKey("runs.id", ondelete="CASCADE"), nullable=False),
          Column("step", Integer, nullable=False), Column("loss", Float), Column("val_loss", Float),
          Column("lr", Float), Column("tokens_per_s", Float), Column("elapsed_s", Float),
          Column("data", Text, nullable=False), Index("ix_metrics_run_step", "run_id", "step"))
    md.create_all(conn)


def _v2_selfplay_runs(conn: Connection) -> None:
    # ADD COLUMN with a constant default: the same statement on SQLite and PostgreSQL; old runs are training.
    # Only the columns still missing: pysqlite runs DDL outside the transaction (each ALTER commits at
    # once), so a start-up that failed half-way left some columns added at version 1, and re-adding them
    # would fail with "duplicate column name" on every later start.
    insp = inspect(conn)
    have = {t: {c["name"] for c in insp.get_columns(t)} for t in ("runs", "models")}
    for table, column, ddl in (("runs", "kind", "VARCHAR(16) NOT NULL DEFAULT 'train'"),
                               ("runs", "last_reward", "FLOAT"), ("runs", "last_kl", "FLOAT"),
                               ("models", "origin", "TEXT")):
        if column not in have[table]:
            conn.execute(text(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}"))


def _v3_run_owner(conn: Connection) -> None:
    # A run's process known by pid and start time, and the server that launched it (two servers may share a
    # database); only the columns still missing, as in _v2_selfplay_runs.
    have = {c["name"] for c in inspect(conn).get_columns("runs")}
    for column, ddl in (("pid_start", "VARCHAR(80)"), ("owner", "VARCHAR(300)")):
        if column not in have:
            conn.execute(text(f"ALTER TABLE runs ADD COLUMN {column} {ddl}"))


def _v4_run_lineage(conn: Connection) -> None:
    # A continued run's parent and the steps before it, so that its curve and the model's step count go on
    # from its parent's; only the columns still missing, as in _v2_selfplay_runs. Older runs have no parent
    # recorded (NULL): they are shown from step 0, as before.
    have = {c["name"] for c in inspect(conn).get_columns("runs")}
    for column in ("parent_run_id", "step_offset"):
        if column not in have:
            conn.execute(text(f"ALTER TABLE runs ADD COLUMN {column} INTEGER"))


def _v5_run_ids(conn: Connection) -> None:
    # Started at the largest id in use (one a deleted run had above it may come again, once: not knowable now).
    if not inspect(conn).has_table("run_ids"):
        Table("run_ids", MetaData(), Column("last", Integer, nullable=False)).create(conn)
    if conn.execute(select(func.count()).select_from(run_ids)).scalar() == 0:
        last = conn.execute(select(func.max(runs.c.id))).scalar() or 0
        conn.execute(insert(run_ids).values(last=last))


Migration = tuple[int, str, Callable[[Connection], None]]
MIGRATIONS: list[Migration] = [
    (1, "books, models, runs, metrics", _v1_initial),
    (2, "run kind (train, selfplay), reward and KL summary, model origin", _v2_selfplay_runs),
    (3, "run process start time and owning server", _v3_run_owner),
    (4, "a continued run's parent run and step offset", _v4_run_lineage),
    (5, "run ids never given twice", _v5_run_ids),
]

_schema_version = Table("schema_version", MetaData(), Column("version", Integer, nullable=False),
                        Column("description", Text, nullable=False), Column("applied_at", Float, nullable=False))


def migrate(engine: Engine, migrations: Sequence[Migration] = MIGRATIONS) -> int:
    """Apply every migration newer than the database's version, each in its own transaction; return the
    resulting version. A database written by newer code is refused (we cannot know its schema)."""
    with engine.begin() as conn:
        _schema_version.create(conn, checkfirst=True)
    latest = max(v for v, _, _ in migrations)
    with engine.connect() as conn:
        current = conn.execute(select(func.max(_schema_version.c.version))).scalar() or 0
    if current > latest:
        raise RuntimeError(f"the database is at schema version {current}, newer than this lmlab knows ({latest}); "
                           "upgrade lmlab or point --database-url elsewhere")
    for version, description, apply in sorted(migrations):
        if version <= current:
            continue
        with engine.begin() as conn:
            apply(conn)
            conn.execute(insert(_schema_version).values(version=version, description=description,
                                                        applied_at=time.time()))
        current = version
    return current


def schema_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return conn.execute(select(func.max(_schema_version.c.version))).scalar() or 0


def schema_drift(engine: Engine) -> list[str]:
    """Differences between the live database and `metadata` (tables/columns); empty when they agree."""
    insp = inspect(engine)
    problems = []
    for table in metadata.sorted_tables:
        if not insp.has_table(table.name):
            problems.append(f"missing table {table.name}")
            continue
        live = {c["name"] for c in insp.get_columns(table.name)}
        want = {c.name for c in table.columns}
        problems += [f"{table.name}.{c} missing" for c in sorted(want - live)]
        problems += [f"{table.name}.{c} unexpected" for c in sorted(live - want)]
    return problems


# ---- the database object ----------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """JSON for browsers has no NaN/Infinity: store them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


class Database:
    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {}
        if url.startswith("sqlite"):
            # request threads and the supervisor thread share the file; WAL lets readers run beside a writer
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            @event.listens_for(self.engine, "connect")
            def _pragmas(dbapi_conn, _record):  # noqa: ANN001
                cur = dbapi_conn.cursor()
                if ":memory:" not in url:
                    cur.execute("PRAGMA journal_mode=WAL")
                cur.execute("PRAGMA foreign_keys=ON")
                cur.execute("PRAGMA synchronous=NORMAL")
                cur.close()
        self.version = migrate(self.engine)

    def close(self) -> None:
        self.engine.dispose()

    # ---- books -------------------------------------------------------------------------------------

    def add_book(self, name: str, size_bytes: int, chars: int, encoding: str) -> dict[str, Any]:
        row = dict(name=name, size_bytes=size_bytes, chars=chars, encoding=encoding, created_at=time.time())
        with self.engine.begin() as conn:
            conn.execute(delete(books).where(books.c.name == name))
            conn.execute(insert(books).values(**row))
        return row

    def list_books(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(select(books).order_by(books.c.created_at, books.c.name))]

    def get_book(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(books).where(books.c.name == name)).first()
            return dict(r._mapping) if r else None

    def delete_book(self, name: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(books).where(books.c.name == name))

    # ---- models ------------------------------------------------------------------------------------

    def add_model(self, name: str, config: dict[str, Any], preset: str | None, tokenizer_kind: str,
                  tokenizer_vocab: int, *, origin: dict[str, Any] | None = None, trained_run_id: int | None = None,
                  trained_steps: int | None = None) -> dict[str, Any]:
        now = time.time()
        with self.engine.begin() as conn:
            conn.execute(insert(models).values(name=name, config=json.dumps(config), preset=preset,
                                               tokenizer_kind=tokenizer_kind, tokenizer_vocab=tokenizer_vocab,
                                               origin=json.dumps(origin) if origin else None,
                                               trained_run_id=trained_run_id, trained_steps=trained_steps,
                                               created_at=now, updated_at=now))
        return self.get_model(name)  # type: ignore[return-value]

    @staticmethod
    def _model(r: Any) -> dict[str, Any]:
        d = dict(r._mapping)
        d["config"] = json.loads(d["config"])
        d["origin"] = json.loads(d["origin"]) if d["origin"] else None
        return d

    def list_models(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [self._model(r) for r in conn.execute(select(models).order_by(models.c.created_at))]

    def get_model(self, name: str) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(models).where(models.c.name == name)).first()
            return self._model(r) if r else None

    def update_model(self, name: str, **values: Any) -> None:
        with self.engine.begin() as conn:
            conn.execute(update(models).where(models.c.name == name).values(updated_at=time.time(), **values))

    def delete_model(self, name: str, keep_runs: Sequence[int] = ()) -> None:
        """The model's row and its runs' (but `keep_runs`) with their metrics."""
        with self.engine.begin() as conn:
            ids = [r.id for r in conn.execute(select(runs.c.id).where(runs.c.model_name == name))
                   if r.id not in keep_runs]
            if ids:
                conn.execute(delete(metrics).where(metrics.c.run_id.in_(ids)))
                conn.execute(delete(runs).where(runs.c.id.in_(ids)))
            conn.execute(delete(models).where(models.c.name == name))

    # ---- runs --------------------------------------------------------------------------------------

    def add_run(self, model_name: str, book_names: list[str], params: dict[str, Any], init_from_trained: bool,
                max_steps: int | None, kind: str = "train", parent_run_id: int | None = None,
                step_offset: int | None = None) -> dict[str, Any]:
        now = time.time()
        with self.engine.begin() as conn:  # the counter's row lock orders two servers sharing the database
            conn.execute(update(run_ids).values(last=run_ids.c.last + 1))
            run_id = conn.execute(select(run_ids.c.last)).scalar_one()
            conn.execute(insert(runs).values(
                id=run_id, kind=kind, model_name=model_name, books=json.dumps(book_names), params=json.dumps(params),
                parent_run_id=parent_run_id, step_offset=step_offset,
                init_from_trained=init_from_trained, status="queued", resume=False, cancel_requested=False,
                current_step=0, max_steps=max_steps, launches=0, metrics_epoch=0, created_at=now, queued_at=now,
                updated_at=now))
        return self.get_run(run_id)  # type: ignore[return-value]

    @staticmethod
    def _run(r: Any) -> dict[str, Any]:
        d = dict(r._mapping)
        d["books"] = json.loads(d["books"])
        d["params"] = json.loads(d["params"])
        return d

    def get_run(self, run_id: int) -> dict[str, Any] | None:
        with self.engine.connect() as conn:
            r = conn.execute(select(runs).where(runs.c.id == run_id)).first()
            return self._run(r) if r else None

    def list_runs(self, model_name: str | None = None, status: Sequence[str] | None = None,
                  newest_first: bool = True, kind: str | None = None) -> list[dict[str, Any]]:
        q = select(runs)
        if model_name is not None:
            q = q.where(runs.c.model_name == model_name)
        if kind is not None:
            q = q.where(runs.c.kind == kind)
        if status is not None:
            q = q.where(runs.c.status.in_(list(status)))
        q = q.order_by(runs.c.id.desc() if newest_first else runs.c.id)
        with self.engine.connect() as conn:
            return [self._run(r) for r in conn.execute(q)]

    def queued_runs(self) -> list[dict[str, Any]]:
        """FIFO: the order in which runs were (re)queued."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(runs).where(runs.c.status == "queued").order_by(runs.c.queued_at, runs.c.id))
            return [self._run(r) for r in rows]

    def update_run(self, run_id: int, where: dict[str, Any] | None = None, **values: Any) -> bool:
        """Set `values` on the run, only if its columns still hold `where` (None: NULL); whether it did. One
        conditional UPDATE: of two servers claiming a run (where status is queued), exactly one wins, on
        PostgreSQL (the second waits for the first's row lock, then finds the row changed) as on SQLite."""
        q = update(runs).where(runs.c.id == run_id, *[runs.c[k].is_(None) if v is None else runs.c[k] == v
                                                       for k, v in (where or {}).items()])
        with self.engine.begin() as conn:
            return conn.execute(q.values(updated_at=time.time(), **values)).rowcount == 1

    def delete_run(self, run_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(metrics).where(metrics.c.run_id == run_id))
            conn.execute(delete(runs).where(runs.c.id == run_id))

    # ---- metrics -----------------------------------------------------------------------------------

    def add_metrics(self, run_id: int, lines: list[dict[str, Any]], *, replace: bool = False) -> None:
        """Append parsed metrics.jsonl lines; `replace` first drops the run's stored lines (the file was
        rewritten on resume, dropping steps after the checkpoint) and bumps the run's metrics_epoch."""
        rows = []
        now = time.time()
        for m in lines:
            m = {**_finite(m), "time": m.get("time", now)}  # wall clock when the line arrived
            rows.append(dict(run_id=run_id, step=int(m.get("step", 0)), loss=_num(m.get("loss")),
                             val_loss=_num(m.get("val_loss")), lr=_num(m.get("lr")),
                             tokens_per_s=_num(m.get("tokens_per_s")), elapsed_s=_num(m.get("elapsed_s")),
                             data=json.dumps(m)))
        summary: dict[str, Any] = {}
        for m in lines:
            summary["current_step"] = int(m.get("step", 0))
            for key, col in (("tokens", "tokens"), ("loss", "last_loss"), ("lr", "lr"),
                             ("tokens_per_s", "tokens_per_s"), ("val_loss", "last_val_loss"),
                             ("reward", "last_reward"), ("kl", "last_kl")):
                if _num(m.get(key)) is not None:
                    summary[col] = int(m[key]) if key == "tokens" else float(m[key])
        with self.engine.begin() as conn:
            if replace and conn.execute(delete(metrics).where(metrics.c.run_id == run_id)).rowcount:
                conn.execute(update(runs).where(runs.c.id == run_id).values(
                    metrics_epoch=runs.c.metrics_epoch + 1, current_step=0, last_val_loss=None))
            if rows:
                conn.execute(insert(metrics), rows)
            if summary:
                best = conn.execute(select(func.min(metrics.c.val_loss)).where(metrics.c.run_id == run_id)).scalar()
                conn.execute(update(runs).where(runs.c.id == run_id).values(
                    updated_at=time.time(), best_val_loss=best, **summary))

    def get_metrics(self, run_id: int, after_id: int = 0, limit: int | None = None) -> list[dict[str, Any]]:
        q = select(metrics.c.id, metrics.c.data).where(metrics.c.run_id == run_id, metrics.c.id > after_id)
        q = q.order_by(metrics.c.id)
        if limit:
            q = q.limit(limit)
        with self.engine.connect() as conn:
            return [{"id": r.id, **json.loads(r.data)} for r in conn.execute(q)]

    def training_clock(self, run_ids: Sequence[int]) -> dict[int, float]:
        """Seconds of training so far per run: the largest elapsed_s its metrics logged (the trainer's clock,
        which a resume carries on); runs without one are left out."""
        q = (select(metrics.c.run_id, func.max(metrics.c.elapsed_s)).where(metrics.c.run_id.in_(list(run_ids)))
             .group_by(metrics.c.run_id))
        with self.engine.connect() as conn:
            return {r[0]: r[1] for r in conn.execute(q) if r[1] is not None}
