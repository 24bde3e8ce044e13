"""The guards in front of the server and at its workspace's edge: requests another site's page could send,
the API token in queries, cookies and behind a proxy, and symbolic links planted in the workspace. In
process but for one real `lmlab serve` (uvicorn's access log and proxy headers); tests/test_browser_csrf.py
sends the cross-site requests from a real browser."""

from __future__ import annotations

import logging
import shutil
from http import cookies

import pytest
from starlette.testclient import TestClient
from test_server_support import BOOK, FAST, TINY_MODEL, ServerProcess, client, settings, upload, wait_run

from lmlab.server import build_asgi
from lmlab.server.app import RedactToken
from lmlab.server.workspace import LinkError, Workspace

TOKEN = "s3cret-token-for-tests"
LINK = "{} is a symbolic link; the server follows no links inside its workspace: remove it"


def bare(c) -> TestClient:
    """A second client of the same running app that sends no X-Lmlab-Request header (no lifespan of its own)."""
    return TestClient(c.app, base_url=str(c.base_url))


# ---- cross-site requests ----------------------------------------------------------------------------

NEEDS_HEADER = ("send the header 'X-Lmlab-Request: 1' (or a JSON body) with {} requests: it shows the request "
                "does not come from another site's page")


def test_requests_another_sites_page_could_send_are_refused(tmp_path):
    with client(settings(tmp_path)) as c:
        assert upload(c).status_code == 201
        book = c.get("/api/v1/books/tales.txt/preview", params={"chars": 100_000}).json()["text"]
        evil = {"file": ("tales.txt", b"EVIL BOOK\n", "text/plain")}
        b = bare(c)
        # what a plain HTML form or a no-cors fetch can send: multipart, url-encoded, text/plain, no body
        for r, method in ((b.post("/api/v1/books?overwrite=true", files=evil), "POST"),
                          (b.post("/upload_book", files=evil), "POST"),
                          (b.post("/api/v1/runs/1/cancel"), "POST"), (b.post("/api/v1/runs/1/resume"), "POST"),
                          (b.delete("/api/v1/books/tales.txt"), "DELETE"),
                          (b.post("/api/v1/models", content=b'{"name": "x", "preset": "gpt2-tiny"}',
                                  headers={"content-type": "text/plain"}), "POST"),
                          (b.post("/create_model", data={"name": "x"}), "POST")):
            assert (r.status_code, r.json()["detail"]) == (403, NEEDS_HEADER.format(method)), r.text
        # a page of another origin, even with the header or a JSON body (127.0.0.1 on another port is same-site)
        for headers in ({"Origin": "http://127.0.0.1:9999"}, {"Origin": "null"}, {"Origin": "http://evil.example"},
                        {"Sec-Fetch-Site": "same-site"}, {"Sec-Fetch-Site": "cross-site"}):
            r = c.post("/api/v1/books?overwrite=true", files=evil, headers=headers)
            assert r.status_code == 403 and r.json()["detail"].startswith("refused: a page of another site ("), r.text
            r = c.post("/api/v1/models", json={"name": "x", **TINY_MODEL}, headers=headers)
            assert r.status_code == 403 and "another site" in r.json()["detail"], r.text
        assert [m["name"] for m in c.get("/api/v1/models").json()] == []
        assert c.get("/api/v1/books/tales.txt/preview", params={"chars": 100_000}).json()["text"] == book
        # what the UI sends (its own Origin, same-origin) and what scripts send (the header, or JSON) works
        own = {"Origin": "http://127.0.0.1", "Sec-Fetch-Site": "same-origin"}
        assert c.post("/api/v1/books?overwrite=true", files=evil, headers=own).status_code == 201
        assert b.post("/api/v1/models", json={"name": "x", **TINY_MODEL}).status_code == 201
        # an Authorization header is one no form or no-cors fetch can send either: `curl -X POST -H
        # "Authorization: Bearer T" .../cancel` (a 403 before) goes through with it
        assert b.post("/api/v1/runs/1/cancel").status_code == 403
        assert b.post("/api/v1/runs/1/cancel", headers={"Authorization": "Bearer x"}).status_code == 404
        assert b.get("/api/v1/info", headers={"Origin": "http://evil.example"}).status_code == 200  # reads pass
        assert c.post("/api/v1/runs/1/cancel").status_code == 404


# ---- the token: query spellings, cookies, TLS, proxies ----------------------------------------------

SPELLINGS = ("token", "%74oken", "tok%65n", "%74%6F%6B%65%6E", "%74%6f%6b%65%6e", "t%6Fken", "Token", "TOKEN",
             "tok+en", "token%20", "%2574oken", "xtoken", "token_", "token%00")
