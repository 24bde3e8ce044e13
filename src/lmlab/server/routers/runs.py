"""/api/v1/runs: start (training, text self-play: RL of a trained model into a new one, or a lab experiment:
`lmlab lab facts EXPERIMENT` / `lmlab selfplay azr`), list, detail, metrics, live events (SSE), log, cancel,
resume (training and self-play), restart (a new run of a stopped run's request, where there is nothing to resume),
delete; an experiment's report.html, results.json and plots (report, files)."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Query, Request, Response
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from ..app import StateDep
from ..db import ACTIVE, STOPPED
from ..schemas import ExperimentCreate, MetricsPage, ResumeRequest, Run, RunCreate, RunOverview, SelfPlayCreate
from ..services import (
    event_stream,
    need_run,
    remove_run,
    request_cancel,
    request_resume,
    run_file,
    run_info,
    run_overview,
    sse,
    start_experiment,
    start_run,
    start_selfplay,
)

router = APIRouter()
RunId = Annotated[int, PathParam(ge=1, le=2**62, description="run number")]
SELFPLAY_ERRORS = {400: {"description": "a name that may not become a file name"},
                   404: {"description": "an unknown model"},
                   409: {"description": "a model that is untrained, already exists, or is in use by another run"},
                   422: {"description": "invalid settings, with a one-line reason"}}


@router.post("/runs", tags=["runs"], status_code=201, response_model=Run)
def create_run(state: StateDep, req: RunCreate) -> Run:
    return run_info(state, start_run(state, req))


@router.post("/runs/selfplay", tags=["runs"], status_code=201, response_model=Run, responses=SELFPLAY_ERRORS,
             summary="start text self-play: RL of a trained model against a reward, saved as a new model")
def create_selfplay_run(state: StateDep, req: SelfPlayCreate) -> Run:
    return run_info(state, start_selfplay(state, req))


@router.post("/runs/experiment", tags=["runs"], status_code=201, response_model=Run,
             responses={422: {"description": "an unknown lab or experiment, or bad seeds or workers"}},
             summary="start a lab experiment (lab facts EXPERIMENT, or selfplay azr) into the run directory")
def create_experiment_run(state: StateDep, req: ExperimentCreate) -> Run:
    return run_info(state, start_experiment(state, req))


@router.get("/runs", tags=["runs"], response_model=list[Run])
def list_runs(state: StateDep, model: str | None = Query(None, max_length=100),
              status: str | None = Query(None, max_length=20),
              kind: Literal["train", "selfplay", "experiment", "eval", "quantize", "merge", "tune"] | None = Query(
                  None)) -> list[Run]:
    queue = [r["id"] for r in state.db.queued_runs()]
    rows = state.db.list_runs(model_name=model, status=[status] if status else None, kind=kind)
    clock = state.db.training_clock([r["id"] for r in rows])
    return [run_info(state, r, queue, clock) for r in rows]


@router.get("/runs/{run_id}", tags=["runs"], response_model=Run)
def get_run(state: StateDep, run_id: RunId) -> Run:
    return run_info(state, need_run(state, run_id))


@router.get("/runs/{run_id}/overview", tags=["runs"], response_model=RunOverview,
            summary="the run page: settings and data, samples or sampled completions, output, the command that "
                    "makes it again, the train form's settings to clone it, the machine's load")
def get_run_overview(state: StateDep, run_id: RunId) -> RunOverview:
    return run_overview(state, run_id)


@router.get("/runs/{run_id}/metrics", tags=["runs"], response_model=MetricsPage,
            summary="logged metrics: training (step, tokens, elapsed_s, loss, lr, tokens_per_s; val_loss on eval "
                    "steps) or self-play (step, reward, reward_std, kl, loss, length, wall_s, sample)")
def run_metrics(state: StateDep, run_id: RunId, after_id: int = Query(0, ge=0, le=2**62),
                limit: int = Query(10000, ge=1, le=100000)) -> MetricsPage:
    row = need_run(state, run_id)
    return MetricsPage(run_id=run_id, metrics_epoch=row["metrics_epoch"], step_offset=row["step_offset"] or 0,
                       status=row["status"],
                       metrics=state.db.get_metrics(run_id, after_id, limit))


@router.get("/runs/{run_id}/log", tags=["runs"], summary="the training process's output (last lines)")
def run_log(state: StateDep, run_id: RunId, lines: int = Query(200, ge=1, le=10000)) -> dict:
    need_run(state, run_id)
    try:  # never through a symbolic link (409): a planted log.txt -> /etc/passwd is not served
        text = state.ws.read_bytes(state.ws.run_path(run_id) / "log.txt").decode("utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    return {"run_id": run_id, "lines": text.splitlines()[-lines:]}


@router.get("/runs/{run_id}/events", tags=["runs"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}},
            summary="Server-Sent Events: `metric` per logged step, `status` on change, `reset`, `end`")
async def run_events(state: StateDep, run_id: RunId, request: Request) -> StreamingResponse:
    await run_in_threadpool(need_run, state, run_id)
    poll = state.settings.poll_s

    async def events() -> Any:
        last_id, epoch, last_status, last_beat = 0, None, None, time.monotonic()
        yield "retry: 2000\n\n"
        while True:
            row = await run_in_threadpool(state.db.get_run, run_id)
            if row is None:
                yield sse("end", {"run_id": run_id, "deleted": True})
                return
            if epoch is not None and row["metrics_epoch"] != epoch:
                last_id = 0
                yield sse("reset", {"run_id": run_id})
            epoch = row["metrics_epoch"]
            rows = await run_in_threadpool(state.db.get_metrics, run_id, last_id, 2000)
            for m in rows:
                last_id = m["id"]
                yield sse("metric", m)
            key = (row["status"], row["current_step"], row["updated_at"])
            if key != last_status:
                last_status = key
                info = await run_in_threadpool(run_info, state, row)
                yield sse("status", info.model_dump())
            if row["status"] not in ACTIVE and not rows:
                yield sse("end", {"run_id": run_id, "status": row["status"]})
                return
            if time.monotonic() - last_beat > 15:
                last_beat = time.monotonic()
                yield ": keep-alive\n\n"
            if await request.is_disconnected():
                return
            await asyncio.sleep(poll)

    return event_stream(events())


@router.get("/runs/{run_id}/report", tags=["runs"], response_class=FileResponse,
            responses={200: {"content": {"text/html": {}}}, 404: {"description": "no report (yet)"}},
            summary="a lab experiment's report.html (plots inlined; served with a script-free CSP)")
def run_report(state: StateDep, run_id: RunId) -> Response:
    return run_file(state, run_id, "report.html")


@router.get("/runs/{run_id}/files/{name}", tags=["runs"], response_class=FileResponse,
            responses={200: {"content": {"application/json": {}, "image/png": {}, "text/html": {}}}},
            summary="a file of a lab experiment's run directory: results.json, a .png plot, report.html")
def run_file_endpoint(state: StateDep, run_id: RunId, name: str = PathParam(..., max_length=200)) -> Response:
    return run_file(state, run_id, name)


@router.post("/runs/{run_id}/cancel", tags=["runs"], response_model=Run,
             summary="stop a run: queued ones at once, running ones after a final checkpoint")
def cancel_run(state: StateDep, run_id: RunId) -> Run:
    return run_info(state, request_cancel(state, run_id))


@router.post("/runs/{run_id}/resume", tags=["runs"], response_model=Run,
             summary="continue an interrupted, failed or cancelled run (training or self-play) from its last "
                     "checkpoint; max_steps trains further (self-play: iterations)")
def resume_run(state: StateDep, run_id: RunId, req: ResumeRequest | None = None) -> Run:
    return run_info(state, request_resume(state, run_id, req.max_steps if req else None))


@router.post("/runs/{run_id}/restart", tags=["runs"], status_code=201, response_model=Run,
             responses={409: {"description": "a run that is not stopped, has a checkpoint (resume it), or whose "
                                             "request a new start refuses now (a name taken since, a model in use)"},
                        404: {"description": "an unknown run, or a model, book or dataset it used, gone since"}},
             summary="start again a stopped run that has nothing to resume from (it stopped before its first "
                     "checkpoint, or keeps none): a new run of the same request, checked as a new start is")
def restart_run(state: StateDep, run_id: RunId) -> Run:
    return start_again(state, run_id)


def start_again(state: Any, run_id: int) -> Run:
    """The stopped run's request made again, through the endpoint that made it: every check a new start makes
    (names free, models trained and not in training, books and datasets there, a trained model's consent: a run
    that gave it, new_version, gives it again) is made again, and the new run's lineage is the model's as it is
    now. The stopped run stays as it was."""
    from pydantic import ValidationError

    from ..schemas import EvalCreate, MergeCreate, QuantizeCreate, TuneCreate
    from .evals import create_eval_run
    from .modelpage import create_merge_run, create_quantize_run
    from .tune import create_tune_run

    row = need_run(state, run_id)
    info = run_info(state, row)
    if not info.can_restart:  # not stopped, or stopped with a checkpoint
        why = (f"it has a checkpoint at step {info.checkpoint_step}; resume it instead" if row["status"] in STOPPED
               else f"it is {row['status']}")
        raise HTTPException(409, f"run {run_id} cannot be started again: {why}")
    p, kind, model = row["params"], row["kind"], row["model_name"]

    def request(cls: Any, **extra: Any) -> Any:  # the stored settings the request takes, by name or alias
        names = {f.alias or n for n, f in cls.model_fields.items()}
        return cls.model_validate({**{k: v for k, v in p.items() if k in names and v is not None}, **extra})

    try:
        if kind == "train":
            return run_info(state, start_run(state, request(RunCreate, model=model, books=row["books"],
                                                            init_from_trained=bool(row["init_from_trained"]))))
        if kind == "selfplay":
            return run_info(state, start_selfplay(state, request(SelfPlayCreate, model=model,
                                                                 iterations=row["max_steps"])))
        if kind == "experiment":
            return run_info(state, start_experiment(state, request(ExperimentCreate)))
        if kind == "eval":  # a trajectory recorded its run's model among the models: the request named the run
            return create_eval_run(state, request(EvalCreate, **({"models": []} if p.get("run") else {})))
        if kind == "quantize":
            return create_quantize_run(state, request(QuantizeCreate, model=model))
        if kind == "merge":
            return create_merge_run(state, request(MergeCreate, model=model))
        if kind == "tune":
            return create_tune_run(state, request(TuneCreate, model=model))
    except ValidationError as exc:  # a setting a new request no longer takes (the server changed since)
        raise HTTPException(409, f"run {run_id}'s settings are not a valid request now: "
                                 f"{exc.errors()[0]['msg']}") from None
    raise HTTPException(409, f"run {run_id} is of kind {kind!r}, which is not started again")


@router.delete("/runs/{run_id}", tags=["runs"], status_code=204)
def delete_run(state: StateDep, run_id: RunId) -> Response:
    remove_run(state, run_id)
    return Response(status_code=204)
