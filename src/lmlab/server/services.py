"""The rules behind the API: what a request needs of the workspace (the need_* checks: 404 unknown, 409 in use
or untrained, 422 invalid), starting runs within the memory budget, the API's view of models and runs, uploads,
downloads and generation. Plain functions of the app's state (app.AppState) that raise HTTPException with the
status and the one-line reason the client gets; the routers (routers/) and the seed-compatible endpoints
(routers/seed.py) call the same ones.

Checks that must hold until the change they guard is made (a name still free, a run or book not in use) run
under state.lock from the first check through the database write (see jobs.Supervisor.lock).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from copy import deepcopy
from typing import Any
from urllib.parse import quote

from fastapi import HTTPException, Response, UploadFile
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from ..lab.interp.steer import Direction, Steering
from ..lab.selfplay.text import SETTING_FLAGS, TextSelfPlayConfig, encode_prompts, file_sha256, saved_run
from ..models import GenerationConfig, ModelConfig, generate, stream
from ..models.io import WEIGHTS
from ..models.quant import QUANTIZATION
from ..tokenizers import Tokenizer
from ..train import TrainConfig, checkpoint_step, checkpoints, latest_checkpoint
from ..train.checkpoint import RUN_LOCK, lock_run, unlock_run
from ..train.progress import PHASE_FILE, PHASES, SAMPLES_FILE
from .app import AppState, Problem
from .commands import again_command
from .db import ACTIVE, STOPPED
from .extract import Refused, extract
from .inference import NotTrained
from .schemas import (
    SERVER_REWARDS,
    Estimate,
    ExperimentCreate,
    GenerateRequest,
    Generation,
    ModelInfo,
    ModelSpec,
    Run,
    RunCreate,
    RunOverview,
    SelfPlayCreate,
    SteeringDirection,
    Version,
)
from .workspace import (
    LinkError,
    ZipSink,
    book_text,
    check_book_name,
    check_name,
    remove_entry,
    snapshot_checkpoint,
    snapshot_dir,
    zip_model_dir,
)

# ---- models -----------------------------------------------------------------------------------------

def human_bytes(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def over_budget(est: Estimate) -> Problem:
    """The refusal of a model or run whose training would not fit the server's memory budget (est.reason)."""
    return Problem(422, "memory_over_budget", est.reason or "", batch=est.batch_size, tokens=est.seq_len,
                   need=human_bytes(est.training_bytes), budget=human_bytes(est.memory_budget_bytes))


def bad_settings(why: Exception | str) -> Problem:
    """The 422 of settings that a config's own checks refuse: their sentence (the command line's too) is the
    reason, which the web app says inside a sentence of its language."""
    return Problem(422, "settings_invalid", str(why), reason=str(why))


def build_config(spec: ModelSpec) -> ModelConfig:
    """ModelConfig from a spec; HTTP 422 with the config's own message when it is invalid."""
    fields = ("family", "n_layer", "n_head", "n_kv_head", "n_embd", "block_size", "intermediate_size", "dropout")
    overrides = {k: getattr(spec, k) for k in fields if getattr(spec, k) is not None}
    if spec.vocab_size is not None:
        overrides["vocab_size"] = spec.vocab_size
    try:
        if spec.preset:
            cfg = ModelConfig.preset(spec.preset, **overrides)
        else:
            cfg = ModelConfig(**overrides)
        if spec.tokenizer_kind == "bpe" and cfg.vocab_size < 260:
            raise ValueError(f"vocab_size ({cfg.vocab_size}) must be >= 260 for a bpe tokenizer "
                             "(4 specials + 256 byte tokens); use char or word for smaller vocabularies")
    except (ValueError, TypeError) as exc:
        raise Problem(422, "model_config_invalid", str(exc), reason=str(exc)) from None
    return cfg


def estimate(cfg: ModelConfig, batch_size: int, budget: int, seq_len: int | None = None) -> Estimate:
    T = min(seq_len or cfg.block_size, cfg.block_size)
    train = cfg.memory_estimate(batch_size, T, training=True)["total"]
    infer = cfg.memory_estimate(1, T, training=False)["total"]
    reason = None
    if train > budget:
        reason = (f"training this model with batch {batch_size} x {T} tokens needs ~{human_bytes(train)} (weights, "
                  f"gradients, AdamW state and activations) but the memory budget is {human_bytes(budget)}; "
                  "use fewer layers, a smaller width or context, or a smaller batch (the budget is set where the "
                  "server is started)")  # said to web users too: no command-line flags
    return Estimate(config=cfg.to_dict(), parameters=cfg.num_parameters(), inference_bytes=infer,
                    training_bytes=train, batch_size=batch_size, seq_len=T, memory_budget_bytes=budget,
                    fits=reason is None, reason=reason)


def model_info(state: AppState, row: dict[str, Any], active: list[dict[str, Any]] | None = None) -> ModelInfo:
    """The API view of a model row; `active` (the queued and running runs) is fetched when not given."""
    name = row["name"]
    cfg = ModelConfig.from_dict(row["config"])
    active = state.db.list_runs(status=ACTIVE) if active is None else active
    training = [r["id"] for r in active if r["kind"] == "train" and r["model_name"] == name]
    readers = [r["id"] for r in active
               if r["kind"] in MAKERS and name in (r["model_name"], r["params"].get("judge"))]
    try:
        path = state.ws.model_path(name)
        trained, problem = (path / "model.safetensors").is_file(), None
        quantized = (path / QUANTIZATION).is_file()  # export_response's rule: the web app offers no export of it
    except LinkError as exc:  # listed with the reason; the other models list as usual
        trained, quantized, problem = False, False, str(exc)
    return ModelInfo(name=name, family=cfg.family, preset=row["preset"], config=cfg.to_dict(),
                     parameters=cfg.num_parameters(), tokenizer_kind=row["tokenizer_kind"],
                     vocab_size=row["tokenizer_vocab"], trained=trained, quantized=quantized,
                     trained_run_id=row["trained_run_id"],
                     trained_steps=row["trained_steps"], active_run_id=training[0] if training else None,
                     selfplay_run_ids=readers, origin=row["origin"], lineage=lineage(state, row["trained_run_id"]),
                     created_at=row["created_at"],
                     updated_at=row["updated_at"], problem=problem)


def lineage(state: AppState, run_id: int | None) -> list[int]:
    """run_id, the run it continued from, and so on (a deleted run ends the chain)."""
    chain: list[int] = []
    while run_id is not None and run_id not in chain and (run := state.db.get_run(run_id)) is not None:
        chain.append(run_id)
        run_id = run["parent_run_id"]
    return chain


# runs that make a new model (params.new_model) from a trained one, and what their process is called
MAKERS = {"selfplay": "self-play", "tune": "fine-tuning"}


def made_by(run: dict[str, Any], model: dict[str, Any]) -> bool:
    """Whether `run` trains `model` (a models row): training of it, or the self-play that created it by saving
    its policy under its name. The server writes a self-play run's row for the last time once it has created
    the model (jobs.Supervisor._finish); a model created after that is another of the same name, made after
    the run's was deleted, and the run's policy is no version of it."""
    if run["kind"] == "train":
        return run["model_name"] == model["name"]
    return (run["kind"] in MAKERS and run["params"].get("new_model") == model["name"]
            and run["status"] == "completed" and model["created_at"] <= run["updated_at"])


