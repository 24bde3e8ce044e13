"""Text self-play as a web-app job, against a real `lmlab serve` process that launches real `lmlab selfplay
text` processes: the run's reward and KL reach the metrics stream one line per iteration, the policy becomes
a new model of the workspace (loadable, with its origin, weights changed), requests are validated (the
memory check counts the reference copy and the judge), a running self-play guards the models it reads and
the name it writes against every endpoint (concurrent requests too), one cancelled mid-run leaves no model
behind but a checkpoint, and a stopped run (cancelled, killed, or its server stopped) resumes from its last
checkpoint to the model it was making, one metrics line per iteration."""

from __future__ import annotations

import io
import json
import shutil
import threading
import zipfile

import httpx
import pytest
import torch
from sqlalchemy import create_engine, text
from test_server_support import (
    BOOK,
    FAST,
    TINY_MODEL,
    ServerProcess,
    client,
    kill_past_a_checkpoint,
    kill_run_process,
    run_status,
    settings,
    sse_events,
    upload,
    wait_for,
    wait_run,
)

from lmlab.models import GenerationConfig, ModelConfig, Transformer, generate
from lmlab.models.io import load_pretrained, save_pretrained
from lmlab.server.db import MIGRATIONS, Database, migrate, schema_drift
from lmlab.server.jobs import process_alive
from lmlab.server.services import selfplay_memory
from lmlab.server.workspace import Workspace
from lmlab.tokenizers import Tokenizer

# A few small updates: two prompts x a group of 4, 16 tokens each; seconds on 2 busy cores. At 8 tokens the
# seed reward tied within every group until the last update for 2 of 20 sampling seeds (no update, KL 0);
# at 16, for none of 40 (measured 2026-12-02 on this test's model), so "the policy moved" is safe to check.
TINY_SP = {"iterations": 3, "group_size": 4, "prompts_per_iteration": 2, "max_new_tokens": 16, "lr": 1e-3,
           "prompts": ["Once upon", "Жил-был"]}
DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731


