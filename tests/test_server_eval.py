"""The web app's evaluations: a job started through the API runs `lmlab eval` / `lmlab compare` under the
supervisor and its results are the CLI's own numbers (compared exactly with the commands run by hand on the
same models and tasks), with the per-model bootstrap intervals, the comparison and a run's trajectory; cancel
stops one; bad requests are refused with the reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from test_server_support import (
    CHILD_ENV,
    FAST,
    finished,
    held_once_started,
    tiny_workspace,
    wait_for,
)

from lmlab.eval import paired_bootstrap
from lmlab.eval.tasks import SHIPPED
from lmlab.models import ModelConfig, Transformer
from lmlab.models.io import save_pretrained
from lmlab.tokenizers import Tokenizer
from lmlab.train.demo_corpus import demo_corpus

TASKS = ["fables-mc", "fables-lm"]



def cli_json(ws, *args: str):
    """`lmlab ARGS... --json` as the supervisor starts it: in the workspace, with the same thread count."""
    out = subprocess.run([sys.executable, "-m", "lmlab.cli", *args, "--json"], cwd=ws, capture_output=True, text=True,
                         env={**os.environ, **CHILD_ENV}, check=True).stdout
    return json.loads(out)


@pytest.fixture(scope="module")
def ev(tmp_path_factory):
    """A server with `tiny` trained for 8 steps (checkpoints at 4 and 8), `rand` (untrained weights saved by
    hand, a character tokenizer), `blank` (never trained) and a workspace task file of its own."""
    ws = tmp_path_factory.mktemp("ws")
    tok = Tokenizer.train([demo_corpus(n_stories=10, seed=1)], kind="char", vocab_size=120)
    save_pretrained(ws / "models" / "rand", Transformer(ModelConfig.preset("gpt2-tiny", vocab_size=120, n_layer=1,
                                                                           block_size=64)), tok)
    (ws / "tasks").mkdir()
    (ws / "tasks" / "mine.yaml").write_text("name: mine\nkind: multiple_choice\ndata: mine.jsonl\n")
    mc = (SHIPPED / "fables-mc.jsonl").read_text(encoding="utf-8").splitlines()
    (ws / "tasks" / "mine.jsonl").write_text("\n".join(mc[:3]) + "\n", encoding="utf-8")
    (ws / "tasks" / "broken.yaml").write_text("name: broken\nkind: multiple_choice\ndata: broken.jsonl\n")
    (ws / "tasks" / "broken.jsonl").write_text('{"context": "a", "choices": ["b"], "answer": 2}\n')
    with tiny_workspace(ws, steps=8, save_every=4) as c:
        yield c


def test_the_tasks_listed_are_the_shipped_ones_and_the_workspaces(ev):
    tasks = {t["id"]: t for t in ev.get("/api/v1/eval/tasks").json()}
    assert list(tasks) == ["fables-gen", "fables-lm", "fables-mc", "tasks/broken.yaml", "tasks/mine.yaml"]
    assert [(t["name"], t["kind"], t["items"], t["source"], t["problem"]) for t in tasks.values()] == [
        ("fables-gen", "generate", 4, "shipped", None), ("fables-lm", "lm", 6, "shipped", None),
        ("fables-mc", "multiple_choice", 8, "shipped", None),
        ("broken", "", 0, "workspace", f"{ev.workspace / 'tasks' / 'broken.jsonl'}:1: answer 2 is not an index of "
                                       "the 1 choices"),
        ("mine", "multiple_choice", 3, "workspace", None)]


def test_one_model_on_tasks_gives_the_numbers_of_lmlab_eval(ev):
    body = {"models": ["tiny"], "tasks": [*TASKS, "tasks/mine.yaml"]}
    r = ev.post("/api/v1/runs/eval", json=body)
    assert r.status_code == 201, r.text
    assert r.json()["kind"] == "eval" and r.json()["params"] == body
    run = finished(ev, r.json()["id"])
    assert run["status"] == "completed", run
    got = ev.get(f"/api/v1/runs/{run['id']}/eval").json()
    want = cli_json(ev.workspace, "eval", "models/tiny", "--tasks", ",".join([*TASKS, "tasks/mine.yaml"]))
    # the run page's command is the one the job ran, into another folder
    assert ev.get(f"/api/v1/runs/{run['id']}/overview").json()["command"] == (
        f"lmlab eval models/tiny --tasks fables-mc,fables-lm,tasks/mine.yaml --out run-{run['id']}-again")
    assert [r["model"] for r in got["results"]] == ["tiny"] and got["comparison"] is None and not got["report"]
    summary = got["results"][0]["tasks"]
    assert [(t["task"], t["kind"], t["n"]) for t in summary] == [(t["task"], t["kind"], t["n"]) for t in want["tasks"]]
    for mine, ref in zip(summary, want["tasks"]):
        assert {m: v["value"] for m, v in mine["metrics"].items()} == ref["metrics"]  # exactly the CLI's numbers
        for metric, v in mine["metrics"].items():  # the mean's bootstrap interval over the same items
            ci = paired_bootstrap([0.0] * ref["n"], [it[metric] for it in ref["items"]])
            assert (v["low"], v["high"]) == (ci["low"], ci["high"])
            if ref["n"] >= 6:
                assert v["low"] <= v["value"] <= v["high"]
            else:  # tasks/mine.yaml's three items: too few for an interval
                assert v["low"] is v["high"] is None
        assert any(v["low"] is None for t in summary if t["n"] < 6 for v in t["metrics"].values())


def test_several_models_give_the_comparison_of_lmlab_compare(ev, tmp_path):
    r = ev.post("/api/v1/runs/eval", json={"models": ["tiny", "rand"], "tasks": ["fables-mc"]})
    run = finished(ev, r.json()["id"])
    assert run["status"] == "completed", run
    got = ev.get(f"/api/v1/runs/{run['id']}/eval").json()
    want = cli_json(ev.workspace, "compare", "models/tiny", "models/rand", "--tasks", "fables-mc", "--out",
                    str(tmp_path / "cmp"))
    named = {"models/tiny": "tiny", "models/rand": "rand"}
    assert got["comparison"]["base"] == "tiny" and got["comparison"]["models"] == ["tiny", "rand"]
    assert got["comparison"]["rows"] == [{**row, "model": named[row["model"]]} for row in want["rows"]]
    assert got["comparison"]["flips"] == [{**f, "model": named[f["model"]]} for f in want["flips"]]
    reference = json.loads((tmp_path / "cmp" / "compare.json").read_text())["results"]
    values = [(r["model"], [{m: v["value"] for m, v in t["metrics"].items()} for t in r["tasks"]])
              for r in got["results"]]
    assert values == [(named[r["model"]], [t["metrics"] for t in r["tasks"]]) for r in reference]
    assert got["report"] is True
    report = ev.get(f"/api/v1/runs/{run['id']}/report")
    assert report.status_code == 200 and "<h1>Comparison against models/tiny</h1>" in report.text


def test_a_runs_checkpoints_give_the_trajectory_of_lmlab_eval_all_checkpoints(ev, tmp_path):
    r = ev.post("/api/v1/runs/eval", json={"run": ev.train_run, "tasks": ["fables-mc"]})
    assert r.status_code == 201, r.text
    assert r.json()["params"] == {"models": ["tiny"], "tasks": ["fables-mc"], "run": ev.train_run}
    run = finished(ev, r.json()["id"])
    assert run["status"] == "completed", run
    got = ev.get(f"/api/v1/runs/{run['id']}/eval").json()
    want = cli_json(ev.workspace, "eval", f"runs/run-{ev.train_run}", "--all-checkpoints", "--tasks", "fables-mc",
                    "--out", str(tmp_path / "traj"))
    assert got["trajectory"] == want and [x["step"] for x in want] == [4, 4, 8, 8]
    assert got["trajectory_of"] == ev.train_run and got["results"] == []
    assert not (ev.workspace / "runs" / f"run-{ev.train_run}" / "eval").exists()  # the run's folder is not written


def test_what_an_evaluation_reads_stays_until_it_is_cancelled(ev):
    """A trajectory reads a run's checkpoints and its model: neither can be deleted while it runs; cancel
    stops it (not resumable), and then they can."""
    r = ev.post("/api/v1/runs/eval", json={"run": ev.train_run, "tasks": ["fables-gen"]})
    run_id = r.json()["id"]
    with held_once_started(ev, run_id):  # held until the cancel is sent: it cannot finish first
        r = ev.delete(f"/api/v1/runs/{ev.train_run}")
        assert (r.status_code, r.json()["detail"]) == (409, f"run {ev.train_run}'s checkpoints are being evaluated "
                                                            f"(run {run_id}); cancel that run or wait for it")
        r = ev.delete("/api/v1/models/tiny")
        assert (r.status_code, r.json()["detail"]) == (409, f"model 'tiny' is being evaluated (run {run_id}); cancel "
                                                            "that run or wait for it")
        assert ev.post(f"/api/v1/runs/{run_id}/cancel").json()["cancel_requested"] is True
        wait_for(lambda: (ev.workspace / "runs" / f"run-{run_id}" / "stop-requested").exists(), 60, 0.05,
                 "the supervisor to ask it to stop")
    run = finished(ev, run_id)
    # stopped by its KeyboardInterrupt (130), or by the signal itself if it came before Python's handler was set
    assert run["status"] == "cancelled" and run["exit_code"] in (130, -signal.SIGINT) and not run["can_resume"]
    assert ev.get(f"/api/v1/runs/{run_id}/eval").json()["trajectory"] is None
    assert ev.post(f"/api/v1/runs/{run_id}/resume").json()["detail"] == (
        f"run {run_id}: this evaluation keeps no checkpoints and cannot be resumed; start it again")
    assert ev.delete(f"/api/v1/runs/{run_id}").status_code == 204  # (the model and its run stay for the others)


@pytest.mark.parametrize("body, status, detail", [
    ({"models": ["tiny"], "tasks": ["nope"]}, 422,
     "unknown task 'nope'; the tasks are fables-gen, fables-lm, fables-mc, tasks/broken.yaml, tasks/mine.yaml"),
    ({"models": ["nope"], "tasks": ["fables-mc"]}, 404, "model 'nope' not found"),
    ({"models": ["blank"], "tasks": ["fables-mc"]}, 409,
     "model 'blank' has not been trained yet: a model to evaluate must be a trained model"),
    ({"models": [], "tasks": ["fables-mc"]}, 422, "choose at least one model to evaluate"),
    ({"models": ["tiny"], "run": 1, "tasks": ["fables-mc"]}, 422,
     "give the models to evaluate, or a training run whose checkpoints to evaluate (run), not both"),
    ({"models": ["tiny", "tiny"], "tasks": ["fables-mc"]}, 422, "model 'tiny' is listed twice"),
    ({"run": 999, "tasks": ["fables-mc"]}, 404, "run 999 not found"),
    ({"models": ["tiny"], "tasks": ["tasks/broken.yaml"]}, 422, "{ws}/tasks/broken.jsonl:1: answer 2 is not an index "
                                                                "of the 1 choices"),
])
def test_bad_requests_are_refused_with_the_reason(ev, body, status, detail):
    r = ev.post("/api/v1/runs/eval", json=body)
    assert (r.status_code, r.json()["detail"]) == (status, detail.format(ws=ev.workspace))


def test_no_tasks_is_a_validation_error_on_the_field(ev):
    r = ev.post("/api/v1/runs/eval", json={"models": ["tiny"], "tasks": []})
    assert r.status_code == 422
    assert [(e["loc"], e["type"]) for e in r.json()["detail"]] == [(["body", "tasks"], "too_short")]


def test_a_trajectory_needs_a_training_run(ev):
    other = ev.post("/api/v1/runs/eval", json={"models": ["tiny"], "tasks": ["tasks/mine.yaml"]}).json()["id"]
    r = ev.post("/api/v1/runs/eval", json={"run": other, "tasks": ["fables-mc"]})
    assert (r.status_code, r.json()["detail"]) == (409, f"run {other} is not a training run; a trajectory scores a "
                                                        "training run's checkpoints")
    ev.post(f"/api/v1/runs/{other}/cancel")
    finished(ev, other)
    r = ev.get(f"/api/v1/runs/{ev.train_run}/eval")
    assert (r.status_code, r.json()["detail"]) == (404, f"run {ev.train_run} is a train run, not an evaluation")


def test_a_model_being_trained_is_not_evaluated(ev):
    """Its weights would be replaced under `lmlab compare` when the training ends (before: the evaluation
    started, 201)."""
    r = ev.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 50, "eval_every": 0,
                                      "init_from_trained": True, **FAST})
    assert r.status_code == 201, r.text
    train_id = r.json()["id"]
    pid = wait_for(lambda: ev.get(f"/api/v1/runs/{train_id}").json()["pid"], 60, 0.01, "the training to start")
    os.kill(pid, signal.SIGSTOP)  # still training when the evaluation is asked for
    try:
        r = ev.post("/api/v1/runs/eval", json={"models": ["rand", "tiny"], "tasks": ["fables-mc"]})
        assert (r.status_code, r.json()["detail"]) == (409, f"model 'tiny' is already training (run {train_id}); "
                                                            "cancel that run or wait for it")
        assert ev.post(f"/api/v1/runs/{train_id}/cancel").json()["cancel_requested"] is True
    finally:
        os.kill(pid, signal.SIGCONT)
    assert finished(ev, train_id)["status"] == "cancelled"