def model_versions(state: AppState, name: str) -> list[Version]:
    """Every version of the model that its runs' folders still hold, oldest first: each completed run's final
    model and each checkpoint (of training, or of the self-play that made the model)."""
    row = need_model(state, name)
    out = []
    for run in state.db.list_runs(newest_first=False):
        if not made_by(run, row):
            continue
        try:
            run_dir = state.ws.run_dir(run["id"])
        except LinkError:
            continue
        offset = run["step_offset"] or 0
        found = [(checkpoint_step(c), c) for c in checkpoints(run_dir)]
        if run["status"] == "completed":
            found.append((None, run_dir / "final"))
        for step, path in found:
            try:
                created = (path / WEIGHTS).stat().st_mtime
                steps = step if step is not None else json.loads((path / "training.json").read_text())["steps"]
            except (OSError, ValueError, KeyError):  # pruned meanwhile, or not a whole model
                continue
            out.append(Version(run=run["id"], kind=run["kind"], step=step, steps=offset + steps, created_at=created,
                               current=step is None and run["id"] == row["trained_run_id"]))
    return out


def version_source(state: AppState, name: str, run_id: int | None,
                   step: int | None) -> tuple[Any, Callable[[Any, Any], Any], str]:
    """Where a version of the model is and how to snapshot it as a model directory, and its name for files:
    the model's current directory (no run), run `run_id`'s final model, or its checkpoint at `step`. 404 for
    a run that did not make this model or a version its folder no longer holds."""
    row = need_model(state, name)
    if run_id is None:
        if step is not None:
            raise HTTPException(422, "step needs run: the run whose checkpoint it is")
        return state.ws.model_path(name), snapshot_dir, name
    run = need_run(state, run_id)
    if not made_by(run, row):
        raise HTTPException(404, f"run {run_id} did not train model {name!r}")
    try:
        run_dir = state.ws.run_dir(run_id)
    except LinkError as exc:
        raise HTTPException(409, str(exc)) from None
    if step is None:
        if run["status"] != "completed" or not (run_dir / "final" / WEIGHTS).is_file():
            raise HTTPException(404, f"run {run_id} has no final model (it is {run['status']}); choose one of its "
                                     "checkpoints")
        return run_dir / "final", snapshot_dir, f"{name}-run{run_id}"
    ckpt = run_dir / "checkpoints" / f"step-{step}"
    if not (ckpt / WEIGHTS).is_file():
        have = ", ".join(str(checkpoint_step(c)) for c in checkpoints(run_dir))
        raise Problem(404, "checkpoint_gone", f"run {run_id} has no checkpoint at step {step}" +
                      (f"; it has {have}" if have else ""), id=run_id, step=step)
    return ckpt, snapshot_checkpoint, f"{name}-run{run_id}-step{step}"


def need_model(state: AppState, name: str) -> dict[str, Any]:
    name = check_name(name, "model name")  # NFC: "café" typed as e + U+0301 is the same model
    row = state.db.get_model(name)
    if row is None:
        raise Problem(404, "model_not_found", f"model {name!r} not found", name=name)
    return row


def make_model(state: AppState, name: str, spec: ModelSpec) -> dict[str, Any]:
    """Create the untrained model `name` from `spec` (the API's POST /models and the AZR Model Trainer app's
    /create_model): 422 for an invalid config or one whose training at batch 1 exceeds the memory budget, 409
    for a name that is taken; then config.json in a fresh folder and the index row, which is returned."""
    name = check_name(name, "model name")
    cfg = build_config(spec)
    est = estimate(cfg, 1, state.memory_budget)
    if not est.fits:
        raise over_budget(est)
    with state.lock:  # from the checks through add_model: see Supervisor.lock
        need_free_model_name(state, name)
        cfg.save(state.ws.model_path(name) / "config.json")
        return state.db.add_model(name, cfg.to_dict(), spec.preset, spec.tokenizer_kind, cfg.vocab_size)


def remove_model(state: AppState, name: str) -> None:
    """The model, its folder and its runs; 409 while a run uses it. A run that started from it and made another
    model that is still there (a fine-tuning, a quantization, a merge) is that model's history, its versions and
    checkpoints: it stays."""
    with state.lock:  # a run queued meanwhile must not lose its model
        need_model(state, name)
        need_unused(state, name)
        keep, gone, history = [], [], []
        for run in state.db.list_runs(model_name=name):
            made = run["params"].get("new_model")
            if made and made != name and state.db.get_model(made) is not None:
                keep.append(run["id"])
            else:
                gone.append(run["id"])
        for run in state.db.list_runs():  # runs that made it from a model deleted since (kept as its history)
            if run["params"].get("new_model") == name and run["model_name"] != name \
                    and state.db.get_model(run["model_name"]) is None:
                history.append(run["id"])
        with held_runs(state, gone + history):
            for run_id in gone + history:
                remove_entry(state.ws.run_path(run_id))
            for run_id in history:
                state.db.delete_run(run_id)
            path = state.ws.models / check_name(name, "model name")  # a link (an unusable model) goes, not its target
            state.cache.forget(path)
            remove_entry(path)
            state.db.delete_model(name, keep_runs=keep)


@contextlib.contextmanager
def held_runs(state: AppState, run_ids: list[int]) -> Iterator[None]:
    """The run folders held (RUN/.lock, train/checkpoint.py lock_run) while they are deleted: 409 while another
    process trains one. The database knows only the runs the server started: a stopped run resumed from a
    terminal (`lmlab train --out W/runs/run-N --resume`) was deleted under it, checkpoints and all."""
    keys = []
    try:
        for run_id in run_ids:
            path = state.ws.run_path(run_id)
            # a link goes as a link: nothing opened through it, nor through a .lock that is one (no process can
            # hold such a lock: lock_run refuses it)
            if path.is_dir() and not path.is_symlink() and not (path / RUN_LOCK).is_symlink():
                try:
                    keys.append(lock_run(path))
                except ValueError:
                    raise Problem(409, "run_training_elsewhere", f"run {run_id} is being trained by another process "
                                  "(lmlab train --resume in a terminal?); stop it first", id=run_id) from None
        yield
    finally:
        for key in keys:
            unlock_run(key)


def need_free_model_name(state: AppState, name: str, hint: str = "") -> None:
    """409 unless `name` can become a new model now: no model of that name, none whose name differs only in
    letter case (on macOS and Windows the two would share one folder), and no active run that will write it.
    Called under state.lock, through the add_model or add_run that takes the name."""
    if state.db.get_model(name) is not None:
        raise Problem(409, "model_name_taken", f"a model named {name!r} already exists{hint}", name=name)
    active = state.db.list_runs(status=ACTIVE)
    taken = [m["name"] for m in state.db.list_models()]
    taken += [r["params"]["new_model"] for r in active if r["params"].get("new_model")]
    twin = next((t for t in taken if t != name and t.casefold() == name.casefold()), None)
    if twin is not None:
        raise Problem(409, "name_case_twin", f"{twin!r} is taken, and names that differ only in letter case would "
                      f"share one folder on some systems{hint}", name=name, twin=twin)
    need_unused(state, name, active=active)  # the name a running self-play will save its model under
    path = state.ws.model_path(name)
    if path.exists() or path.is_symlink():  # a finished run would not overwrite it, a new model must not delete it
        raise Problem(409, "model_folder_exists", f"models/{name}/ exists in the workspace though no model of that "
                      f"name is indexed (a server started again indexes it); remove it{hint}", name=name)