def _save_model(ws, name, tok_vocab=128, **cfg):
    """A model directory with random weights and a char tokenizer, indexed when a server starts."""
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=tok_vocab)
    config = ModelConfig.preset("gpt2-tiny", **{"vocab_size": 128, "block_size": 32, **cfg})
    save_pretrained(Workspace(ws).model_path(name), Transformer(config), tok)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A server with a book, a model trained for 12 steps (`tiny`), one never trained (`blank`), and one
    with random weights and a char tokenizer (`judge`)."""
    ws = tmp_path_factory.mktemp("ws")
    _save_model(ws, "judge")
    server = ServerProcess(ws).start()
    try:
        with server.client() as c:
            assert upload(c).status_code == 201
            for name in ("tiny", "blank"):
                assert c.post("/api/v1/models", json={"name": name, **TINY_MODEL}).status_code == 201
            r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 12, "log_every": 1,
                                             **FAST})
            assert r.status_code == 201, r.text
            assert wait_run(c, r.json()["id"], DONE, "the training run")["status"] == "completed"
            c.workspace = ws
            yield c
    finally:
        server.stop()


def _weights(path):
    model, tok = load_pretrained(path)
    assert tok is not None
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_selfplay_run_makes_a_new_model(lab):
    before = _weights(lab.workspace / "models" / "tiny")
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-sp", **TINY_SP})
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["kind"] == "selfplay" and run["model"] == "tiny" and run["max_steps"] == 3 and run["books"] == []
    assert run["params"]["new_model"] == "tiny-sp" and run["params"]["reward"] == "seed"
    run = wait_run(lab, run["id"], DONE, "the self-play run")
    assert run["status"] == "completed" and run["exit_code"] == 0, run
    assert run["current_step"] == 3 and run["progress"] == 1.0 and run["can_resume"] is False

    # the metrics stream: one reward and one KL per iteration, the values of the run directory's file
    lines = [json.loads(x) for x in (lab.workspace / "runs" / f"run-{run['id']}" / "metrics.jsonl").read_text()
             .splitlines()]
    got = lab.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]
    assert [m["step"] for m in got] == [m["step"] for m in lines] == [1, 2, 3]
    for a, b in zip(got, lines):
        assert (a["reward"], a["kl"], a["reward_std"]) == (b["reward"], b["kl"], b["reward_std"])
    events = sse_events(lab, f"/api/v1/runs/{run['id']}/events")
    assert events[-1] == ("end", {"run_id": run["id"], "status": "completed"})
    assert all(d["kind"] == "selfplay" for e, d in events if e == "status")
    streamed = [d for e, d in events if e == "metric"]
    assert [(m["step"], m["reward"], m["kl"]) for m in streamed] == [(m["step"], m["reward"], m["kl"]) for m in lines]
    assert run["last_reward"] == lines[-1]["reward"] and run["last_kl"] == lines[-1]["kl"]
    status = lab.get("/training_status").json()  # the AZR Model Trainer app's endpoint: the latest run's reward too
    assert status["current_reward"] == lines[-1]["reward"] and status["is_training"] is False
    assert [h["reward"] for h in status["history"]] == [m["reward"] for m in lines]
    # the prompts reach the process in a file, not on its command line (public in ps, and logged)
    run_dir = lab.workspace / "runs" / f"run-{run['id']}"
    command = [x for x in lab.get(f"/api/v1/runs/{run['id']}/log").json()["lines"] if x.startswith("$ lmlab")]
    assert len(command) == 1 and "lmlab selfplay text --model" in command[0] and "--reward seed" in command[0]
    assert f"--prompts-file {run_dir / 'prompts.json'}" in command[0], command
    assert "Once upon" not in command[0] and "Жил-был" not in command[0]
    assert json.loads((run_dir / "prompts.json").read_text(encoding="utf-8")) == TINY_SP["prompts"]

    # the policy is a new model of the workspace, with its origin; the starting model is unchanged
    m = lab.get("/api/v1/models/tiny-sp").json()
    # its steps go on from the starting model's 12 (a self-play iteration is one update of the weights)
    assert m["trained"] is True and m["trained_run_id"] == run["id"] and m["trained_steps"] == 12 + 3
    assert run["parent_run_id"] == lab.get("/api/v1/models/tiny").json()["trained_run_id"] and run["step_offset"] == 12
    # stored once: the model's files are links to the run's final model, which stays a version of it
    weights = [p / "model.safetensors" for p in (lab.workspace / "models" / "tiny-sp", run_dir / "final")]
    assert weights[0].stat().st_ino == weights[1].stat().st_ino
    assert [(v["run"], v["kind"], v["step"], v["steps"]) for v in lab.get("/api/v1/models/tiny-sp/versions").json()] \
        == [(run["id"], "selfplay", 3, 12 + 3), (run["id"], "selfplay", None, 12 + 3)]
    assert m["origin"]["kind"] == "selfplay" and m["origin"]["parent"] == "tiny"
    assert m["origin"]["reward"] == "seed" and m["origin"]["run_id"] == run["id"]
    assert m["config"] == lab.get("/api/v1/models/tiny").json()["config"]
    # rewards that differ within a group give non-zero advantages: the update must then move the policy
    assert any(m["reward_std"] > 0 for m in lines) and lines[-1]["kl"] > 0, lines
    after = _weights(lab.workspace / "models" / "tiny-sp")
    assert any(not torch.equal(before[k], after[k]) for k in before), "the updates changed no weight"
    unchanged = _weights(lab.workspace / "models" / "tiny")
    assert all(torch.equal(before[k], unchanged[k]) for k in before)
    # ... and it is a model like the others: generation and download work
    g = lab.post("/api/v1/generate", json={"model": "tiny-sp", "prompt": "Once", "max_new_tokens": 5, "seed": 1})
    assert g.status_code == 200 and g.json()["new_tokens"] > 0
    assert lab.get("/api/v1/models/tiny-sp/download").status_code == 200

    info = lab.get("/api/v1/info").json()
    assert info["selfplay_rewards"] == ["seed", "repetition", "perplexity"]
    assert "/api/v1/runs/selfplay" in lab.get("/openapi.json").json()["paths"]
    # the runs list tells the kinds apart; a completed self-play run has its last checkpoint but is not resumed
    assert {r["kind"] for r in lab.get("/api/v1/runs").json()} == {"train", "selfplay"}
    assert [r["id"] for r in lab.get("/api/v1/runs?kind=selfplay").json()] == [run["id"]]
    assert run["checkpoint_step"] == 3
    r = lab.post(f"/api/v1/runs/{run['id']}/resume")
    assert r.status_code == 409 and "is completed" in r.json()["detail"], r.text

    # trained further from the policy's weights it still comes from that self-play; trained from scratch, not
    origin = m["origin"]
    for init, want in ((True, origin), (False, None)):
        r = lab.post("/api/v1/runs", json={"model": "tiny-sp", "books": ["tales.txt"], "max_steps": 2,
                                           "init_from_trained": init, "new_version": not init, **FAST})
        assert r.status_code == 201, r.text
        assert wait_run(lab, r.json()["id"], DONE, "training the self-play model")["status"] == "completed"
        m = lab.get("/api/v1/models/tiny-sp").json()
        assert m["trained_run_id"] == r.json()["id"] and m["origin"] == want, (init, m)


def _selfplay(lab, new_model, **settings):
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": new_model, **TINY_SP, **settings})
    assert r.status_code == 201, r.text
    run = wait_run(lab, r.json()["id"], DONE, "the self-play run")
    assert run["status"] == "completed", run
    return run["id"], lab.workspace / "runs" / f"run-{run['id']}"


def test_selfplay_checkpoints_are_versions_of_its_model(lab, tmp_path):
    """Every checkpoint a self-play run keeps is a version of the model it made, like a training run's: listed
    with its steps, downloadable as a whole model directory (the checkpoint's weights, the final model's config
    and tokenizer) and generated from."""
    n, run_dir = _selfplay(lab, "tiny-spv", iterations=4, save_every=1)
    got = [(v["run"], v["kind"], v["step"], v["steps"], v["current"])
           for v in lab.get("/api/v1/models/tiny-spv/versions").json()]
    # the last two checkpoints are kept (KEEP_CHECKPOINTS); the model's steps go on from tiny's 12
    assert got == [(n, "selfplay", 3, 15, False), (n, "selfplay", 4, 16, False), (n, "selfplay", None, 16, True)]
    d = lab.get(f"/api/v1/models/tiny-spv/download?run={n}&step=3")
    assert d.status_code == 200 and f"tiny-spv-run{n}-step3.zip" in d.headers["content-disposition"]
    zipfile.ZipFile(io.BytesIO(d.content)).extractall(tmp_path)
    folder = tmp_path / f"tiny-spv-run{n}-step3"
    assert (folder / "model.safetensors").read_bytes() == (run_dir / "checkpoints" / "step-3" / "model.safetensors") \
        .read_bytes() != (run_dir / "final" / "model.safetensors").read_bytes()
    for name in ("config.json", "tokenizer.json"):
        assert (folder / name).read_bytes() == (run_dir / "final" / name).read_bytes()
    model, tok = load_pretrained(folder)
    assert tok is not None
    cfg = {"max_new_tokens": 12, "temperature": 0.8, "top_k": 40, "seed": 5}  # the request's top_k is 40
    g = lab.post("/api/v1/generate", json={"model": "tiny-spv", "prompt": "Once", "run": n, "step": 3, **cfg})
    want = generate(model, tok, "Once", GenerationConfig(**cfg))
    assert g.status_code == 200 and g.json()["text"] == want, g.text
    assert lab.delete("/api/v1/models/tiny-spv").status_code == 204


def test_a_model_made_again_under_a_self_play_models_name_has_none_of_its_versions(lab):
    """Deleted and made again under the same name, the model lists none of the self-play run's versions, and
    they are refused for it: they were the old model's."""
    n, _ = _selfplay(lab, "tiny-again", iterations=1)
    assert [v["run"] for v in lab.get("/api/v1/models/tiny-again/versions").json()] == [n, n]
    assert lab.delete("/api/v1/models/tiny-again").status_code == 204
    assert lab.post("/api/v1/models", json={"name": "tiny-again", **TINY_MODEL}).status_code == 201
    assert lab.get("/api/v1/models/tiny-again/versions").json() == []
    for query in (f"run={n}", f"run={n}&step=1"):
        d = lab.get(f"/api/v1/models/tiny-again/download?{query}")
        assert (d.status_code, d.json()["detail"]) == (404, f"run {n} did not train model 'tiny-again'"), query
    assert lab.delete("/api/v1/models/tiny-again").status_code == 204