ACCEPTED = {"token", "%74oken", "tok%65n", "%74%6F%6B%65%6E", "%74%6f%6b%65%6e", "t%6Fken"}


def access_line(target: str) -> str:
    """uvicorn's access-log line for a GET of `target`, through RedactToken."""
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 0, '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:50000", "GET", target, "1.1", 200), None)
    RedactToken().filter(record)
    return record.getMessage()


def test_every_query_spelling_of_the_token_the_server_accepts_is_redacted_in_its_log(tmp_path):
    with client(settings(tmp_path, api_token=TOKEN)) as c:
        b = bare(c)
        accepted = {k for k in SPELLINGS if b.get(f"/api/v1/info?x=1&{k}={TOKEN}").status_code == 200}
    redacted = {k for k in SPELLINGS if TOKEN not in access_line(f"/api/v1/info?x=1&{k}={TOKEN}")}
    assert accepted == ACCEPTED and redacted == ACCEPTED
    assert access_line(f"/api/v1/models/a/download?%74oken={TOKEN}&token=x&a=b") == \
        '127.0.0.1:50000 - "GET /api/v1/models/a/download?%74oken=***&token=***&a=b HTTP/1.1" 200'


# Cookie headers a browser sends to 127.0.0.1, where other local apps set their own cookies too
COOKIE_HEADERS = [
    "lmlab_token={t}",
    "_ga=GA1.1.1204938120.1715000000; _gid=GA1.1.99.1715000000; lmlab_token={t}",
    "csrftoken=Zx9aQ; sessionid=abc123; lmlab_token={t}",
    'prefs={{"theme":"dark","lang":"ru"}}; lmlab_token={t}',
    'ajs_user_traits={{"name": "Ann Lee"}}; lmlab_token={t}',
    'username-127-0-0-1-8888="2|1:0|10:1715000000|23:username-127-0-0-1-8888|44:ZGE=|f00d"; lmlab_token={t}',
    "grafana_session=abc; redirect_to=%2Fd%2Fx; lmlab_token={t}",
    "tz=Europe/Berlin; last_query=top k; lmlab_token={t}",
    'lmlab_token="{t}"; tabs=[1,2,3]',
]


def test_the_token_cookie_is_read_whatever_other_cookies_hold(tmp_path):
    lost = sum(1 for h in COOKIE_HEADERS if "lmlab_token" not in cookies.SimpleCookie(h.format(t=TOKEN)))
    assert lost == 3  # what http.cookies made of them: the reason for the server's own parser
    with client(settings(tmp_path, api_token=TOKEN)) as c:
        b = bare(c)
        codes = [b.get("/api/v1/info", headers={"Cookie": h.format(t=TOKEN)}).status_code for h in COOKIE_HEADERS]
        assert codes == [200] * len(COOKIE_HEADERS)
        assert b.get("/api/v1/info", headers={"Cookie": COOKIE_HEADERS[3].format(t="wrong-token")}).status_code == 401


def test_the_token_cookie_is_secure_over_tls(tmp_path):
    s = settings(tmp_path, api_token=TOKEN)
    app = build_asgi(s)
    with client(s, app, base_url="https://127.0.0.1") as tls:
        assert tls.get(f"/?token={TOKEN}").headers["set-cookie"] == \
            f"lmlab_token={TOKEN}; Path=/; HttpOnly; SameSite=Strict; Secure"
        plain = TestClient(app, base_url="http://127.0.0.1")
        assert plain.get(f"/?token={TOKEN}").headers["set-cookie"] == \
            f"lmlab_token={TOKEN}; Path=/; HttpOnly; SameSite=Strict"


PROXY_HEADERS = {"Forwarded": "for=203.0.113.5;proto=https", "X-Forwarded-For": "203.0.113.5",
                 "X-Forwarded-Host": "lab.example.com", "X-Forwarded-Proto": "https", "X-Real-IP": "203.0.113.5",
                 "X-Forwarded-Port": "443", "Via": "1.1 proxy"}


def test_a_proxy_forwarding_to_a_server_without_a_token_is_refused(tmp_path):
    with client(settings(tmp_path / "open")) as c:
        assert c.get("/api/v1/info").status_code == 200
        for name, value in PROXY_HEADERS.items():  # a proxy on this machine forwards Host: 127.0.0.1
            r = c.get("/api/v1/info", headers={name: value, "Host": "127.0.0.1"})
            assert (r.status_code, r.json()["detail"]) == (403, f"this request came through a proxy "
                                                                f"({name.lower()} header), and a server without a "
                                                                "token must not be exposed that way: start it with "
                                                                "--api-token"), name
    with client(settings(tmp_path / "token", api_token=TOKEN)) as c:  # with a token, the token is the guard
        for name, value in PROXY_HEADERS.items():
            assert c.get("/api/v1/info", headers={name: value, "Authorization": f"Bearer {TOKEN}"}).status_code == 200
            assert c.get("/api/v1/info", headers={name: value}).status_code == 401
        # the UI behind a proxy that rewrites Host: its Origin is the host the proxy names in X-Forwarded-Host
        ui = {"Authorization": f"Bearer {TOKEN}", "Origin": "https://lab.example.com", "Host": "127.0.0.1:8000"}
        assert c.post("/api/v1/runs/1/cancel", headers={**ui, "X-Forwarded-Host": "lab.example.com"}).status_code == 404
        assert c.post("/api/v1/runs/1/cancel", headers=ui).status_code == 403


