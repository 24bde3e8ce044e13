"""Start again (POST /api/v1/runs/{id}/restart) for each kind of run that stops with nothing to resume from: the
stopped run's request submitted anew through the endpoint that made it. No run is launched here (the
supervisor's tick does nothing): each run is cancelled while queued, started again, and compared with the
stopped one; what a new start refuses is refused (a name taken since), and what a new start copies is copied
(a fine-tuning run's dataset)."""

from __future__ import annotations

import pytest
from test_server_support import client, settings, upload

from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.server.jobs import Supervisor
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer

CHATS = [{"messages": [{"role": "user", "content": f"{a}+{b}?"}, {"role": "assistant", "content": f"{a + b}."}]}
         for a, b in ((2, 3), (4, 1), (7, 2), (5, 5))]


@pytest.fixture()
def lab(tmp_path, monkeypatch):
    monkeypatch.setattr(Supervisor, "tick", lambda self: None)  # queued runs stay queued
    tok = Tokenizer.train(["".join(m["content"] for c in CHATS for m in c["messages"]) + "0123456789+=?. Once"],
                          kind="char", vocab_size=120)
    save_pretrained(Workspace(tmp_path).model_path("base"), Transformer(ModelConfig.preset(
        "gpt2-tiny", vocab_size=len(tok) + 8, n_layer=1, block_size=48)), tok)
    with client(settings(tmp_path)) as c:
        assert upload(c).status_code == 201
        body = "".join(__import__("json").dumps(x) + "\n" for x in CHATS).encode()
        assert c.post("/api/v1/datasets", data={"kind": "conversations"},
                      files={"file": ("chats.jsonl", body, "application/jsonl")}).status_code == 201
        c.workspace = tmp_path
        yield c


def _stopped(c, path, body):
    r = c.post(path, json=body)
    assert r.status_code == 201, r.text
    run = r.json()
    assert c.post(f"/api/v1/runs/{run['id']}/cancel").json()["status"] == "cancelled"
    return c.get(f"/api/v1/runs/{run['id']}").json()


@pytest.mark.parametrize("path, body", [
    ("/api/v1/runs/tune", {"method": "sft", "model": "base", "dataset": "chats.jsonl", "new_model": "s",
                           "max_steps": 3}),
    ("/api/v1/runs/tune", {"method": "grpo", "model": "base", "task": "addition", "new_model": "g",
                           "max_new_tokens": 8}),
    ("/api/v1/runs/selfplay", {"model": "base", "new_model": "sp", "iterations": 2, "prompts": ["Once"],
                               "max_new_tokens": 16}),
    ("/api/v1/runs/quantize", {"model": "base", "new_model": "q", "to": "int8"}),
    ("/api/v1/runs/merge", {"model": "base", "others": ["base"], "new_model": "m", "method": "linear",
                            "weights": [-1.0, 3.0]}),
    ("/api/v1/runs/eval", {"models": ["base"], "tasks": ["fables-mc"]}),
    ("/api/v1/runs", {"model": "base", "books": ["tales.txt"], "init_from_trained": True, "max_steps": 5}),
    # from scratch on a trained model: the request's consent (every seed-app training) is the new start's too
    ("/api/v1/runs", {"model": "base", "books": ["tales.txt"], "new_version": True, "max_steps": 5}),
], ids=["sft", "grpo", "selfplay", "quantize", "merge", "eval", "train", "train-new-version"])
def test_each_kind_starts_again_as_a_new_run_of_its_request(lab, path, body):
    old = _stopped(lab, path, body)
    assert old["can_restart"] and not old["can_resume"]
    r = lab.post(f"/api/v1/runs/{old['id']}/restart")
    assert r.status_code == 201, r.text
    new = r.json()
    assert new["id"] != old["id"] and new["status"] == "queued"
    assert (new["kind"], new["model"], new["books"], new["params"]) == (old["kind"], old["model"], old["books"],
                                                                        old["params"])
    assert lab.get(f"/api/v1/runs/{old['id']}").json()["status"] == "cancelled"  # left as it was
    if body.get("dataset"):  # the new run's own copy of the data, as a new start makes it
        copy = lab.workspace / "runs" / f"run-{new['id']}" / "dataset.jsonl"
        assert copy.read_bytes() == (lab.workspace / "datasets" / "chats.jsonl").read_bytes()


def test_what_a_new_start_refuses_is_refused(lab):
    """The checks are the new start's: a quantization whose model name was taken since (it was accepted, and
    the job failed after the work), a fine-tuning run whose dataset was deleted, a run that is not stopped."""
    old = _stopped(lab, "/api/v1/runs/quantize", {"model": "base", "new_model": "q", "to": "int8"})
    assert lab.post("/api/v1/models", json={"name": "q", "preset": "gpt2-tiny", "vocab_size": 300,
                                            "block_size": 32}).status_code == 201
    r = lab.post(f"/api/v1/runs/{old['id']}/restart")
    assert r.status_code == 409 and "a model named 'q' already exists" in r.json()["detail"], r.text
    old = _stopped(lab, "/api/v1/runs/tune", {"method": "sft", "model": "base", "dataset": "chats.jsonl",
                                              "new_model": "s"})
    assert lab.delete("/api/v1/datasets/chats.jsonl").status_code == 204
    r = lab.post(f"/api/v1/runs/{old['id']}/restart")
    assert r.status_code == 404 and "dataset 'chats.jsonl' not found" in r.json()["detail"], r.text
    queued = lab.post("/api/v1/runs/quantize", json={"model": "base", "new_model": "q2", "to": "int8"}).json()
    r = lab.post(f"/api/v1/runs/{queued['id']}/restart")
    assert r.status_code == 409 and "cannot be started again: it is queued" in r.json()["detail"], r.text
    assert lab.post("/api/v1/runs/999/restart").status_code == 404