def test_perplexity_reward_scores_with_a_judge(lab):
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-judged", "reward": "perplexity",
                                                 "judge": "tiny", **TINY_SP, "iterations": 2})
    assert r.status_code == 201, r.text
    run = wait_run(lab, r.json()["id"], DONE, "the judged self-play run")
    assert run["status"] == "completed", run
    got = lab.get(f"/api/v1/runs/{run['id']}/metrics").json()["metrics"]
    assert [m["step"] for m in got] == [1, 2] and all(m["reward"] < 0 for m in got)  # a mean log-probability
    origin = lab.get("/api/v1/models/tiny-judged").json()["origin"]
    assert origin["reward"] == "perplexity" and origin["judge"] == "tiny"


@pytest.mark.parametrize("change, status, words", [
    ({"model": "nope"}, 404, "not found"),
    ({"model": "blank"}, 409, "not been trained"),
    ({"model": "../tiny"}, 400, "path separator"),
    ({"new_model": "tiny"}, 409, "already exists"),
    ({"new_model": "TINY"}, 409, "only in letter case"),
    ({"new_model": "../../escape"}, 400, "path separator"),
    ({"new_model": ".hidden"}, 400, "must not start with"),
    ({"reward": "file"}, 422, "does not execute"),
    ({"reward": "length"}, 422, "must be one of seed, repetition, perplexity"),
    ({"reward": "perplexity"}, 422, "needs a judge"),
    ({"reward": "perplexity", "judge": "nope"}, 404, "not found"),
    ({"reward": "perplexity", "judge": "blank"}, 409, "not been trained"),
    ({"judge": "tiny"}, 422, "only used by reward 'perplexity'"),
    ({"max_new_tokens": 40}, 422, "exceeds the model's context (32)"),
    ({"iterations": 0}, 422, "iterations"),
    ({"iterations": 10**6}, 422, "iterations"),
    ({"group_size": 1}, 422, "group_size"),
    ({"prompts_per_iteration": 0}, 422, "prompts_per_iteration"),
    ({"max_new_tokens": 0}, 422, "max_new_tokens"),
    ({"lr": 0}, 422, "lr"),
    ({"kl_coef": -0.1}, 422, "kl_coef"),
    ({"temperature": 0}, 422, "temperature"),
    ({"seed": -1}, 422, "seed"),
    ({"prompts": ["x"] * 65}, 422, "prompts"),
    ({"books": ["tales.txt"]}, 422, "books"),
])
def test_selfplay_requests_are_validated(lab, change, status, words):
    runs = len(lab.get("/api/v1/runs").json())
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "refused", **TINY_SP, **change})
    assert r.status_code == status, r.text
    detail = r.json()["detail"]
    text = detail if isinstance(detail, str) else " ".join(f"{e['loc'][-1]}: {e['msg']}" for e in detail)
    assert words in text, text
    assert len(lab.get("/api/v1/runs").json()) == runs  # nothing was queued
    assert lab.get("/api/v1/models/refused").status_code == 404


