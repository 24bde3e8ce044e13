"""Evaluation (docs/EVAL.md): the tasks a workspace offers (the shipped ones and its own tasks/*.yaml), an
evaluation started as a run under the supervisor (`lmlab eval` for one model, `lmlab compare` for several,
`lmlab eval RUN --all-checkpoints` for a run's trajectory; commands.eval_command), and its results: per model
and task the metrics with 95% bootstrap intervals, the comparison (lmlab.eval.compare: paired-bootstrap
intervals of the deltas, flipped items) and the trajectory."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException
from fastapi import Path as PathParam

from ...eval import load_task, paired_bootstrap, shipped_tasks
from ...eval.tasks import METRICS, SHIPPED
from ...train import checkpoints
from ..app import AppState, Problem, StateDep
from ..commands import product
from ..db import ACTIVE
from ..schemas import EvalCreate, EvalResults, EvalTask, Run
from ..services import need_run, need_trained, need_unused, run_info
from ..workspace import LinkError

router = APIRouter()
RunId = Annotated[int, PathParam(ge=1, le=2**62, description="run number")]


def task_files(state: AppState) -> dict[str, Path]:
    """Task id -> its YAML file: the shipped tasks by name, then the workspace's tasks/NAME.yaml as
    `tasks/NAME.yaml` (the path the evaluation's process, started in the workspace, reads). Names with a comma
    (the CLI's list separator), hidden files and symbolic links are left out."""
    out = {name: SHIPPED / f"{name}.yaml" for name in shipped_tasks()}
    folder = state.ws.tasks
    if folder.is_dir() and not folder.is_symlink():
        for path in sorted(folder.glob("*.yaml")):
            if not path.name.startswith(".") and "," not in path.name and path.is_file() and not path.is_symlink():
                out[f"tasks/{path.name}"] = path
    return out


def bad_task(task_id: str, exc: ValueError) -> Problem:
    """The 422 of a task file that does not load (the reason names its line), for a request that uses it."""
    return Problem(422, "task_invalid", str(exc), name=task_id, reason=str(exc))


@router.get("/eval/tasks", tags=["eval"], response_model=list[EvalTask],
            summary="the tasks to evaluate on: the shipped examples and the workspace's tasks/*.yaml")
def list_tasks(state: StateDep) -> list[EvalTask]:
    out = []
    for task_id, path in task_files(state).items():
        source = "workspace" if task_id.startswith("tasks/") else "shipped"
        try:
            task = load_task(path)
        except ValueError as exc:  # listed with the reason, as a model that cannot be used is
            out.append(EvalTask(id=task_id, name=path.stem, kind="", items=0, source=source, problem=str(exc)))
            continue
        out.append(EvalTask(id=task_id, name=task.name, kind=task.kind, items=len(task.items), source=source))
    return out


@router.post("/runs/eval", tags=["eval"], status_code=201, response_model=Run,
             responses={404: {"description": "an unknown model or run"},
                        409: {"description": "an untrained model, or a run without checkpoints or still active"},
                        422: {"description": "no or unknown tasks, a task file that does not load, neither or both "
                                             "of models and run"}},
             summary="start an evaluation: models on tasks (several: compared against the first), or a training "
                     "run's checkpoints (a trajectory)")
def create_eval_run(state: StateDep, req: EvalCreate) -> Run:
    if bool(req.models) == (req.run is not None):
        raise HTTPException(422, "give the models to evaluate, or a training run whose checkpoints to evaluate "
                                 "(run), not both" if req.models else "choose at least one model to evaluate")
    for values, what in ((req.models, "model"), (req.tasks, "task")):
        twice = next((v for i, v in enumerate(values) if v in values[:i]), None)
        if twice is not None:
            raise HTTPException(422, f"{what} {twice!r} is listed twice")
    files = task_files(state)
    for task_id in req.tasks:  # bad task files are refused now, not by a process that fails later
        if task_id not in files:
            raise HTTPException(422, f"unknown task {task_id!r}; the tasks are {', '.join(files)}")
        try:
            load_task(files[task_id])
        except ValueError as exc:
            raise bad_task(task_id, exc) from None
    with state.lock:  # from the checks through add_run: a model cannot be deleted in between
        models = list(req.models)
        for name in models:
            need_trained(state, name, "a model to evaluate")
            # a model in training gets new weights when the run ends, under the evaluation's feet
            need_unused(state, name, lambda r: r["kind"] == "train")
        if req.run is not None:
            source = need_run(state, req.run)
            if source["kind"] != "train":
                raise HTTPException(409, f"run {req.run} is not a training run; a trajectory scores a training "
                                         "run's checkpoints")
            if source["status"] in ACTIVE:
                raise HTTPException(409, f"run {req.run} is {source['status']}; evaluate its checkpoints once it "
                                         "has stopped")
            try:
                found = checkpoints(state.ws.run_dir(req.run))
            except LinkError as exc:
                raise HTTPException(409, str(exc)) from None
            if not found:
                raise HTTPException(409, f"run {req.run} has no checkpoints to evaluate")
            models = [source["model_name"]]  # what the run reads: the model cannot be deleted meanwhile
        params = {"models": models, "tasks": list(req.tasks), **({"run": req.run} if req.run else {})}
        run = state.db.add_run("", [], params, False, None, kind="eval")
    state.supervisor.submit(run["id"])
    return run_info(state, run)


def task_summary(result: dict[str, Any]) -> dict[str, Any]:
    """A task's result (lmlab.eval.run_task's) without its items: each metric's value, and for a mean over items
    its 95% percentile-bootstrap interval: paired_bootstrap of the scores against zeros resamples the items and
    returns their mean's interval (the same draws as the comparison's, seed 0). Corpus-level metrics (BLEU and
    the like of generation tasks) have no per-item scores and no interval."""
    per_item = METRICS[result["kind"]]
    metrics = {}
    for name, value in result["metrics"].items():
        ci = paired_bootstrap([0.0] * result["n"], [it[name] for it in result["items"]]) if name in per_item else {}
        metrics[name] = {"value": value, "low": ci.get("low"), "high": ci.get("high")}
    return {"task": result["task"], "kind": result["kind"], "n": result["n"], "metrics": metrics,
            **({"signatures": result["signatures"]} if "signatures" in result else {})}


@router.get("/runs/{run_id}/eval", tags=["eval"], response_model=EvalResults,
            responses={404: {"description": "no such run, or not an evaluation"}},
            summary="an evaluation's results (empty until it completes): per model and task, the comparison, or "
                    "the trajectory")
def get_eval_results(state: StateDep, run_id: RunId) -> EvalResults:
    row = need_run(state, run_id)
    if row["kind"] != "eval":
        raise HTTPException(404, f"run {run_id} is a {row['kind']} run, not an evaluation")
    p, run_dir = row["params"], state.ws.run_path(run_id)
    results: list[dict[str, Any]] = []
    comparison = trajectory = None
    data = None
    if row["status"] == "completed":
        try:
            data = state.ws.read_bytes(run_dir / product(row)).decode("utf-8")
        except (OSError, LinkError):
            pass  # removed meanwhile: shown as no results
    # the processes name models by their path in the workspace, models/NAME (commands.eval_command)
    name = {f"models/{m}": m for m in p["models"]}.get
    if data is not None and p.get("run"):
        trajectory = [json.loads(line) for line in data.splitlines() if line.strip()]
    elif data is not None:
        out = json.loads(data)
        per_model = out["results"] if "results" in out else [out]  # compare.json, or eval.json of one model
        results = [{"model": name(r["model"], r["model"]), "tasks": [task_summary(t) for t in r["tasks"]]}
                   for r in per_model]
        if "rows" in out:
            comparison = {"base": name(out["base"], out["base"]), "models": [name(m, m) for m in out["models"]],
                          "rows": [{**r, "model": name(r["model"], r["model"])} for r in out["rows"]],
                          "flips": [{**f, "model": name(f["model"], f["model"])} for f in out["flips"]]}
    return EvalResults(run=run_info(state, row), models=p["models"], tasks=p["tasks"], trajectory_of=p.get("run"),
                       results=results, comparison=comparison, trajectory=trajectory,
                       report=data is not None and (run_dir / "report.html").is_file())
