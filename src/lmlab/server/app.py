"""`lmlab serve`: the FastAPI application — web UI at `/`, REST API under `/api/v1` (OpenAPI at `/docs`),
the AZR Model Trainer app's endpoints for its old clients — and the guards in front of all of it.

    lmlab serve                                   # http://127.0.0.1:8000, workspace in your data dir
    lmlab serve --workspace ./lab --max-jobs 2
    lmlab serve --host 0.0.0.0 --api-token "$(openssl rand -hex 16)"   # any other address needs a token

Guards (outermost first): security headers; while no token is set, a Host check against DNS rebinding and
the refusal of requests a reverse proxy forwarded; for every method but GET, HEAD and OPTIONS, the refusal
of requests another site's page could have sent (cross-site request forgery); the API token on every request
(Bearer header, `?token=`, or the cookie set when the UI is opened with `?token=`); a request-body size limit
that stops an oversized upload before it is written anywhere.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import os
import re
import socket
import sys
import unicodedata
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote_plus

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .db import Database
from .inference import ModelCache
from .jobs import Supervisor
from .workspace import BadName, LinkError, Workspace, default_workspace

log = logging.getLogger("lmlab.server")

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")
COOKIE = "lmlab_token"
JSON_BODY_LIMIT = 1 << 20
UPLOAD_PATHS = ("/upload_book", "/api/v1/books", "/api/v1/datasets")  # files: the upload limit, not JSON's
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
# Reads that tokenise or scan a whole book or dataset in the server process: another site's page may not start
# them either (an <img> or a no-cors fetch is a GET the browser sends with the token cookie); the web app's own
# fetches are same-origin, scripts send no Sec-Fetch-Site
SAME_SITE = (None, "same-origin", "none")  # Sec-Fetch-Site of the web app's own requests, a typed URL, a script
COSTLY_READS = re.compile(r"/api/v1/(books/[^/]+/data/[^/]+|datasets/[^/]+/preview)/?")
REQUEST_HEADER = "X-Lmlab-Request"  # sent by the UI and by scripts; a page of another site cannot send it
# Headers a reverse proxy adds (nginx's proxy_set_header examples, Caddy, Traefik and Apache add X-Forwarded-*
# by default; RFC 7239 Forwarded; Via from HTTP/1.1 proxies). Any X-Forwarded-* counts too.
PROXY_HEADERS = (b"forwarded", b"x-real-ip", b"via")
UI_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
          "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
DOCS_CSP = ("default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
            "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'")


def physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass
class Settings:
    workspace: str | Path | None = None          # default: the user's data directory (lmlab/)
    database_url: str | None = None              # default: SQLite file in the workspace
    api_token: str | None = None
    host: str = "127.0.0.1"
    port: int = 8000
    max_jobs: int = 1                            # training processes at once; the rest wait in a FIFO queue
    max_upload_bytes: int = 100 * 2**20
    # A book's text is read once, in a child process with these limits (extract.py); a book that needs more
    # is refused. Generous for real books: a text file at the upload limit is read in seconds and a few
    # hundred MiB, and the reader's own limits (data/documents.py) stop a bomb long before these.
    extract_timeout_s: float = 300.0
    extract_memory_bytes: int = 2 * 2**30
    memory_budget_bytes: int | None = None       # default: 70% of physical memory
    allowed_hosts: tuple[str, ...] | None = None  # Host headers accepted without a token (default: loopback)
    poll_s: float = 0.5                          # supervisor and SSE polling period
    child_env: dict[str, str] = field(default_factory=dict)
    # Intra-op threads of the server process. 1: concurrent requests run side by side instead of two OpenMP
    # threads per request spinning against each other and the training job (measured on 2 cores with a job
    # running: 64 tokens take 0.14 s at 1 thread, 1.7-4.3 s at 2).
    torch_threads: int | None = 1

    def __post_init__(self) -> None:
        if self.max_jobs < 1:
            raise ValueError(f"max_jobs ({self.max_jobs}) must be >= 1")
        if not 0 <= self.port <= 65535:  # 0: a free port the system picks
            raise ValueError(f"port ({self.port}) must be in [0, 65535]")
        if self.max_upload_bytes < 1:
            raise ValueError("the upload limit must be positive")
        if self.memory_budget_bytes is not None and self.memory_budget_bytes < 1:
            raise ValueError("the memory budget must be positive")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads ({self.torch_threads}) must be >= 1")
        # more threads than CPUs only spin against each other (the note above); 2**32 failed inside
        # torch.set_num_threads as the app started (exit 3, a traceback)
        if self.torch_threads is not None and self.torch_threads > (cpus := os.cpu_count() or 1):
            raise ValueError(f"torch_threads ({self.torch_threads}) must be at most the {cpus} CPUs here")
        if self.extract_timeout_s <= 0 or self.extract_memory_bytes < 2**26:
            raise ValueError("a book needs a positive time limit and at least 64 MiB of memory to be read")
        if self.api_token is not None and len(self.api_token) < 8:
            raise ValueError("the API token must be at least 8 characters")
        if not is_loopback(self.host) and not self.api_token:
            raise ValueError(f"binding {self.host} exposes training and uploads to the network: "
                             "pass --api-token (or set LMLAB_API_TOKEN)")


class AppState:
    """Everything a request handler needs, built once per app."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        root = Path(settings.workspace or default_workspace()).expanduser().resolve()
        top = next((p for p in reversed((root, *root.parents)) if not p.exists()), None)  # the first folder made
        self.ws = Workspace(root)
        try:  # a SQLite URL may name a file inside the workspace, so its folders are made first
            self.db = open_database(settings.database_url or self.ws.sqlite_url())
        except ValueError:
            if top is not None:  # a refused start leaves no folders made for nothing (only empty ones go)
                for d in sorted((p for p in top.rglob("*") if p.is_dir()), reverse=True) + [top]:
                    with contextlib.suppress(OSError):
                        d.rmdir()
            raise
        self.supervisor = Supervisor(self.db, self.ws, max_jobs=settings.max_jobs, poll_s=settings.poll_s,
                                     env=settings.child_env)
        # held by handlers from checking names and runs through acting on them (Supervisor.lock)
        self.lock = self.supervisor.lock
        self.cache = ModelCache(self.ws.tmp)
        self.engines: OrderedDict[Path, Any] = OrderedDict()  # routers/openai.py: a batching engine per model
        physical = physical_memory()
        self.memory_budget = settings.memory_budget_bytes or (int(physical * 0.7) if physical else 8 * 2**30)
        self._lock_file: Any = None

    @property
    def extract_limits(self) -> dict[str, Any]:
        return {"timeout_s": self.settings.extract_timeout_s, "memory_bytes": self.settings.extract_memory_bytes}

    def reindex(self) -> None:
        """The files are the truth: index books and model directories put into the workspace by hand (or
        by `lmlab train`/`lmlab import`), and forget books whose files are gone. A new book is read as an upload
        is (store_text: a child process with limits), and its text kept beside it."""
        from ..models import ModelConfig
        from ..tokenizers import Tokenizer
        from .workspace import TEXT_SUFFIX, check_book_name, check_name, no_links, remove_entry, store_text

        for leftover in self.ws.tmp.iterdir():  # uploads and exports cut short by a crash
            remove_entry(leftover)
        for folder in (self.ws.books, self.ws.models, self.ws.datasets):
            nfc_names(folder)
        known = {b["name"] for b in self.db.list_books()}
        for name in known:
            if not (self.ws.books / name).is_file():
                self.db.delete_book(name)
        for path in sorted(self.ws.books.iterdir()):
            if path.name.startswith(".") and path.name.endswith(TEXT_SUFFIX):  # a stored text, not a book
                if not (self.ws.books / path.name[1:-len(TEXT_SUFFIX)]).is_file():
                    path.unlink(missing_ok=True)
                continue
            if path.name in known or not (path.is_file() or path.is_symlink()):
                continue
            try:
                check_book_name(path.name)
                header = store_text(self.ws, no_links(path, self.ws.root), path.name, **self.extract_limits)
            except ValueError as exc:  # a bad name, a symbolic link (LinkError), not text
                log.warning("not indexing %s: %s", path, exc)
                continue
            self.db.add_book(path.name, header["size"], header["chars"], header["encoding"])
        models = {m["name"] for m in self.db.list_models()}
        for path in sorted(self.ws.models.iterdir()):
            if path.name in models or not (path / "config.json").is_file():
                continue
            try:
                check_name(path.name, "model name")
                no_links(path, self.ws.root)
                cfg = ModelConfig.load(path / "config.json")
                kind = Tokenizer.load(path / "tokenizer.json").kind if (path / "tokenizer.json").is_file() else "bpe"
            except (ValueError, OSError) as exc:  # BadName and LinkError are ValueErrors
                log.warning("not indexing %s: %s", path, exc)
                continue
            self.db.add_model(path.name, cfg.to_dict(), None, kind, cfg.vocab_size)

    def lock_workspace(self) -> None:
        """One server per workspace: two supervisors would both launch the same queued runs. `serve` takes the
        lock before uvicorn starts, so a refusal is one line; the lifespan takes it again (no-op) for the tests'
        clients."""
        if self._lock_file is not None:
            return
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks here; run one server per workspace yourself
            return
        # opened without truncating and without following a link: a planted `.server.lock -> ~/file` is refused
        fd = self.ws.open(self.ws.root / ".server.lock", os.O_WRONLY | os.O_CREAT)
        self._lock_file = os.fdopen(fd, "w")
        try:
            fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_file.close()
            self._lock_file = None
            raise ValueError(f"another lmlab serve is using the workspace {self.ws.root}") from None

    def unlock_workspace(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing releases the lock (so does the process dying)
            self._lock_file = None


def open_database(url: str) -> Database:
    """The database, or a ValueError in one line: a URL of no known dialect (NoSuchModuleError), a server that
    cannot be reached, a database of a newer lmlab (migrate's RuntimeError) are the user's to fix."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError
    try:
        shown = make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        shown = url.split(":", 1)[0] + ":..."  # not a URL at all: it may still hold a password
    try:
        return Database(url)
    except (SQLAlchemyError, RuntimeError, ImportError) as exc:  # ImportError: the dialect's driver is missing
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        raise ValueError(f"cannot open the database {shown}: {reason[0] if reason else type(exc).__name__}") from None


def listen_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound before anything starts: uvicorn binds only after the lifespan has started the
    supervisor, which then launched a queued run and stopped it again when the port was taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a port in TIME_WAIT is free
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def nfc_names(folder: Path) -> None:
    """Entries of `folder` named in another Unicode form than NFC (decomposed, as macOS writes "é") renamed to
    NFC, the form every name of the API is looked up in: indexed under the other form, a book or model was
    listed but could be neither opened nor deleted. One whose NFC name is taken is left as it is, and logged."""
    for path in sorted(folder.iterdir()):
        nfc = unicodedata.normalize("NFC", path.name)
        if nfc == path.name:
            continue
        if os.path.lexists(folder / nfc):
            log.warning("not renaming %s to NFC: %s exists", path, nfc)
            continue
        os.rename(path, folder / nfc)
        log.info("renamed %s to its NFC form %s", path, nfc)


def get_state(request: Request) -> AppState:
    return request.app.state.lmlab


StateDep = Annotated[AppState, Depends(get_state)]  # a handler parameter of this type receives the AppState


# ---- ASGI guards ------------------------------------------------------------------------------------

async def _send_json(send: Any, status: int, detail: str, headers: list[tuple[bytes, bytes]] = (), *,
                     openai: bool = False, error: dict[str, Any] | None = None) -> None:
    """A refusal: {"detail": ...} and the `error` of a Problem where given, or under /v1/ (routers/openai.py)
    the OpenAI API's error shape."""
    body = json.dumps(openai_error(status, detail) if openai else
                      {"detail": detail, **({"error": error} if error else {})}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": body})


def openai_error(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """An error as the OpenAI API answers it (https://platform.openai.com/docs/guides/error-codes)."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 401:
        kind, code = "authentication_error", code or "invalid_api_key"
    elif status == 403:
        kind = "permission_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def _header(scope: dict[str, Any], name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def query_token_spans(query: str) -> list[tuple[int, int]]:
    """Where the values of `token` parameters sit in a raw query string: every `&`-separated pair whose name
    percent-decodes to `token`, as parse_qs would read it (`%74oken=` and `tok%65n=` name it too). The guard
    accepts the first; RedactToken blanks them all, so what is accepted and what is hidden are one set."""
    spans, start = [], 0
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        if eq and unquote_plus(name) == "token":
            spans.append((start + len(name) + 1, start + len(pair)))
        start += len(pair) + 1
    return spans


def cookie_value(header: str, name: str) -> str | None:
    """The first cookie `name` of a Cookie header, split on ';' by hand (RFC 6265 section 5.4): Python's
    http.cookies stops at the first value it cannot parse (JSON, spaces), losing every cookie after it."""
    for pair in header.split(";"):
        key, eq, value = pair.partition("=")
        if eq and key.strip() == name:
            value = value.strip()
            return value[1:-1] if len(value) > 1 and value[0] == value[-1] == '"' else value
    return None


# Headers a form or a no-cors fetch cannot send (not CORS-safelisted, and this server answers no preflight): a
# request carrying one was not made by another site's page (`curl -X POST -H "Authorization: Bearer T" URL`).
PROOF_HEADERS = (REQUEST_HEADER.lower().encode(), b"authorization")


def cross_site(scope: dict[str, Any]) -> str | None:
    """Why a state-changing request may come from another site's page, or None. A browser sends `Origin`
    (and `Sec-Fetch-Site`) with such requests; a page of another origin, even 127.0.0.1 on another port
    ("same-site"), must not act here. A plain HTML form or a no-cors fetch can send neither a JSON
    Content-Type nor a custom header, which also guards browsers that send no Origin (OWASP's CSRF
    prevention cheat sheet: "custom request headers" and "Fetch Metadata")."""
    origin, site = _header(scope, b"origin"), _header(scope, b"sec-fetch-site")
    if origin is not None:
        own = {h.split(",")[0].strip().lower() for h in (_header(scope, b"host"), _header(scope, b"x-forwarded-host"))
               if h}
        if origin.partition("://")[2].lower() not in own:
            return (f"refused: a page of another site ({origin}) may not change anything here; use the web UI "
                    "of this server, or a script that sends no Origin header")
    if site not in SAME_SITE:
        return (f"refused: a page of another site (Sec-Fetch-Site: {site}) may not change anything here; use the "
                "web UI of this server")
    kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
    if kind != "application/json" and not any(_header(scope, h) is not None for h in PROOF_HEADERS):
        return (f"send the header '{REQUEST_HEADER}: 1' (or a JSON body) with {scope['method']} requests: it shows "
                "the request does not come from another site's page")
    return None


def validation_error(e: dict[str, Any]) -> dict[str, Any]:
    """One of pydantic's errors as the API answers it: loc, msg, type, and what the web app needs to say it in
    words in its language (ux.js): the limits (ctx, as plain values) and a short scalar input, echoed only
    up to 100 characters (a body may be large)."""
    out = {k: e[k] for k in ("loc", "msg", "type")}
    if e.get("ctx"):
        out["ctx"] = {k: v if isinstance(v, (int, float, str)) else str(v) for k, v in e["ctx"].items()}
    value = e.get("input")
    if isinstance(value, (int, float, str)) and len(str(value)) <= 100 and _utf8(str(value)):
        out["input"] = value  # a lone surrogate is not echoed: it cannot be written as UTF-8 JSON
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# The errors the web app says in its own language, and the params each sends (i18n.js has problem.KEY for each):
# raised as a Problem, or as a BadName or extract.Refused carrying the key
PROBLEMS = {"model_not_found": ("name",), "model_name_taken": ("name",), "model_untrained": ("name",),
            "model_training": ("name", "run"), "model_evaluated": ("name", "run"), "model_in_use": ("name", "run"),
            "model_trained": ("name",), "book_not_found": ("name",), "book_in_use": ("name", "runs"),
            "book_exists": ("name",), "run_not_found": ("id",), "run_not_active": ("id",), "run_active": ("id",),
            "run_training_elsewhere": ("id",),
            "name_case_twin": ("name", "twin"), "upload_too_large": ("name", "limit"), "file_empty": ("name",),
            "memory_over_budget": ("batch", "tokens", "need", "budget"), "chat_too_long": ("room",),
            "chat_no_room": ("max_tokens", "block"), "model_folder_exists": ("name",),
            "dataset_exists": ("name",), "resume_name_taken": ("name",),
            # a name that may not become a file name (workspace.BadName)
            "name_too_long": ("limit",), "name_too_many_bytes": ("bytes", "limit"),
            "name_separator": ("name",), "name_edges": ("name",), "name_characters": ("name", "chars"),
            "name_reserved": ("name",), "book_suffix": ("name", "suffixes"), "dataset_suffix": ("name", "suffix"),
            # an upload: its size, a book that cannot be read (extract.Refused), a dataset that is not of its kind
            "body_too_large": ("limit",), "book_no_text": ("name",), "book_read_timeout": ("name", "limit"),
            "book_read_memory": ("name", "limit"), "book_unreadable": ("name", "reason"),
            "dataset_not_found": ("name",), "dataset_invalid": ("name", "reason"),
            # the reason is the sentence of a check below the server (a config, a reader, a loader; the command
            # line says it too), which the web app says inside a sentence of its language
            "settings_invalid": ("reason",), "model_config_invalid": ("reason",), "merge_refused": ("reason",),
            "task_invalid": ("name", "reason"), "prompt_invalid": ("reason",), "model_unloadable": ("name", "reason"),
            # the forms' own rules, the views' inputs, a run resumed or deleted
            "seq_len_over_context": ("seq_len", "block"), "selfplay_over_budget": ("batch", "tokens", "need", "budget"),
            "lora_needs_rank": ("settings",), "lora_dropout_grpo": (), "quantized_cannot_train": ("name",),
            "gptq_needs_calibration": (), "stop_string_length": (), "advisor_needs_model": (),
            "prompt_too_long": ("tokens", "limit"), "sae_feature_range": ("feature", "last"),
            "book_too_short": ("name", "tokens", "window"),
            "resume_weights_changed": ("id", "name"), "run_checkpoints_evaluated": ("id", "run"),
            "checkpoint_gone": ("id", "step"), "device_unavailable": ("device",)}


class Problem(HTTPException):
    """An error the web app says in its own language: `detail` stays the English sentence every client reads,
    and the answer adds {"error": {"key", "params"}}, which the UI looks up as problem.KEY in its strings (i18n.js)
    and falls back to the sentence where it has none. `key` is one of PROBLEMS, with its params."""

    def __init__(self, status: int, key: str, text: str, **params: Any) -> None:
        if set(params) != set(PROBLEMS[key]):
            raise ValueError(f"error {key} takes {PROBLEMS[key]}, not {sorted(params)}")
        super().__init__(status, text)
        self.key, self.params = key, params


class BodyTooLarge(Problem):
    """A body cut off as it arrives: the handler answers it as any Problem (the middleware, before the app, itself)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"the request body is larger than the limit of {limit / 2**20:.1f} MiB",
                         limit=f"{limit / 2**20:.1f}")
        self.limit = limit


def too_large(path: str, limit: int) -> dict[str, Any] | None:
    """The Problem of a body over `limit` (an upload, most often), under /api/ where the web app reads it."""
    return {"key": "body_too_large", "params": {"limit": f"{limit / 2**20:.1f}"}} if path.startswith("/api/") else None


class Guards:
    """Security headers, Host and proxy checks, cross-site refusal, token check and body-size limit as one
    ASGI layer."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.token = settings.api_token
        self.max_upload = settings.max_upload_bytes  # the limit a refusal quotes: the one the user set
        self.upload_limit = settings.max_upload_bytes + (1 << 20)  # multipart framing on top of the file
        hosts = settings.allowed_hosts
        if hosts is None and not self.token:
            hosts = LOOPBACK_NAMES
        self.hosts = None if hosts is None else {h.lower() for h in hosts}

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        api = path == "/v1" or path.startswith("/v1/")  # the OpenAI-compatible API: OpenAI's error shape
        csp = DOCS_CSP if path.startswith(("/docs", "/redoc")) else UI_CSP
        extra = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"),
                 (b"x-frame-options", b"DENY"), (b"content-security-policy", csp.encode())]

        # 1. Without a token, a reverse proxy on this machine would hand every request from the network to the
        #    server with a loopback Host; a proxy announces itself with these headers (uvicorn leaves them in).
        if not self.token:
            proxied = next((k for k, _ in scope.get("headers", [])
                            if k in PROXY_HEADERS or k.startswith(b"x-forwarded-")), None)
            if proxied is not None:
                await _send_json(send, 403, f"this request came through a proxy ({proxied.decode()} header), and "
                                 "a server without a token must not be exposed that way: start it with --api-token",
                                 extra, openai=api)
                return

        # 2. Host header (DNS rebinding: a web page's script reaching a loopback server by a foreign name)
        if self.hosts is not None:
            host = (_header(scope, b"host") or "").lower()
            name = host[1:host.index("]")] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name not in self.hosts:
                await _send_json(send, 400, f"Host {host!r} is not allowed; open the server by 127.0.0.1 or "
                                 "localhost, or start it with --api-token", extra, openai=api)
                return

        # 3. cross-site request forgery: a page of another site may not change anything, token or not (the token
        #    cookie is sent with requests from 127.0.0.1 on any port: cookies are not kept apart by port)
        if scope.get("method") not in SAFE_METHODS:
            refusal = cross_site(scope)
            if refusal:
                await _send_json(send, 403, refusal, extra, openai=api)
                return
        elif COSTLY_READS.fullmatch(path) and (site := _header(scope, b"sec-fetch-site")) not in SAME_SITE:
            await _send_json(send, 403, f"refused: a page of another site (Sec-Fetch-Site: {site}) may not make this "
                             "server read a whole book or dataset; use the web UI of this server", extra, openai=api)
            return

        # 4. API token
        set_cookie = False
        if self.token:
            query = scope.get("query_string", b"").decode("latin-1")
            spans = query_token_spans(query)
            given = None
            auth = _header(scope, b"authorization")
            if auth and auth.lower().startswith("bearer "):
                given = auth[7:].strip()
            elif spans:
                given = unquote_plus(query[slice(*spans[0])])
                set_cookie = path == "/"
            else:
                given = cookie_value(_header(scope, b"cookie") or "", COOKIE)
            if not given or not hmac.compare_digest(given.encode(), self.token.encode()):
                if path == "/":
                    body = (b"<!doctype html><meta charset=utf-8><title>lmlab</title><h1>401</h1><p>This server "
                            b"needs its API token: open the address that <code>lmlab serve</code> printed "
                            b"(it ends in <code>?token=...</code>).</p>")
                    await send({"type": "http.response.start", "status": 401, "headers": [
                        (b"content-type", b"text/html; charset=utf-8"), *extra]})
                    await send({"type": "http.response.body", "body": body})
                    return
                await _send_json(send, 401, "missing or wrong API token: send 'Authorization: Bearer <token>' "
                                 "or ?token=<token>", [(b"www-authenticate", b"Bearer"), *extra], openai=api)
                return

        # OpenAI's API takes JSON bodies only, and `curl -d` labels them form data: read them as JSON (a request
        # another site's page could send was refused above)
        if api and scope.get("method") == "POST":
            kind = (_header(scope, b"content-type") or "").split(";")[0].strip().lower()
            if kind in ("", "application/x-www-form-urlencoded"):
                scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
                         + [(b"content-type", b"application/json")]}

        # 5. body size: refuse by Content-Length at once, and count what actually arrives
        limit = self.upload_limit if path in UPLOAD_PATHS else JSON_BODY_LIMIT
        shown = self.max_upload if path in UPLOAD_PATHS else limit
        length = _header(scope, b"content-length")
        if length and length.isdigit() and int(length) > limit:
            await _send_json(send, 413, f"the request body ({int(length) / 2**20:.1f} MiB) is larger than the "
                             f"limit of {shown / 2**20:.1f} MiB", extra, openai=api, error=too_large(path, shown))
            return
        received = 0

        async def counted_receive() -> dict[str, Any]:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(shown)
            return message

        started = False

        async def send_with_headers(message: dict[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = list(message.get("headers", []))
                names = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in extra if k not in names]
                if set_cookie:  # Secure over TLS (behind a proxy: uvicorn sets the scheme from X-Forwarded-Proto)
                    secure = "; Secure" if scope.get("scheme") == "https" else ""
                    headers.append((b"set-cookie", f"{COOKIE}={self.token}; Path=/; HttpOnly; SameSite=Strict{secure}"
                                    .encode()))
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, counted_receive, send_with_headers)
        except BodyTooLarge as exc:
            if not started:
                await _send_json(send, 413, exc.detail, extra, openai=api, error=too_large(path, exc.limit))


# ---- the application --------------------------------------------------------------------------------

def static_dir() -> Path:
    return Path(str(resources.files("lmlab.server") / "static"))


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = AppState(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):  # noqa: ANN202
        if settings.torch_threads:
            import torch
            torch.set_num_threads(settings.torch_threads)
        state.lock_workspace()
        state.reindex()
        state.supervisor.start()
        try:
            yield
        finally:
            state.supervisor.shutdown()
            for engine in state.engines.values():
                engine.close()
            state.unlock_workspace()
            state.db.close()

    from .. import __version__
    app = FastAPI(title="lmlab", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Train small language models on your books, watch them learn, generate text. "
                              "Versioned API under /api/v1; the AZR Model Trainer app's endpoints are kept for "
                              "its old clients.")
    app.state.lmlab = state

    def _error(request: Request, status: int, message: str) -> JSONResponse:
        """FastAPI's shape, or OpenAI's under /v1 (whose clients read that one)."""
        v1 = request.url.path == "/v1" or request.url.path.startswith("/v1/")
        return JSONResponse(openai_error(status, message) if v1 else {"detail": message}, status_code=status)

    @app.exception_handler(BadName)
    async def _bad_name(request: Request, exc: BadName) -> Any:
        if exc.key:  # the rule it breaks, for the web app to say
            return await _http(request, Problem(400, exc.key, str(exc), **exc.params))
        return _error(request, 400, str(exc))

    @app.exception_handler(LinkError)
    async def _link(request: Request, exc: LinkError) -> JSONResponse:
        return _error(request, 409, str(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Any:
        """An unknown path or method under /v1 is answered in OpenAI's shape too (its routes' own errors are
        already: routers/openai.py); elsewhere FastAPI's."""
        if request.url.path == "/v1" or request.url.path.startswith("/v1/"):
            return JSONResponse(openai_error(exc.status_code, str(exc.detail)), status_code=exc.status_code,
                                headers=getattr(exc, "headers", None))
        if isinstance(exc, Problem) and request.url.path.startswith("/api/"):  # the seed's routes keep their shape
            return JSONResponse({"detail": exc.detail, "error": {"key": exc.key, "params": exc.params}},
                                status_code=exc.status_code, headers=getattr(exc, "headers", None))
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": [validation_error(e) for e in exc.errors()]}, status_code=422)

    from .routers import api, openai, seed
    app.include_router(api)
    app.include_router(seed.router)
    app.include_router(openai.router)

    static = static_dir()
    app.mount("/static", StaticFiles(directory=static), name="static")
    index_html = (static / "index.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(index_html, headers={"cache-control": "no-store"})

    _mount_docs(app)
    return app


def _mount_docs(app: FastAPI) -> None:
    """Swagger UI from files shipped in a Python package (no CDN); a plain link to the schema otherwise."""
    from fastapi.openapi.docs import get_swagger_ui_html
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        swagger_ui_path = None
    if swagger_ui_path:
        app.mount("/docs-assets", StaticFiles(directory=swagger_ui_path), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        if not swagger_ui_path:
            return HTMLResponse('<!doctype html><meta charset=utf-8><title>lmlab API</title>'
                                '<p>Install swagger-ui-bundle-v2 for the interactive page; the schema is at '
                                '<a href="/openapi.json">/openapi.json</a>.</p>')
        return get_swagger_ui_html(openapi_url="/openapi.json", title="lmlab API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")


def build_asgi(settings: Settings) -> Any:
    """The app wrapped in its guards: what uvicorn (and the tests) run."""
    return Guards(create_app(settings), settings)


def redact_token(path: str) -> str:
    """A request target with the value of every `token` query parameter the guard would read replaced."""
    base, mark, query = path.partition("?")
    for start, end in reversed(query_token_spans(query)):
        query = query[:start] + "***" + query[end:]
    return base + mark + query


class RedactToken(logging.Filter):
    """uvicorn's access log writes each request line whole: the UI's links (downloads, reports) carry the API
    token as ?token=, which a log read by others must not."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and len(record.args) == 5 and isinstance(record.args[2], str):
            args = list(record.args)
            args[2] = redact_token(args[2])
            record.args = tuple(args)
        return True


def serve(settings: Settings, *, log_level: str = "info") -> None:
    import uvicorn

    app = build_asgi(settings)  # opens the database: a bad URL is refused here
    state: AppState = app.app.state.lmlab
    # what can refuse the start is checked before uvicorn runs, and said in one line (cli: exit 2): uvicorn would
    # print its traceback, and its lifespan would already have started the supervisor
    state.lock_workspace()
    try:
        sock = listen_socket(settings.host, settings.port)
    except ValueError:
        state.unlock_workspace()
        raise
    shown = f"[{settings.host}]" if ":" in settings.host else settings.host
    url = f"http://{shown}:{sock.getsockname()[1]}/"  # port 0: the one the system picked
    if settings.api_token:
        url += "?token=" + settings.api_token
    print(f"lmlab: workspace {state.ws.root}", file=sys.stderr)
    print(f"lmlab: open {url}", file=sys.stderr, flush=True)
    logging.getLogger("uvicorn.access").addFilter(RedactToken())  # uvicorn's dictConfig keeps logger filters
    # SSE streams never end by themselves: give open connections a few seconds, then shut down (the
    # lifespan's shutdown asks training processes to checkpoint and marks them interrupted).
    config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=log_level,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        state.unlock_workspace()
    if not server.started:  # the lifespan failed (uvicorn logged why): uvicorn.run's exit status
        sys.exit(3)