def test_a_prompt_with_a_lone_surrogate_is_refused(lab):
    body = json.dumps({"model": "tiny", "new_model": "refused", **TINY_SP, "prompts": ["ok", "\ud800"]})
    r = lab.post("/api/v1/runs/selfplay", content=body.encode(), headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "prompts", 1], r.text


def _post_at_once(lab, path, body, n):
    """`n` identical POSTs from `n` threads released together: the status codes, sorted."""
    gate, codes = threading.Barrier(n), []

    def post():
        with httpx.Client(base_url=lab.base_url, timeout=60) as c:
            gate.wait()
            codes.append(c.post(path, json=body).status_code)
    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sorted(codes)


def test_cancelled_selfplay_leaves_no_model(lab):
    """A run of 100000 iterations cannot finish within this test on any machine (each one samples, scores and
    updates): while it runs, the models it reads can be read by more self-play but not trained, resumed into
    or deleted, and the name it will write is taken, through every endpoint and for concurrent requests;
    cancelled, its process ends and no model appears, but a checkpoint of its last iteration does; its name is
    free again, and while another model holds it the run cannot be resumed."""
    models = {m["name"] for m in lab.get("/api/v1/models").json()}
    # a training run of `tiny` stopped after a checkpoint, to be resumed while self-play reads `tiny`
    r = lab.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 100_000,
                                       "init_from_trained": True, "log_every": 1, **FAST})
    assert r.status_code == 201, r.text
    stopped = r.json()["id"]
    wait_run(lab, stopped, lambda r: r["status"] == "running" and r["current_step"] >= 1, "a training step")
    lab.post(f"/api/v1/runs/{stopped}/cancel")
    assert wait_run(lab, stopped, DONE, "the training run to stop")["can_resume"] is True

    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-long", **TINY_SP,
                                                 "iterations": 100_000})
    assert r.status_code == 201, r.text
    run_id, pid = r.json()["id"], None
    try:
        run = wait_run(lab, run_id, lambda r: r["status"] == "running" and r["current_step"] >= 2, "iterations")
        pid = run["pid"]
        # the target name is reserved, by the app's endpoint too
        r = lab.post("/api/v1/models", json={"name": "tiny-long", **TINY_MODEL})
        assert r.status_code == 409 and f"self-play run {run_id}" in r.json()["detail"]
        r = lab.post("/create_model", json={"name": "tiny-long", "vocab_size": 300, "max_seq_len": 32})
        assert r.status_code == 409 and "being made" in r.json()["detail"], r.text
        r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-long", **TINY_SP})
        assert r.status_code == 409 and "being made" in r.json()["detail"]
        # more self-play may read the starting model (queued behind the running one), here judged by `judge`
        r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-long2", **TINY_SP,
                                                     "reward": "perplexity", "judge": "judge"})
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        second = r.json()["id"]
        # the models read are not training: they say who reads them
        m = lab.get("/api/v1/models/tiny").json()
        assert m["active_run_id"] is None and m["selfplay_run_ids"] == [second, run_id], m
        m = lab.get("/api/v1/models/judge").json()
        assert m["active_run_id"] is None and m["selfplay_run_ids"] == [second], m
        # ... and they cannot be trained, resumed into or deleted, whichever endpoint asks and however it is
        # read; the app's /train answers 400, its code for a model already in use
        r = lab.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 1, **FAST})
        assert r.status_code == 409 and "starting point" in r.json()["detail"]
        r = lab.post("/api/v1/runs", json={"model": "judge", "books": ["tales.txt"], "max_steps": 1, **FAST})
        assert r.status_code == 409 and f"the judge of self-play run {second}" in r.json()["detail"]
        seed_train = {"book_file": "tales.txt", "max_iterations": 1, "batch_size": 4}
        r = lab.post("/train", json={"model_name": "tiny", **seed_train})
        assert r.status_code == 400 and "starting point of self-play run" in r.json()["detail"], r.text
        r = lab.post("/train", json={"model_name": "judge", **seed_train})
        assert r.status_code == 400 and f"the judge of self-play run {second}" in r.json()["detail"], r.text
        r = lab.post(f"/api/v1/runs/{stopped}/resume")
        assert r.status_code == 409 and "starting point of self-play run" in r.json()["detail"], r.text
        assert run_status(lab, stopped)["status"] == "cancelled"
        assert lab.delete("/api/v1/models/tiny").status_code == 409
        assert lab.delete("/api/v1/models/judge").status_code == 409
        # concurrent requests for one new name: exactly one is queued
        race = {"model": "tiny", "new_model": "tiny-race", **TINY_SP}
        assert _post_at_once(lab, "/api/v1/runs/selfplay", race, 6) == [201] + [409] * 5
        raced = [r["id"] for r in lab.get("/api/v1/runs?kind=selfplay").json()
                 if r["params"]["new_model"] == "tiny-race"]
        assert len(raced) == 1
        for queued in (second, raced[0]):
            assert lab.post(f"/api/v1/runs/{queued}/cancel").json()["status"] == "cancelled"

        r = lab.post(f"/api/v1/runs/{run_id}/cancel")
        assert r.status_code == 200 and r.json()["cancel_requested"] is True
        run = wait_run(lab, run_id, DONE, "the cancelled run to stop")
        assert run["status"] == "cancelled" and run["exit_code"] == 130 and run["pid"] is None, run
        assert run["current_step"] < 100_000 and run["can_resume"] is True
        assert run["checkpoint_step"] == run["current_step"]  # the cancel let the iteration finish and saved it
        wait_for(lambda: not process_alive(pid), 30, what="the self-play process to end")
        assert not (lab.workspace / "runs" / f"run-{run_id}" / "final").exists()
        assert lab.get("/api/v1/models/tiny-long").status_code == 404
        assert not (lab.workspace / "models" / "tiny-long").exists()
        assert {m["name"] for m in lab.get("/api/v1/models").json()} == models
        # the name is free again; taken by another model, the run cannot resume (it would save its policy there)
        assert lab.post("/api/v1/models", json={"name": "tiny-long", **TINY_MODEL}).status_code == 201
        r = lab.post(f"/api/v1/runs/{run_id}/resume")
        assert r.status_code == 409 and "'tiny-long' already exists; resuming this run" in r.json()["detail"], r.text
        # the web app's words for it (it said "choose another name", which resuming has no place for)
        assert r.json()["error"] == {"key": "resume_name_taken", "params": {"name": "tiny-long"}}
        assert run_status(lab, run_id)["status"] == "cancelled"
        assert lab.delete("/api/v1/models/tiny-long").status_code == 204
    finally:
        kill_run_process(pid)