def need_trained(state: AppState, name: str, role: str) -> Any:
    """The directory of a workspace model that has weights and a tokenizer (404 unknown, 409 untrained)."""
    need_model(state, name)
    path = state.ws.model_path(name)
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise Problem(409, "model_untrained", f"model {name!r} has not been trained yet: {role} must be a trained "
                      "model", name=name)
    return path


def runs_using(state: AppState, name: str, active: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Queued or running runs (`active`, fetched when not given) that read or write the model `name`: its
    training, self-play from it or judged by it, self-play that will save its policy under that name,
    evaluations of it, and merges that read it (as a parent or as the base)."""
    active = state.db.list_runs(status=ACTIVE) if active is None else active
    return [r for r in active if name in (r["model_name"], r["params"].get("judge"), r["params"].get("new_model"),
                                          *r["params"].get("models", ()), *r["params"].get("others", ()),
                                          r["params"].get("base"))]


def need_unused(state: AppState, name: str, keep: Callable[[dict[str, Any]], bool] = lambda r: True,
                active: list[dict[str, Any]] | None = None, code: int = 409) -> None:
    """`code` with busy_problem if a run in runs_using(name) that `keep` selects is active."""
    busy = [r for r in runs_using(state, name, active) if keep(r)]
    if busy:
        raise busy_problem(code, name, busy[0])


def busy_problem(code: int, name: str, run: dict[str, Any]) -> Problem:
    """`name` is read or written by the active `run`: in words, and by key for the web app's language."""
    if run["kind"] in ("train", "eval"):
        doing = "already training" if run["kind"] == "train" else "being evaluated"
        return Problem(code, "model_training" if run["kind"] == "train" else "model_evaluated",
                       f"model {name!r} is {doing} (run {run['id']}); cancel that run or wait for it",
                       name=name, run=run["id"])
    params = run["params"]
    role = ("the starting point" if run["model_name"] == name else "the judge" if params.get("judge") == name
            else "a parent" if name in params.get("others", ()) else "the base" if params.get("base") == name
            else "the name of the model being made")
    kind = {**MAKERS, "quantize": "quantization", "merge": "merge"}.get(run["kind"], run["kind"])
    return Problem(code, "model_in_use", f"model {name!r} is {role} of {kind} run {run['id']}; cancel that run or "
                   "wait for it", name=name, run=run["id"])


# ---- books ------------------------------------------------------------------------------------------

def need_book(state: AppState, name: str) -> dict[str, Any]:
    name = check_book_name(name)  # NFC, as need_model
    row = state.db.get_book(name)
    if row is None or not state.ws.book_path(name).is_file():
        raise Problem(404, "book_not_found", f"book {name!r} not found", name=name)
    return row


def need_book_unused(state: AppState, name: str, code: int = 409) -> None:
    users = [r["id"] for r in state.db.list_runs(status=ACTIVE)  # a gptq quantization reads its calibration books
             if name in r["books"] or name in r["params"].get("calibration", ())]
    if users:
        raise Problem(code, "book_in_use", f"book {name!r} is in use by run(s) {users}", name=name,
                      runs=", ".join(map(str, users)))


def book_full_text(state: AppState, name: str) -> tuple[dict[str, Any], str]:
    """The book's row and its whole stored text (extracted at upload, in a child process with limits)."""
    row = need_book(state, name)
    header, _ = need_book_text(state, name)
    return row, need_book_text(state, name, max(1, header["chars"]))[1]


def book_stats(header: dict[str, Any]) -> dict[str, int]:
    return {k: header[k] for k in ("chars", "words", "lines", "unique_chars")}


def need_book_text(state: AppState, name: str, chars: int = 0) -> tuple[dict[str, Any], str]:
    """The stored text (see book_text); 409 if the book's file can no longer be read as a book."""
    try:
        return book_text(state.ws, name, chars, **state.extract_limits)
    except Refused as exc:  # read again, and now unreadable
        raise Problem(409, exc.key, str(exc), **exc.params) from None
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


def save_upload(state: AppState, upload: UploadFile, *, overwrite: bool, busy_code: int = 409) -> dict[str, Any]:
    """Validate and store an uploaded book: safe name, size limit, not empty, decodable text, and not in use
    by a queued or running run when it replaces a book (`busy_code`, as delete_book answers). Its text is read
    once, in a child process with limits (extract.py), and stored beside it for detail, preview and reindex."""
    name = check_book_name(upload.filename or "")
    target = state.ws.book_path(name)

    def need_new() -> None:
        if target.exists() and not overwrite:
            raise Problem(409, "book_exists", f"a book named {name!r} already exists; delete it first or upload "
                          "with overwrite=true", name=name)

    need_new()  # before the reading; again below, under the lock (another upload of the name may end first)
    need_book_unused(state, name, busy_code)
    tmp = state.ws.tmp / f"upload-{uuid.uuid4().hex}{target.suffix.lower()}"
    text_tmp = state.ws.tmp / f"text-{uuid.uuid4().hex}"
    try:
        size = receive_upload(state, upload, name, tmp)
        try:
            header = extract(tmp, text_tmp, name, **state.extract_limits)
        except Refused as exc:
            raise Problem(exc.status, exc.key, str(exc), **exc.params) from None
        with state.lock:  # a run queued meanwhile must not have its book replaced under it
            need_new()
            need_book_unused(state, name, busy_code)
            os.replace(text_tmp, state.ws.text_path(name))
            os.replace(tmp, target)
            row = state.db.add_book(name, size, header["chars"], header["encoding"])
    finally:
        tmp.unlink(missing_ok=True)
        text_tmp.unlink(missing_ok=True)
    return {**row, **book_stats(header)}


def receive_upload(state: AppState, upload: UploadFile, name: str, tmp: Any) -> int:
    """The uploaded file written to `tmp` (in the workspace's tmp/; the caller removes it), and its size: 413
    over the server's upload limit, 400 when it is empty."""
    limit, size = state.settings.max_upload_bytes, 0
    with open(tmp, "wb") as out:
        while block := upload.file.read(1 << 20):
            size += len(block)
            if size > limit:
                # said to whoever uploads, often in a browser: no command-line flags
                mib = f"{limit / 2**20:g}"
                raise Problem(413, "upload_too_large", f"{name} is larger than this server's upload limit of {mib} "
                              "MiB", name=name, limit=mib)
            out.write(block)
    if size == 0:
        raise Problem(400, "file_empty", f"{name} is empty", name=name)
    return size


def remove_book(state: AppState, name: str) -> None:
    with state.lock:  # a run queued meanwhile must not lose its book
        need_book(state, name)
        need_book_unused(state, name)
        state.ws.book_path(name).unlink(missing_ok=True)
        state.ws.text_path(name).unlink(missing_ok=True)
        state.db.delete_book(name)


# ---- runs -------------------------------------------------------------------------------------------

def run_info(state: AppState, row: dict[str, Any], queue: list[int] | None = None,
             clock: dict[int, float] | None = None) -> Run:
    """The API view of a run row; `queue` (the queued runs' ids) and `clock` (db.training_clock of the runs
    listed) are fetched when not given."""
    run_dir = state.ws.run_path(row["id"])
    ckpt = None if run_dir.is_symlink() else latest_checkpoint(run_dir)  # resuming through a link is refused
    ckpt_step = checkpoint_step(ckpt) if ckpt else None
    progress = None
    if row["max_steps"]:
        progress = min(1.0, row["current_step"] / row["max_steps"])
    if queue is None and row["status"] == "queued":
        queue = [r["id"] for r in state.db.queued_runs()]
    return Run(
        id=row["id"], kind=row["kind"], model=row["model_name"], books=row["books"], status=row["status"],
        params=row["params"],
        init_from_trained=bool(row["init_from_trained"]), current_step=row["current_step"],
        max_steps=row["max_steps"], progress=progress, tokens=row["tokens"], last_loss=row["last_loss"],
        last_val_loss=row["last_val_loss"], best_val_loss=row["best_val_loss"], lr=row["lr"],
        tokens_per_s=row["tokens_per_s"], last_reward=row["last_reward"], last_kl=row["last_kl"],
        parent_run_id=row["parent_run_id"], step_offset=row["step_offset"] or 0, checkpoint_step=ckpt_step,
        can_resume=(row["status"] in STOPPED and ckpt_step is not None
                    and row["kind"] not in ("experiment", "eval")),  # these keep no checkpoints of their own
        # nothing to resume from: Start again makes a new run of the same request (routers/runs.py, start_again)
        can_restart=row["status"] in STOPPED and ckpt_step is None,
        resumed_from_step=row["resumed_from_step"], launches=row["launches"],
        cancel_requested=bool(row["cancel_requested"]), pid=row["pid"], exit_code=row["exit_code"],
        error=row["error"], stop_reason=row["stop_reason"], metrics_epoch=row["metrics_epoch"],
        queue_position=queue.index(row["id"]) if queue and row["id"] in queue else None,
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        updated_at=row["updated_at"], **run_timing(state, row, clock))


def run_timing(state: AppState, row: dict[str, Any], clock: dict[int, float] | None) -> dict[str, Any]:
    """phase, elapsed_s, eta_s and tokens_per_s_mean of a run (schemas.Run says what each is)."""
    out: dict[str, Any] = {}
    if row["started_at"] and row["status"] not in ("queued",):
        out["elapsed_s"] = round((row["finished_at"] or time.time()) - row["started_at"], 1)
    trained = (state.db.training_clock([row["id"]]) if clock is None else clock).get(row["id"])
    if trained and row["tokens"]:
        out["tokens_per_s_mean"] = round(row["tokens"] / trained, 1)
    if row["status"] != "running":
        return out
    out["phase"] = run_phase(state, row)
    # the pace of this launch: a resumed run's steps before it came with its checkpoint
    done = row["current_step"] - (row["resumed_from_step"] or 0)
    if row["max_steps"] and done > 0 and out.get("elapsed_s"):
        pace = (trained / row["current_step"]) if trained and row["kind"] == "train" else out["elapsed_s"] / done
        out["eta_s"] = round(max(0, row["max_steps"] - row["current_step"]) * pace, 1)
    return out


def run_phase(state: AppState, row: dict[str, Any]) -> str:
    """What a running run is doing: a training run's RUN_DIR/phase.json when this launch wrote it, else
    starting; self-play trains once it has logged; an experiment is running (its log says how far)."""
    if row["kind"] in ("experiment", "eval", "quantize", "merge"):
        return "running"
    if row["kind"] == "selfplay":
        return "training" if row["current_step"] > (row["resumed_from_step"] or 0) else "starting"
    try:
        phase = json.loads(state.ws.read_bytes(state.ws.run_path(row["id"]) / PHASE_FILE))
        if phase["time"] >= row["started_at"] and phase["phase"] in PHASES:  # not an earlier launch's
            return phase["phase"]
    except (OSError, LinkError, ValueError, KeyError, TypeError):
        pass
    return "starting"


def need_run(state: AppState, run_id: int) -> dict[str, Any]:
    row = state.db.get_run(run_id)
    if row is None:
        raise Problem(404, "run_not_found", f"run {run_id} not found", id=run_id)
    return row


def run_overview(state: AppState, run_id: int) -> RunOverview:
    """The run page: the run, its settings and data as it started, samples over time (training) or sampled
    completions with their rewards (self-play), the last lines of its output, the command that makes it again,
    the train form's settings to clone it, and the machine's load."""
    row = need_run(state, run_id)
    run_dir = state.ws.run_path(run_id)

    def lines(name: str, keep: int) -> list[str]:
        try:  # never through a symbolic link
            return state.ws.read_bytes(run_dir / name).decode("utf-8", errors="replace").splitlines()[-keep:]
        except (OSError, LinkError):
            return []

    def parsed(name: str, keep: int) -> list[Any]:
        out = []
        for line in lines(name, keep):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line being written
        return out

    config = None
    if row["kind"] == "train":
        try:
            config = json.loads(state.ws.read_bytes(run_dir / "config.json"))
        except (OSError, LinkError, ValueError):  # not written yet, or not JSON
            pass
    completions = [{k: m.get(k) for k in ("step", "reward", "kl", "sample")}
                   for m in state.db.get_metrics(run_id) if "sample" in m][-50:] if row["kind"] == "selfplay" else []
    try:
        command = again_command(row, state.ws, state.db.get_model)
    except ValueError:  # its model is gone
        command = None
    clone = ({"model": row["model_name"], "books": row["books"], "init_from_trained": bool(row["init_from_trained"]),
              **row["params"]} if row["kind"] == "train" else None)
    lab = trainings(run_dir) if row["kind"] == "experiment" and not run_dir.is_symlink() else None
    return RunOverview(run=run_info(state, row), config=config, samples=parsed(SAMPLES_FILE, 50),
                       completions=completions, log_tail=lines("log.txt", 8), command=command, clone=clone,
                       trainings=lab,
                       load=machine_load(row["pid"] if row["status"] == "running" else None))


def trainings(run_dir: Any) -> dict[str, int]:
    """The model trainings inside an experiment's folder: folders with a metrics.jsonl (started) and those with
    a final/ model too (finished). Symbolic links are not followed."""
    started = finished = 0
    for folder, dirs, files in os.walk(run_dir):
        if "metrics.jsonl" in files and folder != str(run_dir):
            started += 1
            finished += "final" in dirs
    return {"started": started, "finished": finished}


def machine_load(pid: int | None) -> dict[str, Any]:
    """The server machine's load average, CPUs and memory (Linux /proc; None where absent), and the resident
    memory of the process `pid`."""
    def proc_kib(path: str, key: str) -> int | None:
        try:
            for line in open(path, encoding="ascii"):
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            pass
        return None

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"load_1m": load, "cpus": os.cpu_count(), "memory_total_bytes": proc_kib("/proc/meminfo", "MemTotal"),
            "memory_available_bytes": proc_kib("/proc/meminfo", "MemAvailable"),
            "process_rss_bytes": proc_kib(f"/proc/{pid}/status", "VmRSS") if pid else None}