def test_a_real_server_behind_a_local_proxy_sets_a_secure_cookie_and_logs_no_token(tmp_path):
    server = ServerProcess(tmp_path / "ws", token=TOKEN).start()
    try:
        with server.client() as c:  # uvicorn takes the scheme from X-Forwarded-Proto sent from 127.0.0.1
            c.headers.pop("Authorization")
            proxied = c.get(f"/?token={TOKEN}", headers={"X-Forwarded-Proto": "https"})
            assert proxied.status_code == 200 and proxied.headers["set-cookie"].endswith("SameSite=Strict; Secure")
            direct = c.get(f"/?token={TOKEN}")
            assert direct.status_code == 200 and direct.headers["set-cookie"].endswith("SameSite=Strict")
            assert c.get(f"/api/v1/info?%74oken={TOKEN}").status_code == 200
    finally:
        server.stop()
    access = [line for line in server.log.read_text().splitlines() if '"GET /' in line]  # uvicorn's access log
    assert access[-1].endswith('"GET /api/v1/info?%74oken=*** HTTP/1.1" 200 OK'), access
    assert not [line for line in access if TOKEN in line], access


# ---- symbolic links in the workspace ----------------------------------------------------------------

SECRET = "root:x:0:0:SECRET-CONTENT:/root:/bin/bash\n"


def _failed_run(app, kind: str = "train", status: str = "failed") -> int:
    """A run row that the supervisor leaves alone (not queued)."""
    db = app.app.state.lmlab.db
    params = {"lab": "azr", "experiment": "azr", "seeds": [0]} if kind == "experiment" else {}
    rid = db.add_run("", [], params, False, None, kind=kind)["id"]
    db.update_run(rid, status=status)
    return rid