def _steps(lab, run_id):
    steps = [m["step"] for m in lab.get(f"/api/v1/runs/{run_id}/metrics?limit=100000").json()["metrics"]]
    lines = (lab.workspace / "runs" / f"run-{run_id}" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert [json.loads(x)["step"] for x in lines] == steps  # the server's copy is the file's
    return steps


def test_stopped_selfplay_resumes_to_its_model(lab):
    """Killed (-9) past a checkpoint, a self-play run resumes from that checkpoint (the lines logged after it are
    dropped); cancelled, it resumes from the checkpoint the cancel wrote, here with max_steps as its new number
    of iterations, and completes with its model. One metrics line per iteration, 1..N, nothing twice. A run
    cancelled before it started has no checkpoint, and resuming it is refused with the reason."""
    long = {"model": "tiny", "new_model": "tiny-resumed", **TINY_SP, "iterations": 100_000, "save_every": 2}
    r = lab.post("/api/v1/runs/selfplay", json=long)
    assert r.status_code == 201 and r.json()["params"]["save_every"] == 2, r.text
    run_id, pids = r.json()["id"], []
    run_dir = lab.workspace / "runs" / f"run-{run_id}"
    try:
        # queued behind it (one job at a time), then cancelled: nothing to resume from
        r = lab.post("/api/v1/runs/selfplay", json={**long, "new_model": "tiny-never"})
        assert r.status_code == 201 and r.json()["status"] == "queued", r.text
        never = r.json()["id"]
        assert lab.post(f"/api/v1/runs/{never}/cancel").json()["status"] == "cancelled"
        r = lab.post(f"/api/v1/runs/{never}/resume")
        assert r.status_code == 409 and "stopped before its first checkpoint" in r.json()["detail"], r.text
        assert run_status(lab, never)["can_resume"] is False

        pids.append(wait_run(lab, run_id, lambda r: (r["checkpoint_step"] or 0) >= 2, "a checkpoint")["pid"])
        kill_past_a_checkpoint(pids[-1], run_dir)
        run = wait_run(lab, run_id, DONE, "the supervisor to notice the death")
        assert run["status"] == "interrupted" and run["exit_code"] == -9 and run["can_resume"], run
        killed_at, last = run["checkpoint_step"], _steps(lab, run_id)[-1]
        assert last > killed_at  # lines past the checkpoint, to be dropped

        r = lab.post(f"/api/v1/runs/{run_id}/resume")  # as it was: 100000 iterations
        assert r.status_code == 200 and r.json()["status"] == "queued" and r.json()["max_steps"] == 100_000, r.text
        # a step past the killed process's last line is the resumed one's, logged inside its loop (a cancel
        # before that would stop it before it has a checkpoint of its own)
        run = wait_run(lab, run_id, lambda r: r["status"] == "running" and r["current_step"] > last,
                       "iterations after the resume")
        assert run["resumed_from_step"] == killed_at
        pids.append(run["pid"])
        lab.post(f"/api/v1/runs/{run_id}/cancel")
        run = wait_run(lab, run_id, DONE, "the cancelled run to stop")
        assert run["status"] == "cancelled" and run["can_resume"] and run["exit_code"] == 130, run
        step = run["checkpoint_step"]
        assert step == run["current_step"] and _steps(lab, run_id) == list(range(1, step + 1))
        assert lab.get("/api/v1/models/tiny-resumed").status_code == 404

        r = lab.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": step})
        assert r.status_code == 409 and "must be larger" in r.json()["detail"], r.text
        r = lab.post(f"/api/v1/runs/{run_id}/resume", json={"max_steps": step + 2})
        assert r.status_code == 200 and r.json()["max_steps"] == step + 2, r.text
        run = wait_run(lab, run_id, DONE, "the resumed run to finish")
        assert run["status"] == "completed" and run["resumed_from_step"] == step, run
        assert run["current_step"] == run["checkpoint_step"] == step + 2 and run["launches"] == 3
        assert _steps(lab, run_id) == list(range(1, step + 3))
        log = (run_dir / "log.txt").read_text()
        for at in (killed_at, step):
            assert f"resumed from {run_dir / 'checkpoints' / f'step-{at}'} (step {at})" in log
        commands = [x for x in log.splitlines() if x.startswith("$ lmlab selfplay text")]
        assert len(commands) == 3 and [c.endswith(" --resume") for c in commands] == [False, True, True], commands
        assert "--iterations 100000" in commands[1] and f"--iterations {step + 2}" in commands[2]
        m = lab.get("/api/v1/models/tiny-resumed").json()
        assert m["trained"] and m["trained_run_id"] == run_id and m["trained_steps"] == 12 + step + 2, m
        assert m["origin"]["iterations"] == step + 2 and m["origin"]["parent"] == "tiny"
    finally:
        for pid in pids:
            kill_run_process(pid)
    assert lab.delete("/api/v1/models/tiny-resumed").status_code == 204


def test_selfplay_never_overwrites_files_it_did_not_make(lab):
    """A models/<new_model>/ directory that appears while the run goes (a model put there by hand: the server
    indexes it when it next starts) is left as it was: the run fails and says why, and nothing else is
    made. A request for a name whose directory exists is refused at once."""
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-hand", **TINY_SP,
                                                 "iterations": 1})
    assert r.status_code == 201, r.text
    theirs = lab.workspace / "models" / "tiny-hand"
    theirs.mkdir()  # the process has not even imported torch yet
    (theirs / "notes.txt").write_text("mine")
    run = wait_run(lab, r.json()["id"], DONE, "the self-play run")
    assert run["status"] == "failed" and "exists though no model of that name is indexed" in run["error"], run
    assert [p.name for p in theirs.iterdir()] == ["notes.txt"] and (theirs / "notes.txt").read_text() == "mine"
    assert lab.get("/api/v1/models/tiny-hand").status_code == 404
    assert not [p for p in (lab.workspace / "models").iterdir() if "selfplay-" in p.name]  # no copy left over
    assert (lab.workspace / "runs" / f"run-{run['id']}" / "final" / "model.safetensors").is_file()  # kept
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-hand", **TINY_SP})
    assert r.status_code == 409 and "exists in the workspace though no model" in r.json()["detail"]
    # the failed run resumes at its last iteration, as it was, once the folder is gone: it saves its policy
    assert run["can_resume"] and run["checkpoint_step"] == 1
    r = lab.post(f"/api/v1/runs/{run['id']}/resume")
    assert r.status_code == 409 and r.json()["detail"].endswith(
        "; remove it; resuming this run saves its policy under that name"), r.text
    policy = _weights(lab.workspace / "runs" / f"run-{run['id']}" / "final")
    shutil.rmtree(theirs)
    assert lab.post(f"/api/v1/runs/{run['id']}/resume").status_code == 200
    run = wait_run(lab, run["id"], DONE, "the resumed run")
    assert run["status"] == "completed" and run["resumed_from_step"] == 1 and run["current_step"] == 1, run
    assert _steps(lab, run["id"]) == [1]
    assert lab.get("/api/v1/models/tiny-hand").json()["trained_steps"] == 12 + 1
    saved = _weights(lab.workspace / "models" / "tiny-hand")
    assert all(torch.equal(policy[k], saved[k]) for k in policy)
    assert lab.delete("/api/v1/models/tiny-hand").status_code == 204


