"""`lmlab serve`: the web app (FastAPI + SQLAlchemy + a job supervisor + a static UI).

Needs the `server` extra: `pip install -e ".[server]"`. Nothing in the library imports this package.
"""

from .app import Settings, build_asgi, create_app, serve

__all__ = ["Settings", "build_asgi", "create_app", "serve"]