def test_run_files_behind_symbolic_links_are_not_served(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for name in ("log.txt", "report.html", "results.json"):
        (elsewhere / name).write_text(SECRET)
    s = settings(tmp_path / "ws")
    app = build_asgi(s)
    ws = app.app.state.lmlab.ws
    linked_log, linked_dir = _failed_run(app), _failed_run(app)
    linked_report = _failed_run(app, "experiment", "completed")
    ws.run_path(linked_log).mkdir()
    (ws.run_path(linked_log) / "log.txt").symlink_to(secret)  # runs/run-1/log.txt -> /etc/passwd
    ws.run_path(linked_dir).symlink_to(elsewhere)              # runs/run-2 -> a folder outside
    ws.run_path(linked_report).symlink_to(elsewhere)
    with client(s, app) as c:
        r = c.get(f"/api/v1/runs/{linked_log}/log")
        assert (r.status_code, r.json()["detail"]) == (409, LINK.format(f"runs/run-{linked_log}/log.txt"))
        r = c.get(f"/api/v1/runs/{linked_dir}/log")
        assert (r.status_code, r.json()["detail"]) == (409, LINK.format(f"runs/run-{linked_dir}"))
        for path in ("report", "files/results.json"):
            r = c.get(f"/api/v1/runs/{linked_report}/{path}")
            assert r.status_code == 404 and "SECRET" not in r.text and "symbolic link" in r.json()["detail"], r.text
        assert c.get(f"/api/v1/runs/{linked_dir}").json()["checkpoint_step"] is None
        assert c.delete(f"/api/v1/runs/{linked_dir}").status_code == 204  # the link goes, not what it points to
        assert not ws.run_path(linked_dir).is_symlink() and (elsewhere / "log.txt").read_text() == SECRET


def test_a_run_whose_folder_is_or_holds_a_planted_link_fails_instead_of_writing_through_it(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    with client(settings(tmp_path / "ws")) as c:
        ws = c.app.app.state.lmlab.ws
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
        ws.run_path(1).symlink_to(outside)             # the next run's folder, planted beforehand
        ws.run_path(2).mkdir()
        (ws.run_path(2) / "log.txt").symlink_to(victim)  # the log the server appends to
        body = {"model": "tiny", "books": ["tales.txt"], "max_steps": 2, **FAST}
        for rid, link in ((1, "runs/run-1"), (2, "runs/run-2/log.txt")):
            r = c.post("/api/v1/runs", json=body)
            assert r.status_code == 201 and r.json()["id"] == rid, r.text
            run = wait_run(c, rid, lambda r: r["status"] not in ("queued", "running"), f"run {rid} to stop")
            assert (run["status"], run["error"]) == ("failed", "could not start: " + LINK.format(link))
    assert list(outside.iterdir()) == [] and victim.read_text() == "precious\n"


def test_a_lock_file_that_is_a_link_stops_the_start_and_its_target_is_kept(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    ws = Workspace(tmp_path / "ws")
    (ws.root / ".server.lock").symlink_to(victim)
    with pytest.raises(LinkError, match=r"^\.server\.lock is a symbolic link"):
        with client(settings(ws.root)):
            pass
    assert victim.read_text() == "precious\n"


def test_a_model_behind_a_link_lists_as_unusable_and_the_others_list(tmp_path):
    secret = tmp_path / "passwd"
    secret.write_text(SECRET)
    with client(settings(tmp_path / "ws")) as c:
        ws = c.app.app.state.lmlab.ws
        for name in ("a", "b", "c"):
            assert c.post("/api/v1/models", json={"name": name, **TINY_MODEL}).status_code == 201
        shutil.move(ws.models / "b", tmp_path / "b")
        (ws.models / "b").symlink_to(tmp_path / "b")              # a model folder linked out
        (ws.models / "c" / "tokenizer.json").symlink_to(secret)   # a file of a model linked out
        r = c.get("/api/v1/models")
        assert r.status_code == 200, r.text
        assert [(m["name"], m["problem"]) for m in r.json()] == [
            ("a", None), ("b", LINK.format("models/b")), ("c", LINK.format("models/c/tokenizer.json"))]
        assert c.get("/api/v1/models/b").json()["problem"] == LINK.format("models/b")
        for r in (c.post("/api/v1/generate", json={"model": "b", "prompt": "a"}),
                  c.get("/api/v1/models/b/download"),
                  c.post("/api/v1/generate", json={"model": "c", "prompt": "a"})):
            assert (r.status_code, "symbolic link" in r.text) == (409, True), r.text
        assert c.delete("/api/v1/models/b").status_code == 204
        assert not (ws.models / "b").exists() and (tmp_path / "b" / "config.json").is_file()
        assert [m["name"] for m in c.get("/api/v1/models").json()] == ["a", "c"]


def test_links_put_into_the_workspace_are_not_indexed_or_followed(tmp_path):
    from lmlab.models import ModelConfig, Transformer
    from lmlab.models.io import save_pretrained
    from lmlab.tokenizers import Tokenizer
    secret = tmp_path / "secret.txt"
    secret.write_text(SECRET)
    tok = Tokenizer.train([SECRET * 20], kind="char", vocab_size=64)
    save_pretrained(tmp_path / "outside-model", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=64,
                                                                               n_layer=1)), tok)
    ws = Workspace(tmp_path / "ws")
    (ws.books / "real.txt").write_text("A real book.\n" * 50)
    (ws.books / "secret.txt").symlink_to(secret)
    (ws.models / "linked").symlink_to(tmp_path / "outside-model")
    with client(settings(ws.root)) as c:
        assert [b["name"] for b in c.get("/api/v1/books").json()] == ["real.txt"]
        assert [m["name"] for m in c.get("/api/v1/models").json()] == []
        r = c.get("/api/v1/books/secret.txt/preview")
        assert r.status_code in (404, 409) and "SECRET" not in r.text
    (ws.root / "runs").rmdir()
    (ws.root / "runs").symlink_to(tmp_path)
    with pytest.raises(LinkError, match="runs is a symbolic link"):
        Workspace(ws.root)


def test_a_stored_text_replaced_by_a_link_is_read_again_not_served(tmp_path):
    """books/.NAME.text holds the text read from a book (extract.py); a link planted in its place, to a file
    with a header that matches the book, is never read: the book is read again and the link replaced."""
    import json
    with client(settings(tmp_path)) as c:
        assert upload(c).status_code == 201
        ws = Workspace(tmp_path)
        stored = ws.text_path("tales.txt")
        header = json.loads(stored.read_text(encoding="utf-8").splitlines()[0])
        crafted = tmp_path.parent / f"{tmp_path.name}-crafted.text"
        crafted.write_text(json.dumps(header) + "\n" + SECRET, encoding="utf-8")
        stored.unlink()
        stored.symlink_to(crafted)
        text = c.get("/api/v1/books/tales.txt/preview").json()["text"]
        assert "SECRET" not in text and text == BOOK[:2000]
        assert not stored.is_symlink() and "SECRET" not in stored.read_text(encoding="utf-8")
