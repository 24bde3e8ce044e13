"""The server's errors that the web app says in Russian (app.py's Problem): the answer keeps FastAPI's `detail`
(the English sentence clients read) and adds error.key and its params; every key raised anywhere in the server
has its English and Russian strings in i18n.js (problem.KEY), with the same placeholders as the params it sends."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from test_server_support import TINY_MODEL, client, settings, upload

import lmlab.server
from lmlab.models import ModelConfig
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
    with client(settings(tmp_path, max_upload_bytes=100_000, memory_budget_bytes=2**30)) as c:
        yield c


def test_the_answer_names_the_error_beside_its_sentence(api):
    assert upload(api).status_code == 201
    assert api.post("/api/v1/models", json={"name": "m", **TINY_MODEL}).status_code == 201
    run = api.post("/api/v1/runs", json={"model": "m", "books": ["tales.txt"], "max_steps": 5}).json()
    big = ModelConfig.preset("gpt2-tiny", vocab_size=300, block_size=32, n_layer=24, n_embd=2048).memory_estimate(
        1, 32, training=True)["total"]
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
        (api.post("/api/v1/models", json={"name": "M", **TINY_MODEL}), 409, "name_case_twin",
         {"name": "M", "twin": "m"}, "'m' is taken, and names that differ only in letter case"),
        (upload(api, "empty.txt", b""), 400, "file_empty", {"name": "empty.txt"}, "empty.txt is empty"),
        (upload(api, "big.txt", b"a" * 100_001), 413, "upload_too_large", {"name": "big.txt", "limit": "0.0953674"},
         "big.txt is larger than this server's upload limit of 0.0953674 MiB"),
        (api.post("/api/v1/models", json={"name": "big", **TINY_MODEL, "n_layer": 24, "n_embd": 2048}), 422,
         "memory_over_budget", {"batch": 1, "tokens": 32, "need": f"{big / 2**30:.2f} GiB", "budget": "1.00 GiB"},
         f"training this model with batch 1 x 32 tokens needs ~{big / 2**30:.2f} GiB"),
    ]
    for r, status, key, params, text in cases:
        body = r.json()
        assert (r.status_code, body["error"]) == (status, {"key": key, "params": params}), body
        assert body["detail"].startswith(text), body
    api.post(f"/api/v1/runs/{run['id']}/cancel")
    r = api.post(f"/api/v1/runs/{run['id']}/cancel")
    assert r.json()["error"] == {"key": "run_not_active", "params": {"id": run["id"]}}
    assert "error" not in api.get("/api/v1/nothing-here").json()  # FastAPI's own 404: detail alone
