"""The server's errors that the web app says in Russian (app.py's Problem): the answer keeps FastAPI's `detail`
(the English sentence clients read) and adds error.key and its params; every key raised anywhere in the server
has its English and Russian strings in i18n.js (problem.KEY), with the same placeholders as the params it sends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_server_support import TINY_MODEL, client, settings, upload

import lmlab.server
from lmlab.server.jobs import Supervisor

SERVER = Path(lmlab.server.__file__).parent


def strings() -> dict[str, tuple[str, str]]:
    text = (SERVER / "static" / "i18n.js").read_text(encoding="utf-8")
    return {k: (en, ru) for k, en, ru in re.findall(r'"(problem\.\w+)": \["([^"]*)", "([^"]*)"\]', text)}


def test_every_named_error_has_both_languages_with_its_params():
    from lmlab.server.app import PROBLEMS
    known = strings()
    assert set(known) == {f"problem.{key}" for key in PROBLEMS}
    for key, params in PROBLEMS.items():
        for text in known[f"problem.{key}"]:
            assert set(re.findall(r"\{(\w+)\}", text)) <= set(params), (key, text, params)
    assert all("{name}" in known[f"problem.{k}"][1] for k, p in PROBLEMS.items() if "name" in p)  # Russian names it


@pytest.fixture()
def api(tmp_path, monkeypatch):
    monkeypatch.setattr(Supervisor, "tick", lambda self: None)  # queued runs stay queued
    with client(settings(tmp_path)) as c:
        yield c


def test_the_answer_names_the_error_beside_its_sentence(api):
    assert upload(api).status_code == 201
    assert api.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
    run = api.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}).json()
    cases = [
        (api.get("/api/v1/models/nope"), 404, "model_not_found", {"name": "nope"}, "model 'nope' not found"),
        (api.post("/api/v1/models", json={"name": "m", **TINY_MODEL}), 409, "model_name_taken", {"name": "m"},
         "a model named 'm' already exists"),
        (api.get("/api/v1/runs/999"), 404, "run_not_found", {"id": 999}, "run 999 not found"),
        (api.delete(f"/api/v1/runs/{run['id']}"), 409, "run_active", {"id": run["id"]},
         f"run {run['id']} is queued; cancel it first"),
        (api.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}), 409,
         "model_training", {"name": "m", "run": run["id"]}, f"model 'm' is already training (run {run['id']})"),
        (api.delete("/api/v1/books/tales.txt"), 409, "book_in_use", {"name": "tales.txt", "runs": str(run["id"])},
         f"book 'tales.txt' is in use by run(s) [{run['id']}]"),
        (upload(api), 409, "book_exists", {"name": "tales.txt"}, "a book named 'tales.txt' already exists"),
    ]
    for r, status, key, params, text in cases:
        body = r.json()
        assert (r.status_code, body["error"]) == (status, {"key": key, "params": params}), body
        assert body["detail"].startswith(text), body
    api.post(f"/api/v1/runs/{run['id']}/cancel")
    r = api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.json()["error"] == {"key": "run_not_active", "params": {"id": run["id"]}}
    assert "error" not in api.get("/api/v1/nothing-here").json()  # FastAPI's own 404: detail alone
