"""Cross-site requests from a real browser (Debian's Chromium driven by Playwright). A page of another origin,
served by a second HTTP server on another port of 127.0.0.1 (the same *site* to a browser: a SameSite cookie
would go along), tries against the default server (no token) what any page the user visits could: a plain
HTML form that uploads over a book, no-cors fetches that upload over it again, upload through the seed's
/upload_book and cancel and resume a run, and JSON POSTs that create models (no-cors, where the browser
drops the JSON Content-Type, and CORS, which needs a preflight). Afterwards the state, read through the API,
is as before: the book's bytes, the models, the run's status. The app's own requests still go through."""

from __future__ import annotations

import functools
import os
import signal
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytest.importorskip("playwright.sync_api")
# one Chromium set-up for the browser tests: the `browser` fixture, and the skip without a Chromium
from test_browser import browser, pytestmark  # noqa: E402, F401
from test_server_support import FAST, TINY_MODEL, ServerProcess, kill_run_process, upload, wait_run  # noqa: E402

from lmlab.server.db import ACTIVE  # noqa: E402

ATTACK = """async ([target, runId]) => {
  const file = () => new File(["EVIL: overwritten from another site\\n"], "tales.txt", {type: "text/plain"});
  const sent = [];
  // a plain HTML form, multipart with a file, posted into a frame: no script of the page reads the answer
  await new Promise((resolve) => {
    const sink = "sink" + document.querySelectorAll("iframe").length;  // a new frame each time: its load ends the wait
    const frame = Object.assign(document.createElement("iframe"), {name: sink});
    const form = Object.assign(document.createElement("form"), {method: "POST", enctype: "multipart/form-data",
                                                                 target: sink});
    form.action = target + "/api/v1/books?overwrite=true";
    const input = Object.assign(document.createElement("input"), {type: "file", name: "file"});
    const files = new DataTransfer();
    files.items.add(file());
    input.files = files.files;
    form.appendChild(input);
    document.body.append(frame, form);
    frame.addEventListener("load", resolve, {once: true});
    form.submit();
  });
  sent.push("form");
  // no-cors fetches: the answer is opaque to the page, but the request is sent
  const noCors = async (path, init = {}) => {
    await fetch(target + path, {method: "POST", mode: "no-cors", ...init});
    sent.push(path);
  };
  const upload = () => { const fd = new FormData(); fd.append("file", file()); return fd; };
  const json = {"Content-Type": "application/json"};
  await noCors("/api/v1/books?overwrite=true", {body: upload()});
  await noCors("/upload_book", {body: upload()});
  await noCors(`/api/v1/runs/${runId}/cancel`);
  await noCors(`/api/v1/runs/${runId}/resume`);
  const model = JSON.stringify({name: "evil", preset: "gpt2-tiny", vocab_size: 300, block_size: 32});
  await noCors("/api/v1/models", {headers: json, body: model});
  await noCors("/create_model", {headers: json, body: JSON.stringify({name: "evil-seed", vocab_size: 300,
    d_model: 32, num_layers: 1, num_heads: 2, d_ff: 64, max_seq_len: 32})});
  // CORS with a JSON body: the preflight gets no Access-Control-Allow-Origin, so the POST is never sent
  try {
    await fetch(target + "/api/v1/models", {method: "POST", headers: json, body: model});
    sent.push("cors sent");
  } catch (e) {
    sent.push("cors refused");
  }
  return sent;
}"""
SENT = ["form", "/api/v1/books?overwrite=true", "/upload_book", "/api/v1/runs/{}/cancel", "/api/v1/runs/{}/resume",
        "/api/v1/models", "/create_model", "cors refused"]


class Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


def test_another_sites_page_changes_nothing(tmp_path, browser):  # noqa: F811 (the fixture imported above)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "index.html").write_text("<!doctype html><title>some other site</title><p>hello</p>")
    site = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "site")))
    threading.Thread(target=site.serve_forever, daemon=True).start()
    server = ServerProcess(tmp_path / "ws").start()
    pid = None
    try:
        with server.client() as c:
            assert upload(c).status_code == 201
            assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
            r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 1_000_000,
                                             "save_every": 2, "log_every": 1, **FAST})
            assert r.status_code == 201, r.text
            rid = r.json()["id"]
            run = wait_run(c, rid, lambda r: (r["checkpoint_step"] or 0) >= 2 or r["status"] not in ACTIVE,
                           "a checkpoint")
            assert run["status"] == "running", run
            pid = run["pid"]

            def state() -> tuple:
                book = c.get("/api/v1/books/tales.txt").json()
                text = c.get("/api/v1/books/tales.txt/preview", params={"chars": 100_000}).json()["text"]
                run = c.get(f"/api/v1/runs/{rid}").json()
                return (book["size_bytes"], text, [m["name"] for m in c.get("/api/v1/models").json()],
                        run["status"], run["cancel_requested"])

            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{site.server_address[1]}/")
            # 1. while the run runs (frozen, so that nothing but a cancel could change its status)
            os.kill(pid, signal.SIGSTOP)
            before = state()
            assert before[2:] == (["tiny"], "running", False)
            assert page.evaluate(ATTACK, [server.url, rid]) == [s.format(rid) for s in SENT]
            assert state() == before
            os.kill(pid, signal.SIGCONT)
            # 2. once it is cancelled with a checkpoint: resumable, by the app's own request only
            assert c.post(f"/api/v1/runs/{rid}/cancel").status_code == 200
            run = wait_run(c, rid, lambda r: r["status"] not in ACTIVE, "the cancel")
            assert run["status"] == "cancelled" and run["can_resume"], run
            before = state()
            assert page.evaluate(ATTACK, [server.url, rid]) == [s.format(rid) for s in SENT]
            assert state() == before
            assert c.post(f"/api/v1/runs/{rid}/resume").json()["status"] == "queued"
            run = wait_run(c, rid, lambda r: r["status"] == "running", "the resume")
            pid = run["pid"]
            assert c.post(f"/api/v1/runs/{rid}/cancel").status_code == 200
            wait_run(c, rid, lambda r: r["status"] not in ACTIVE, "the second cancel")
            page.close()
    finally:
        if pid:
            try:
                os.kill(pid, signal.SIGCONT)  # a stopped trainer could not checkpoint when the server stops
            except ProcessLookupError:
                pass
        server.stop()
        kill_run_process(pid)
        site.shutdown()
