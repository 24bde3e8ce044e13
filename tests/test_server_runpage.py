"""The run page's API: a run's timing (phase, elapsed, ETA, mean tokens/s), GET /runs/{id}/overview (settings,
samples, self-play completions, output, load) and the command line that makes the run again, checked by
parsing it with the CLI and by running it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time

import pytest
from test_server_support import FAST, TINY_MODEL, client, settings, upload, wait_run

from lmlab.cli import build_parser, parse_arguments
from lmlab.configs import given, read_config_file
from lmlab.models import ModelConfig
from lmlab.server.services import trainings
from lmlab.train import TrainConfig

DONE = lambda r: r["status"] not in ("queued", "running")  # noqa: E731
SETTINGS = {"max_steps": 8, "eval_every": 4, "log_every": 1, "save_every": 4, "sample_tokens": 5, "seed": 11,
            "schedule": "wsd", "weight_decay": 0.05, "drift_every": 4, **FAST}

@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    ws = tmp_path_factory.mktemp("ws")
    with client(settings(ws, max_jobs=1, memory_budget_bytes=2 * 2**30)) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
        r = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], **SETTINGS})
        assert r.status_code == 201, r.text
        run = wait_run(c, r.json()["id"], DONE, "the run")
        assert run["status"] == "completed", run
        c.workspace, c.run_id = ws, run["id"]
        yield c

def lines(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]

def test_a_runs_timing_is_its_mean_throughput_and_wall_time(lab):
    run_dir = lab.workspace / "runs" / f"run-{lab.run_id}"
    metrics = lines(run_dir / "metrics.jsonl")
    for run in (lab.get(f"/api/v1/runs/{lab.run_id}").json(), lab.get("/api/v1/runs").json()[0]):
        # the mean over the run (tokens / seconds of training), not the latest window's tokens_per_s
        assert run["tokens_per_s_mean"] == round(metrics[-1]["tokens"] / metrics[-1]["elapsed_s"], 1)
        assert run["tokens_per_s"] == metrics[-1]["tokens_per_s"]
        assert run["elapsed_s"] == round(run["finished_at"] - run["started_at"], 1)
        assert run["phase"] is None and run["eta_s"] is None  # finished

def test_the_overview_holds_the_runs_settings_samples_and_output(lab):
    run_dir = lab.workspace / "runs" / f"run-{lab.run_id}"
    page = lab.get(f"/api/v1/runs/{lab.run_id}/overview").json()
    assert page["run"]["id"] == lab.run_id
    assert page["config"] == json.loads((run_dir / "config.json").read_text())
    assert page["config"]["train"]["sample_tokens"] == 5 and page["config"]["data_stats"]["documents"] == 1
    samples = lines(run_dir / "samples.jsonl")
    assert page["samples"] == samples and [s["step"] for s in samples] == [4, 8]
    assert [x["prompt"] for x in samples[0]["samples"]] == [""]
    assert page["log_tail"] == (run_dir / "log.txt").read_text().splitlines()[-8:]
    assert page["completions"] == []
    assert page["clone"] == {"model": "tiny", "books": ["tales.txt"], "init_from_trained": False,
                             **lab.get(f"/api/v1/runs/{lab.run_id}").json()["params"]}
    load = page["load"]
    assert load["cpus"] == os.cpu_count() and load["process_rss_bytes"] is None  # no process now
    meminfo = dict(x.split(":", 1) for x in open("/proc/meminfo").read().splitlines())
    assert load["memory_total_bytes"] == int(meminfo["MemTotal"].split()[0]) * 1024
    assert lab.get("/api/v1/runs/999999/overview").status_code == 404

def test_a_clone_starts_a_run_with_the_same_settings(lab):
    clone = lab.get(f"/api/v1/runs/{lab.run_id}/overview").json()["clone"]
    # the model now has the fixture run's weights: a from-scratch clone is a new version (issue 14 item 4)
    r = lab.post("/api/v1/runs", json={**clone, "new_version": True})
    assert r.status_code == 201, r.text
    # with the consent it gave, kept for starting it again (6b2cf77)
    assert r.json()["params"] == {**lab.get(f"/api/v1/runs/{lab.run_id}").json()["params"], "new_version": True}
    assert lab.post(f"/api/v1/runs/{r.json()['id']}/cancel").status_code == 200
    wait_run(lab, r.json()["id"], DONE, "the clone to stop")

def test_the_command_line_parses_into_the_runs_configs_and_makes_the_same_run(lab, tmp_path):
    run_dir = lab.workspace / "runs" / f"run-{lab.run_id}"
    saved = json.loads((run_dir / "config.json").read_text())
    command = lab.get(f"/api/v1/runs/{lab.run_id}/overview").json()["command"]
    argv = shlex.split(command)
    assert argv[:2] == ["lmlab", "train"]
    args = parse_arguments(build_parser(), argv[1:])
    assert args.sources == [str(lab.workspace / "books" / "tales.txt")] and args.out == f"run-{lab.run_id}-again"
    assert TrainConfig.from_dict(given(args, TrainConfig)).to_dict() == saved["train"]
    model = ModelConfig.from_dict({**read_config_file(args.model_config), **given(args, ModelConfig)})
    assert model.to_dict() == saved["model"]
    assert (args.tokenizer_kind, args.vocab_size) == ("bpe", TINY_MODEL["vocab_size"])
    # run, it makes the same run: the same settings and, on one thread as the server's runs, the same losses
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lmlab = [sys.executable, "-c", "import sys; from lmlab.cli import main; sys.exit(main())"]
    done = subprocess.run([*lmlab, *argv[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    again = tmp_path / f"run-{lab.run_id}-again"
    mine = json.loads((again / "config.json").read_text())
    assert (mine["train"], mine["model"], mine["data_stats"]) == (saved["train"], saved["model"], saved["data_stats"])
    assert [m["loss"] for m in lines(again / "metrics.jsonl")] == \
        pytest.approx([m["loss"] for m in lines(run_dir / "metrics.jsonl")], abs=1e-5)
    # the train form's drift option (--drift-every 4): both runs tracked it, and the Data view lists the run's
    assert saved["train"]["drift_every"] == 4
    drift = json.loads((run_dir / "drift.json").read_text())
    assert [r["step"] for r in drift["records"]] == [4, 8]
    assert [r["step"] for r in json.loads((again / "drift.json").read_text())["records"]] == [4, 8]
    (listed,) = lab.get("/api/v1/books/tales.txt/data/drift").json()["runs"]
    assert (listed["id"], listed["records"]) == (lab.run_id, drift["records"])

def test_a_running_runs_phase_follows_its_phase_file(tmp_path):
    """phase.json of this launch names the phase; one older than the launch (an earlier launch's) is not
    believed: the run is starting."""
    with client(settings(tmp_path / "ws", memory_budget_bytes=2 * 2**30)) as c:
        assert upload(c).status_code == 201
        assert c.post("/api/v1/models", json={"name": "tiny", **TINY_MODEL}).status_code == 201
        run = c.post("/api/v1/runs", json={"model": "tiny", "books": ["tales.txt"], "max_steps": 100000,
                                           "log_every": 1, **FAST}).json()
        run = wait_run(c, run["id"], lambda r: r["current_step"] >= 3, "three steps")
        phase_file = tmp_path / "ws" / "runs" / f"run-{run['id']}" / "phase.json"
        seen = json.loads(phase_file.read_text())["phase"]
        assert seen in ("training", "evaluating", "saving") and run["phase"] in ("training", "evaluating", "saving")
        assert run["eta_s"] > 0 and run["elapsed_s"] > 0
        # the run's own file, replaced under it (the trainer rewrites it only when its phase changes; every 10%
        # of 100000 steps is far away)
        phase_file.write_text(json.dumps({"phase": "evaluating", "step": 3, "time": time.time()}))
        assert c.get(f"/api/v1/runs/{run['id']}").json()["phase"] == "evaluating"
        phase_file.write_text(json.dumps({"phase": "data", "step": None, "time": run["started_at"] - 1}))
        assert c.get(f"/api/v1/runs/{run['id']}").json()["phase"] == "starting"
        assert c.post(f"/api/v1/runs/{run['id']}/cancel").status_code == 200
        wait_run(c, run["id"], DONE, "the run to stop")

def test_selfplay_completions_come_with_their_rewards(lab):
    r = lab.post("/api/v1/runs/selfplay", json={"model": "tiny", "new_model": "tiny-sp", "iterations": 2,
                                                "group_size": 2, "prompts_per_iteration": 1, "max_new_tokens": 6,
                                                "prompts": ["Once"]})
    assert r.status_code == 201, r.text
    run = wait_run(lab, r.json()["id"], DONE, "the self-play run")
    assert run["status"] == "completed", run
    metrics = lines(lab.workspace / "runs" / f"run-{run['id']}" / "metrics.jsonl")
    page = lab.get(f"/api/v1/runs/{run['id']}/overview").json()
    assert page["completions"] == [{"step": m["step"], "reward": m["reward"], "kl": m["kl"], "sample": m["sample"]}
                                   for m in metrics]
    assert [c["step"] for c in page["completions"]] == [1, 2] and page["clone"] is None and page["config"] is None
    assert shlex.split(page["command"])[:3] == ["lmlab", "selfplay", "text"]


def test_an_experiments_trainings_are_counted_without_following_links(tmp_path):
    run = tmp_path / "run-1"
    for sub, done in (("phases/seed-0", True), ("phases/seed-1", True), ("phases/seed-2", False), ("plateau/a", False)):
        (run / sub).mkdir(parents=True)
        (run / sub / "metrics.jsonl").write_text("")
        if done:
            (run / sub / "final").mkdir()
    (run / "metrics.jsonl").write_text("")  # the experiment's own folder is not one of its trainings
    (run / "elsewhere").symlink_to(run / "phases")
    assert trainings(run) == {"started": 4, "finished": 2}