def test_the_memory_check_counts_the_reference_and_the_judge(tmp_path):
    """One update holds the policy's training, the frozen reference copy and, for reward perplexity, the
    judge: a request that fits without the judge is refused with a large one, and says what it counted."""
    _save_model(tmp_path, "m")
    _save_model(tmp_path, "big", block_size=1024, vocab_size=8192)  # a wide context and vocabulary: big logits
    policy, big = (ModelConfig.load(tmp_path / "models" / n / "config.json") for n in ("m", "big"))
    B, T = 8, 1 + 16  # group 4 x 2 prompts; a one-token prompt ('' is <BOS>) and 16 new tokens
    parts = selfplay_memory(policy, B, T, big)
    assert parts["policy"] == policy.memory_estimate(B, T, training=True)["total"]
    assert parts["reference"] == policy.num_parameters() * 4 + 2 * B * T * 128 * 4
    assert parts["judge"] == big.num_parameters() * 4 + 2 * B * 1024 * 8192 * 4
    assert parts["total"] == parts["policy"] + parts["reference"] + parts["judge"]
    alone = selfplay_memory(policy, B, T)
    budget = (alone["total"] + parts["total"]) // 2
    body = {"model": "m", "new_model": "m-sp", **TINY_SP, "prompts": [], "reward": "perplexity"}
    with client(settings(tmp_path, memory_budget_bytes=budget)) as c:
        r = c.post("/api/v1/runs/selfplay", json={**body, "judge": "big"})
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "self-play with 8 completions x 17 tokens" in detail and "the judge 'big'" in detail, detail
        assert "reference copy" in detail and "a smaller judge" in detail
        r = c.post("/api/v1/runs/selfplay", json={**body, "judge": "m"})  # the same run with a small judge fits
        assert r.status_code == 201, r.text
        c.post(f"/api/v1/runs/{r.json()['id']}/cancel")
    # the reference alone can tip the balance: a budget that holds the policy's training and half the copy
    with client(settings(tmp_path, memory_budget_bytes=alone["policy"] + alone["reference"] // 2)) as c:
        r = c.post("/api/v1/runs/selfplay", json={**body, "reward": "seed"})
        assert r.status_code == 422 and "reference copy" in r.json()["detail"], r.text


def test_a_stopped_or_killed_server_interrupts_selfplay(tmp_path):
    """The server stopped (SIGTERM), then killed (SIGKILL), while self-play runs (100000 iterations: they cannot
    finish first). Stopped, it asks the process to checkpoint and end, and the run shows as interrupted and says
    how to continue; killed, the next server adopts the process that outlived it (the run goes on) and a cancel
    stops it at a checkpoint. Either way the run can be resumed and no model appears."""
    tok = Tokenizer.train([BOOK], kind="char", vocab_size=128)
    cfg = ModelConfig.preset("gpt2-tiny", vocab_size=128, block_size=32)
    save_pretrained(Workspace(tmp_path).model_path("m"), Transformer(cfg), tok)  # indexed when the server starts
    long = {**TINY_SP, "iterations": 100_000}
    server, pids = ServerProcess(tmp_path).start(), []
    try:
        for stop in ("stop", "kill"):
            with server.client() as c:
                r = c.post("/api/v1/runs/selfplay", json={"model": "m", "new_model": "m-sp", **long})
                assert r.status_code == 201, r.text
                run_id = r.json()["id"]
                pids.append(wait_run(c, run_id, lambda r: r["current_step"] >= 1, "an iteration")["pid"])
            getattr(server, stop)()
            server = ServerProcess(tmp_path).start()
            with server.client() as c:
                run = run_status(c, run_id)
                if stop == "stop":
                    assert run["status"] == "interrupted" and "resume to continue from the last checkpoint" in \
                        run["error"], run
                else:
                    assert run["status"] == "running" and run["pid"] == pids[-1], run
                    assert c.post(f"/api/v1/runs/{run_id}/cancel").json()["cancel_requested"] is True
                    assert wait_run(c, run_id, DONE, "the adopted run to stop")["status"] == "cancelled"
                wait_for(lambda: not process_alive(pids[-1]), 60, what="the self-play process to end")
                run = run_status(c, run_id)
                assert run["can_resume"] is True and run["checkpoint_step"] >= 1, run
                assert c.get("/api/v1/models/m-sp").status_code == 404
                assert not (tmp_path / "models" / "m-sp").exists()
    finally:
        for pid in pids:
            kill_run_process(pid)
        server.stop()


def test_the_migration_keeps_old_runs_as_training(tmp_path):
    """A database written before self-play (schema version 1) gains the new columns; its runs are training."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    assert migrate(engine, MIGRATIONS[:1]) == 1
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO models (name, config, tokenizer_kind, tokenizer_vocab, created_at, updated_at) "
                          "VALUES ('m', '{}', 'char', 64, 0, 0)"))
        conn.execute(text("INSERT INTO runs (model_name, books, params, init_from_trained, status, resume, "
                          "cancel_requested, current_step, launches, metrics_epoch, created_at, updated_at) "
                          "VALUES ('m', '[]', '{}', 0, 'completed', 0, 0, 5, 1, 0, 0, 0)"))
    engine.dispose()
    db = Database(url)
    try:
        assert db.version == MIGRATIONS[-1][0] and schema_drift(db.engine) == []
        run = db.list_runs()[0]
        assert run["kind"] == "train" and run["last_reward"] is None and run["current_step"] == 5
        assert db.get_model("m")["origin"] is None
    finally:
        db.close()


def test_a_half_done_migration_is_finished(tmp_path):
    """pysqlite commits each ALTER as it runs: a start-up that failed inside migration 2 left runs.kind added
    at schema version 1. The next start adds only what is missing and reaches version 2."""
    url = f"sqlite:///{tmp_path / 'half.db'}"
    engine = create_engine(url)

    def cut_short(conn):
        conn.execute(text("ALTER TABLE runs ADD COLUMN kind VARCHAR(16) NOT NULL DEFAULT 'train'"))
        raise RuntimeError("the server died here")
    with pytest.raises(RuntimeError):
        migrate(engine, [MIGRATIONS[0], (2, MIGRATIONS[1][1], cut_short)])
    with engine.connect() as conn:  # the state this test is about: version 1, with the first column added
        assert conn.execute(text("SELECT max(version) FROM schema_version")).scalar() == 1
        assert "kind" in [r[1] for r in conn.execute(text("PRAGMA table_info(runs)"))]
    engine.dispose()
    db = Database(url)
    try:
        assert db.version == MIGRATIONS[-1][0] and schema_drift(db.engine) == []
        db.add_model("m", {}, None, "char", 64)
        assert db.add_run("m", [], {}, False, 1)["kind"] == "train" and db.get_model("m")["origin"] is None
    finally:
        db.close()


def test_resume_from_a_starting_model_trained_since_is_refused_up_front(tmp_path):
    """A resumed self-play run must start from the weights it started from (its KL anchor): the launched
    process refuses other weights, so the request refuses them first, with the reason, rather than queueing a
    run that fails and still offers Resume."""
    from lmlab.lab.selfplay.text import file_sha256

    _save_model(tmp_path, "start")
    weights = Workspace(tmp_path).model_path("start") / "model.safetensors"
    db = Database(f"sqlite:///{tmp_path / 'lmlab.db'}")
    run = db.add_run("start", [], {"new_model": "start-sp", "reward": "seed", **TINY_SP}, False, 3, kind="selfplay")
    db.update_run(run["id"], status="cancelled")
    run_dir = Workspace(tmp_path).run_path(run["id"])
    (run_dir / "checkpoints" / "step-2").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"selfplay_text": {}, "model": str(weights.parent),
                                                     "model_sha256": file_sha256(weights)}))
    db.close()
    with client(settings(tmp_path)) as c:
        assert run_status(c, run["id"])["can_resume"] is True
        _save_model(tmp_path, "start")  # trained again meanwhile: other weights
        r = c.post(f"/api/v1/runs/{run['id']}/resume")
        assert r.status_code == 409, r.text
        assert "model 'start' has other weights than when this run started" in r.json()["detail"], r.text
        assert run_status(c, run["id"])["status"] == "cancelled"
