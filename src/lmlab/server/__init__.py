"""`lmlab serve`: the web app (FastAPI + SQLAlchemy + a job supervisor + a static UI).

Needs the `server` extra: `pip install -e ".[server]"`. Nothing in the library imports this package.

    app.py        settings, the app state (AppState, StateDep), the guards in front of every request, create_app
    schemas.py    the API's request and response bodies (pydantic): the OpenAPI document's schemas
    services.py   the rules: need_* checks, starting runs within the memory budget, model and run views,
                  uploads, downloads, generation; plain functions of the app state, raising HTTPException
    routers/      thin HTTP handlers by resource: info, books, models, runs, generate (/api/v1), seed
                  (the AZR Model Trainer app's endpoints, through the same services), openai (the
                  OpenAI-compatible API at /v1, on a batching engine per loaded model: models/batching.py)
    jobs.py       the supervisor: launches, watches, cancels and recovers each run's OS process
    commands.py   a run's command line (argv and the files it reads), pure: no process, no database
    db.py         the database (SQLite or PostgreSQL) and its migrations
    workspace.py  books/, models/, runs/ on disk: name checks, no symbolic links followed, snapshots, swaps
    extract.py    a book's text, read once in a child process with limits
    inference.py  the cache of loaded models that generation uses
"""

from .app import Settings, build_asgi, create_app, serve

__all__ = ["Settings", "build_asgi", "create_app", "serve"]