def default_params(req: RunCreate) -> dict[str, Any]:
    """TrainConfig fields for a run: what was given, plus defaults scaled to max_steps."""
    n = req.max_steps
    params = req.model_dump(exclude={"model", "books", "init_from_trained", "new_version", "val_fraction"})
    if req.new_version:  # the request's consent to replace trained weights, which starting it again gives again
        params["new_version"] = True
    if params["warmup_steps"] is None:
        params["warmup_steps"] = min(100, n // 10)
    if params["eval_every"] is None:
        params["eval_every"] = max(1, min(500, n // 10))
    if params["save_every"] is None:
        params["save_every"] = max(1, min(1000, n // 5))
    if params["log_every"] is None:
        params["log_every"] = max(1, min(10, n // 100))
    return {k: v for k, v in params.items() if v is not None}


def devices() -> list[str]:
    """The devices a training run may ask for here: cuda only where the server's torch finds a GPU (its runs
    inherit its environment). Asked of the web app's form too (GET /info), which offers no other."""
    import torch
    return ["auto", "cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def start_run(state: AppState, req: RunCreate) -> dict[str, Any]:
    """Validate a run request against the model, the books and the memory budget, then queue it; under the
    lock from the first check through add_run, so two requests cannot both pass (see Supervisor.lock)."""
    with state.lock:
        return _start_run(state, req)


def _start_run(state: AppState, req: RunCreate) -> dict[str, Any]:
    model = need_model(state, req.model)
    for book in req.books:
        need_book(state, book)
    if len(set(req.books)) != len(req.books):
        raise HTTPException(422, "a book is listed twice")
    need_unused(state, req.model)
    trained = (state.ws.model_path(req.model) / WEIGHTS).is_file()
    if req.init_from_trained and not trained:
        raise HTTPException(409, f"model {req.model!r} has no trained weights to continue from")
    params = default_params(req)
    if req.val_fraction is not None:
        params["val_fraction"] = req.val_fraction
    try:
        TrainConfig.from_dict({k: v for k, v in params.items() if k not in ("val_fraction", "new_version")})
    except ValueError as exc:
        raise bad_settings(exc) from None
    if req.device not in devices():  # the run would fail at its first step, after its tokenizer and data
        raise Problem(422, "device_unavailable", f"device {req.device!r} is not available on this server (torch "
                      "finds no CUDA GPU); choose auto or cpu", device=req.device)
    cfg = ModelConfig.from_dict(model["config"])
    if req.seq_len and req.seq_len > cfg.block_size:
        raise Problem(422, "seq_len_over_context", f"seq_len ({req.seq_len}) exceeds the model's context "
                      f"({cfg.block_size})", seq_len=req.seq_len, block=cfg.block_size)
    est = estimate(cfg, req.batch_size, state.memory_budget, req.seq_len)
    if not est.fits:
        raise over_budget(est)
    # asked last, of a request that is otherwise valid: a new version from scratch, or continue
    if trained and not req.init_from_trained and not req.new_version:
        by = f" (run {model['trained_run_id']}, {model['trained_steps']} steps)" if model["trained_run_id"] else ""
        raise Problem(409, "model_trained", f"model {req.model!r} already has trained weights{by}; continue from "
                      "them (init_from_trained) or train a new version from scratch (new_version): either way the "
                      "earlier version stays downloadable", name=req.model)
    parent = (model["trained_run_id"], model["trained_steps"] or 0) if req.init_from_trained else (None, None)
    run = state.db.add_run(req.model, list(req.books), params, req.init_from_trained, req.max_steps,
                           parent_run_id=parent[0], step_offset=parent[1])
    state.supervisor.submit(run["id"])
    return run


def selfplay_memory(policy: ModelConfig, batch_size: int, seq_len: int,
                    judge: ModelConfig | None = None) -> dict[str, int]:
    """Rough peak bytes of a self-play update, by part. policy: its training, as `estimate` counts it
    (weights, gradients, AdamW state, activations). reference: the frozen copy of the starting model that
    the KL is taken to, its weights plus one forward over the same batch, whose fp32 logits (B, T, V) are
    held twice (the logits and their log_softmax, models.scoring.token_logprobs). judge (reward perplexity): its
    weights plus such a forward over up to its context per completion, since it re-tokenises the text
    with its own tokenizer and the length in its tokens is not known before."""
    def frozen(cfg: ModelConfig, tokens: int) -> int:  # fp32 weights + a forward's logits, held twice
        return cfg.num_parameters() * 4 + 2 * batch_size * tokens * cfg.vocab_size * 4

    T = min(seq_len, policy.block_size)
    parts = {"policy": policy.memory_estimate(batch_size, T, training=True)["total"], "reference": frozen(policy, T)}
    if judge is not None:
        parts["judge"] = frozen(judge, judge.block_size)
    parts["total"] = sum(parts.values())
    return parts


def start_selfplay(state: AppState, req: SelfPlayCreate) -> dict[str, Any]:
    """Validate a self-play request against the workspace and the memory budget, then queue it; under the
    lock from the first check through add_run, so two requests cannot both pass (see Supervisor.lock)."""
    if req.reward == "file":
        raise HTTPException(422, "reward 'file' runs your own Python function, and the server does not execute "
                                 "user code; use seed, repetition or perplexity here, or run `lmlab selfplay "
                                 "text --reward file` on your own machine")
    if req.reward not in SERVER_REWARDS:
        raise HTTPException(422, f"reward {req.reward!r} must be one of {', '.join(SERVER_REWARDS)}")
    if req.reward == "perplexity" and req.judge is None:
        raise HTTPException(422, "reward 'perplexity' needs a judge: another trained model of the workspace")
    if req.reward != "perplexity" and req.judge is not None:
        raise HTTPException(422, f"a judge is only used by reward 'perplexity', not {req.reward!r}")
    new = check_name(req.new_model, "new model name")
    with state.lock:
        return _start_selfplay(state, req, new)


def need_selfplay_models(state: AppState, model: str, judge: str | None, new: str, resuming: bool = False,
                         role: str = "the model self-play starts from") -> tuple[Any, Any]:
    """What a self-play run needs to start or resume: its starting model and judge trained and not training
    (self-play runs may share them: they only read them), and the name of the model it makes free. Returns the
    directories of the starting model and the judge (None without one). Called under state.lock."""
    path = need_trained(state, model, role)
    judge_path = need_trained(state, judge, "the judge") if judge is not None else None
    try:
        need_free_model_name(state, new, "; resuming this run saves its policy under that name" if resuming else
                             "; choose another name for the new model")
    except Problem as exc:  # the web app's words for it: resuming has no name to choose
        if not resuming or exc.key != "model_name_taken":
            raise
        raise Problem(409, "resume_name_taken", exc.detail, name=new) from None
    active = state.db.list_runs(status=ACTIVE)
    for name in filter(None, (model, judge)):
        need_unused(state, name, lambda r: r["kind"] == "train", active)
    return path, judge_path


def _start_selfplay(state: AppState, req: SelfPlayCreate, new: str) -> dict[str, Any]:
    path, judge_path = need_selfplay_models(state, req.model, req.judge, new)
    settings = req.model_dump(include=set(SETTING_FLAGS))
    try:
        TextSelfPlayConfig(reward=req.reward, **settings)
        cfg = ModelConfig.load(path / "config.json")
        judge_cfg = ModelConfig.load(judge_path / "config.json") if judge_path else None
        prompts = encode_prompts(Tokenizer.load(path / "tokenizer.json"), req.prompts or [""],
                                 req.max_new_tokens, cfg.block_size)
    except ValueError as exc:
        raise bad_settings(exc) from None
    batch, longest = req.group_size * req.prompts_per_iteration, max(map(len, prompts)) + req.max_new_tokens
    mem, budget = selfplay_memory(cfg, batch, longest, judge_cfg), state.memory_budget
    if mem["total"] > budget:
        judged = (f"; the judge {req.judge!r} ~{human_bytes(mem['judge'])}: its weights and logits over up to its "
                  f"context of {judge_cfg.block_size} tokens per completion" if judge_cfg else "")
        raise Problem(422, "selfplay_over_budget",
                      f"self-play with {batch} completions x {longest} tokens per update needs "
                      f"~{human_bytes(mem['total'])} (the policy's training ~{human_bytes(mem['policy'])}: weights, "
                      "gradients, AdamW state and activations; the frozen reference copy "
                      f"~{human_bytes(mem['reference'])}: its weights and logits{judged}) but the memory budget is "
                      f"{human_bytes(budget)}; use a smaller group_size, prompts_per_iteration or "
                      f"max_new_tokens{', a smaller judge' if judge_cfg else ''}, or raise --memory-budget-gb",
                      batch=batch, tokens=longest, need=human_bytes(mem["total"]), budget=human_bytes(budget))
    params = {**settings, "reward": req.reward, "judge": req.judge, "prompts": list(req.prompts), "new_model": new}
    start = state.db.get_model(req.model)  # its steps go on from the starting model's
    run = state.db.add_run(req.model, [], params, True, req.iterations, kind="selfplay",
                           parent_run_id=start["trained_run_id"], step_offset=start["trained_steps"] or 0)
    state.supervisor.submit(run["id"])
    return run


def start_experiment(state: AppState, req: ExperimentCreate) -> dict[str, Any]:
    """Queue a lab experiment; the request's own validation is all it needs (it reads no model or book)."""
    params = req.model_dump(exclude_none=True)
    run = state.db.add_run("", [], params, False, None, kind="experiment")
    state.supervisor.submit(run["id"])
    return run


def request_cancel(state: AppState, run_id: int) -> dict[str, Any]:
    row = need_run(state, run_id)
    if row["status"] not in ACTIVE:
        raise Problem(409, "run_not_active", f"run {run_id} is {row['status']}, not queued or running", id=run_id)
    return state.supervisor.cancel(run_id) or row


def request_resume(state: AppState, run_id: int, max_steps: int | None) -> dict[str, Any]:
    with state.lock:  # from the check through queueing: see Supervisor.lock
        need_run(state, run_id)
        try:
            return state.supervisor.resume(run_id, max_steps, ready=lambda run: need_resumable_models(state, run))
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None


def need_resumable_models(state: AppState, run: dict[str, Any]) -> None:
    """A resumed run reads and writes models as when it started. Training writes its model when it completes:
    not while self-play reads it or another run trains it. Self-play needs what it needed to start."""
    if run["kind"] == "train":
        need_unused(state, run["model_name"], lambda r: r["id"] != run["id"])
    elif run["kind"] == "tune":  # its process checks the rest: the starting weights (GRPO), its data (a copy)
        need_selfplay_models(state, run["model_name"], None, run["params"]["new_model"], resuming=True,
                             role="the model a fine-tuning run starts from")
    else:
        p = run["params"]
        paths = need_selfplay_models(state, run["model_name"], p.get("judge"), p["new_model"], resuming=True)
        need_same_weights(state, run, paths)


def need_same_weights(state: AppState, run: dict[str, Any], paths: tuple[Any, Any]) -> None:
    """409 if the starting model or judge of a self-play run has other weights than when it started (trained
    again since): the launched process would refuse them (lab/selfplay/text.py, _check_same_run), after the
    run was queued, and the run would still offer Resume."""
    try:
        saved = saved_run(state.ws.run_path(run["id"]))
    except ValueError:
        return  # the process says what is wrong with its folder
    for key, name, path in (("model_sha256", run["model_name"], paths[0]),
                            ("judge_sha256", run["params"].get("judge"), paths[1])):
        if saved.get(key) and path is not None and file_sha256(path / WEIGHTS) != saved[key]:
            raise Problem(409, "resume_weights_changed", f"run {run['id']}: model {name!r} has other weights than "
                          "when this run started (trained since?); a resumed run keeps its starting weights: start "
                          "a new self-play run instead", id=run["id"], name=name)


def remove_run(state: AppState, run_id: int) -> None:
    with state.lock:  # not while it is being resumed
        row = need_run(state, run_id)
        if row["status"] in ACTIVE:
            raise Problem(409, "run_active", f"run {run_id} is {row['status']}; cancel it first", id=run_id)
        readers = [r["id"] for r in state.db.list_runs(status=ACTIVE, kind="eval") if r["params"].get("run") == run_id]
        if readers:
            raise Problem(409, "run_checkpoints_evaluated", f"run {run_id}'s checkpoints are being evaluated (run "
                          f"{readers[0]}); cancel that run or wait for it", id=run_id, run=readers[0])
        with held_runs(state, [run_id]):
            remove_entry(state.ws.run_path(run_id))  # a symbolic link: the link, not where it points
            state.db.delete_run(run_id)


# What an experiment's run directory may serve: plain names, no dot first, of the kinds the labs write.
RUN_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(png|json|html)$")
RUN_FILE_TYPES = {"png": "image/png", "json": "application/json", "html": "text/html; charset=utf-8"}
# report.html is generated content (plot captions, claims, settings): no scripts, no requests out, its PNGs
# inlined as data: URIs (lab/*/report.py), framed only by the app itself (the Lab tab's iframe).
REPORT_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'self'")


def run_file(state: AppState, run_id: int, name: str) -> Response:
    """A file directly in a completed experiment run's directory, by a name RUN_FILE allows; 404 for anything
    else: another kind of run, one not completed, a name with a path in it, or a symbolic link (the file or
    the run's folder: opened with O_NOFOLLOW at every step)."""
    row = need_run(state, run_id)
    if row["kind"] not in ("experiment", "eval"):
        raise HTTPException(404, f"run {run_id} is a {row['kind']} run; only lab experiment runs serve files, and "
                                 "evaluation runs")
    if not RUN_FILE.fullmatch(name):
        raise HTTPException(404, f"no file {name!r} here: a run serves results.json, its .png plots and report.html")
    if row["status"] in ACTIVE:
        raise HTTPException(404, f"run {run_id} has no report yet ({row['status']}); it is written when the "
                                 "experiment completes")
    if row["status"] != "completed":  # a facts lab stopped on SIGINT may still report on its cut-short run
        raise HTTPException(404, f"run {run_id} is {row['status']}: only a completed experiment serves its "
                                 "report and files; start it again")
    try:
        data = state.ws.read_bytes(state.ws.run_path(run_id) / name)  # a report, plots inlined: a few MiB at most
    except (OSError, LinkError) as exc:
        why = " (a symbolic link, which the server does not follow)" if isinstance(exc, LinkError) else ""
        raise HTTPException(404, f"run {run_id} has no file {name!r}{why}") from None
    return Response(data, media_type=RUN_FILE_TYPES[name.rsplit(".", 1)[1]],
                    headers={"content-security-policy": REPORT_CSP, "x-frame-options": "SAMEORIGIN",
                             "cache-control": "no-store"})


# ---- downloads --------------------------------------------------------------------------------------

def snapshot_version(state: AppState, name: str, run_id: int | None, step: int | None, tmp: Any,
                     nothing: str) -> tuple[Any, str]:
    """A snapshot of a version (version_source) in tmp/model, and its file name; 409 `nothing` for an untrained
    model, 404 for a checkpoint pruned meanwhile. tmp is removed on a refusal."""
    src, snapshot, label = version_source(state, name, run_id, step)
    try:
        path = snapshot(src, tmp / "model" / label)  # one version, whole, however long it is read
    except FileNotFoundError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise Problem(404, "checkpoint_gone", f"run {run_id} no longer has a checkpoint at step {step}", id=run_id,
                      step=step) from None
    if not (path / WEIGHTS).is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, f"model {name!r} has not been trained yet: {nothing}")
    return path, label


def download_response(state: AppState, name: str, run_id: int | None = None,
                      step: int | None = None) -> StreamingResponse:
    """The model directory as a zip, streamed from a snapshot (one version, whole, however long the download):
    its current weights, or a run's final model or checkpoint (version_source); 409 for an untrained model."""
    tmp = state.ws.tmp / f"download-{uuid.uuid4().hex}"
    path, label = snapshot_version(state, name, run_id, step, tmp, "there are no weights to download")
    return StreamingResponse(zip_model_dir(path, label), media_type="application/zip",
                             background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
                             headers=attachment(f"{label}.zip"))


def export_response(state: AppState, name: str, fmt: str, dtype: str, run_id: int | None = None,
                    step: int | None = None) -> Response:
    """The model (or a version of it, as download_response) for other tools: `hf` (a transformers checkpoint,
    zipped, streamed) or `gguf` (a file); 409 untrained or without the exporter's optional dependency, 422 what
    the format cannot express."""
    tmp = state.ws.tmp / f"export-{uuid.uuid4().hex}"
    path, name = snapshot_version(state, name, run_id, step, tmp, "there is nothing to export")
    if (path / QUANTIZATION).is_file():  # the exporters write full-precision weights only
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(422, f"model {name!r} is an int8/int4 model, which cannot be exported; export the model "
                                 "it was quantized from (its card names it)")
    try:
        from ..interop import export_gguf, export_hf
        if fmt == "hf":
            out = export_hf(path, tmp / name)
            files = [f for f in sorted(out.rglob("*")) if f.is_file()]
        else:
            out = export_gguf(path, tmp / f"{name}.gguf", dtype=dtype).path
    except ImportError as exc:  # an optional dependency of the exporter is missing
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, f"{fmt} export is not available on this server: {exc}") from None
    except FileNotFoundError as exc:  # a file the export needs, its tokenizer: named by model, not by the snapshot
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, str(exc).replace(str(path), f"model {name!r}")) from None
    except ValueError as exc:  # e.g. an architecture the target format has no name for
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(422, str(exc).replace(str(path), f"model {name!r}")) from None
    cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
    if fmt == "gguf":
        return FileResponse(out, media_type="application/octet-stream", background=cleanup,
                            headers=attachment(f"{name}.gguf"))

    def zipped() -> Iterator[bytes]:
        sink = ZipSink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f"{name}-hf/{f.relative_to(out)}")
                yield sink.take()
        yield sink.take()

    return StreamingResponse(zipped(), media_type="application/zip", background=cleanup,
                             headers=attachment(f"{name}-hf.zip"))


def attachment(filename: str) -> dict[str, str]:
    """The header that saves a response as `filename`, any characters percent-encoded (RFC 6266, RFC 5987)."""
    return {"content-disposition": f"attachment; filename*=UTF-8''{quote(filename, safe='')}"}


# ---- generation -------------------------------------------------------------------------------------

def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def generation_events(state: AppState, req: GenerateRequest) -> Iterator[str]:
    """Server-Sent Events of a generation: `token` per text piece as it is sampled, then `done` with the
    counts. The checks (422, 404, 409) run now, before the stream starts; an error after it has started is
    reported in-band as an `error` event, since the status line is already sent."""
    if req.num_beams > 1:
        raise HTTPException(422, "streaming needs num_beams=1 (beam search knows its winner only at the end)")
    if ttc_request(req) is not None:
        raise HTTPException(422, "best_of, vote and beam choose among whole completions: use POST /api/v1/generate")
    cfg = generation_config(req)
    model, tok = load_for_generation(state, req)
    model = steered(state, req, model)

    def events() -> Iterator[str]:
        t0 = time.perf_counter()
        pieces = []
        counting = CountingTokenizer(tok)
        try:
            for piece in stream(model, counting, req.prompt, cfg):
                pieces.append(piece)
                yield sse("token", {"text": piece})
        except Exception as exc:  # the stream has started: report in-band, not as a status code
            yield sse("error", {"detail": str(exc)})
            return
        text = "".join(pieces)
        elapsed = time.perf_counter() - t0
        n = counting.count
        yield sse("done", {"text": text, "new_tokens": n, "elapsed_s": round(elapsed, 4),
                           "tokens_per_s": round(n / elapsed, 1) if elapsed > 0 else 0.0})

    return events()


class _ClosingStream(StreamingResponse):
    """A StreamingResponse that calls `on_close` however it ends: sent in full, the client gone mid-stream, or
    gone before the first chunk (then the body's generator never starts, and its own `finally` never runs)."""

    def __init__(self, content: Any, on_close: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def event_stream(events: Any, on_close: Callable[[], None] | None = None) -> StreamingResponse:
    """A Server-Sent Events response: not cached, not buffered by a reverse proxy (nginx's X-Accel-Buffering);
    `on_close` is called when it ends, however it ends."""
    kwargs = dict(media_type="text/event-stream", headers={"cache-control": "no-store", "x-accel-buffering": "no"})
    return StreamingResponse(events, **kwargs) if on_close is None else _ClosingStream(events, on_close, **kwargs)


def generation_config(req: GenerateRequest) -> GenerationConfig:
    if any(not s for s in req.stop_strings) or any(len(s) > 200 for s in req.stop_strings):
        raise Problem(422, "stop_string_length", "stop strings must be 1 to 200 characters")
    try:
        return GenerationConfig(max_new_tokens=req.max_new_tokens, do_sample=req.do_sample,
                                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                repetition_penalty=req.repetition_penalty, num_beams=req.num_beams,
                                length_penalty=req.length_penalty, stop_strings=list(req.stop_strings),
                                stop_at_eos=req.stop_at_eos, seed=req.seed)
    except ValueError as exc:
        raise bad_settings(exc) from None


def load_for_generation(state: AppState, req: GenerateRequest) -> tuple[Any, Any]:
    src, snapshot, _ = version_source(state, req.model, req.run, req.step)
    return cached_model(state, req.model, src, snapshot)


def cached_model(state: AppState, name: str, src: Any, snapshot: Any = snapshot_dir) -> tuple[Any, Any]:
    """The served (shared, cached) model and tokenizer of `src`; 409 where it has no weights or cannot load."""
    try:
        return state.cache.get(src, snapshot)
    except NotTrained as exc:
        raise HTTPException(409, str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise Problem(409, "model_unloadable", f"model {name!r} cannot be loaded: {exc}", name=name,
                      reason=str(exc)) from None


class CountingTokenizer:
    """The tokenizer, counting the tokens generation produces: the ids of its final decode (generate) or
    the pushes into its stream decoder (stream). Re-encoding the text would miscount partial bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok, self.count = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        self.count = len(ids)
        return self._tok.decode(ids, **kwargs)

    def decode_continuation(self, context: Any, ids: Any, **kwargs: Any) -> str:
        self.count = len(ids)
        return self._tok.decode_continuation(context, ids, **kwargs)

    def stream_decoder(self, **kwargs: Any) -> Any:
        inner, outer = self._tok.stream_decoder(**kwargs), self

        class _Decoder:
            def push(self, token_id: int) -> str:
                outer.count += 1
                return inner.push(token_id)

            def flush(self) -> str:
                return inner.flush()
        return _Decoder()


STEERING = "steering"  # models/NAME/steering/DIR: direction.safetensors + direction.json (lab/interp/steer.py)


def saved_folders(state: AppState, name: str, kind: str) -> list[Any]:
    """The folders of models/NAME/KIND/ (steering directions, sparse autoencoders) that are real folders of
    regular files: a symbolic link there (to anywhere) is never followed."""
    need_model(state, name)
    try:
        folder = state.ws.model_path(name) / kind
    except LinkError as exc:
        raise HTTPException(409, str(exc)) from None
    if folder.is_symlink() or not folder.is_dir():
        return []
    return [d for d in sorted(folder.iterdir()) if not d.is_symlink() and d.is_dir()
            and all(f.is_file() and not f.is_symlink() for f in d.iterdir())]


def saved_folder(state: AppState, name: str, kind: str, item: str, what: str) -> Any:
    """models/NAME/KIND/ITEM among saved_folders; 404 naming `what` otherwise."""
    item = check_name(item, f"{what} name")
    found = next((d for d in saved_folders(state, name, kind) if d.name == item), None)
    if found is None:
        raise HTTPException(404, f"model {name!r} has no {what} {item!r}")
    return found


def steering_directions(state: AppState, name: str) -> list[SteeringDirection]:
    """The readable steering directions saved with model `name`, by folder name."""
    found = []
    for d in saved_folders(state, name, STEERING):
        try:
            direction = Direction.load(d)
        except ValueError:
            continue  # not a direction (or a broken one): nothing to offer
        found.append(SteeringDirection(name=d.name, layer=direction.layer, n_embd=direction.vector.numel(),
                                       norm=round(direction.norm, 6), method=direction.meta.get("method")))
    return found


def steered(state: AppState, req: GenerateRequest, model: Any) -> Any:
    """The model to generate with: itself, or with `req.steer` a copy carrying the steering hooks (the cached
    model is shared by concurrent requests, which must not see them). 404 for an unknown direction, 422 for one
    that does not fit the model (its width or layer) or conflicting settings."""
    if req.steer is None:
        if req.steer_coef is not None or req.steer_ablate:
            raise HTTPException(422, "steer_coef and steer_ablate need steer: the direction's name")
        return model
    if req.steer_ablate and req.steer_coef is not None:
        raise HTTPException(422, "give steer_coef (add the direction) or steer_ablate (project it out), not both")
    try:
        direction = Direction.load(saved_folder(state, req.model, STEERING, req.steer, "steering direction"))
        copy = deepcopy(model)
        # entered for the copy's lifetime: it is this request's alone and is dropped with it
        Steering(copy, direction, 1.0 if req.steer_coef is None and not req.steer_ablate else req.steer_coef or 0.0,
                 req.steer_ablate).__enter__()
    except (ValueError, LinkError) as exc:  # BadName is a ValueError
        raise HTTPException(422, f"steering direction {req.steer!r}: {exc}") from None
    return copy


# the sampling fields step-wise beam search does not use (it reads max_new_tokens only)
_BEAM_IGNORES = ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty",
                 "stop_strings", "stop_at_eos", "seed")


def ttc_request(req: GenerateRequest) -> tuple[str, int, Any] | None:
    """(strategy, N, task or None) when the request asks for best_of, vote or beam; 422 with the reason when the
    combination cannot run (the same rules as lmlab generate's flags)."""
    from ..tune.rewards import TASKS
    chosen = [f for f in ("best_of", "vote", "beam") if getattr(req, f) is not None]
    if not chosen:
        if req.verifier is not None or req.step_tokens is not None:
            raise HTTPException(422, "verifier and step_tokens are for best_of, vote or beam")
        return None
    if len(chosen) > 1:
        raise HTTPException(422, "give one of best_of, vote and beam")
    field, n = chosen[0], getattr(req, chosen[0])
    if req.num_beams != 1:
        raise HTTPException(422, f"{field} searches on its own: leave num_beams at 1")
    if req.step_tokens is not None and field != "beam":
        raise HTTPException(422, "step_tokens is for beam")
    if req.verifier not in (None, "logprob", *TASKS):
        raise HTTPException(422, f"verifier must be logprob or one of {', '.join(TASKS)}")
    if field == "vote" and req.verifier in (None, "logprob"):
        raise HTTPException(422, f"vote needs a task as verifier (one of {', '.join(TASKS)}): its answer extractor")
    if field == "beam" and (ignored := sorted(set(_BEAM_IGNORES) & req.model_fields_set)):
        raise HTTPException(422, f"beam is deterministic and stops at EOS: leave out {', '.join(ignored)}")
    task = TASKS.get(req.verifier or "")
    if task is not None:
        try:
            task.answer(req.prompt)  # a prompt the checker cannot read: now, not after the sampling
        except ValueError as exc:
            raise HTTPException(422, f"the {task.name} task cannot read this prompt: {exc}") from None
    return field.replace("_", "-"), n, task


def run_generation(state: AppState, req: GenerateRequest) -> Generation:
    ttc = ttc_request(req)
    cfg = generation_config(req)
    model, tok = load_for_generation(state, req)
    model = steered(state, req, model)
    counting = CountingTokenizer(tok)
    t0 = time.perf_counter()
    extra: dict[str, Any] = {}
    if ttc is None:
        text = generate(model, counting, req.prompt, cfg)
        n = counting.count
    else:
        from ..models.ttc import run_strategy
        try:
            res, summary = run_strategy(model, tok, req.prompt, cfg, ttc[0], ttc[1], ttc[2], req.step_tokens or 4)
        except ValueError as exc:  # a prompt and samples that overflow the context: the request's numbers
            raise HTTPException(422, str(exc)) from None
        text, n = res.text, res.tokens
        extra = {"strategy": ttc[0], "candidates": res.candidates, "scores": res.scores, "answer": res.answer,
                 "votes": res.votes or None, "summary": summary}
    elapsed = time.perf_counter() - t0
    return Generation(model=req.model, prompt=req.prompt, text=text, new_tokens=n, elapsed_s=round(elapsed, 4),
                      tokens_per_s=round(n / elapsed, 1) if elapsed > 0 else 0.0, **extra)
