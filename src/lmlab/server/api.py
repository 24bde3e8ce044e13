"""The versioned REST API, `/api/v1`: everything the web UI does, for scripts too (OpenAPI at /docs).

books     upload (multipart), list, detail with stats, preview, delete
models    presets, estimate (parameters, memory, fits the budget?) before creating, create, list, detail,
          delete, download (zip of the model directory)
runs      start (training, text self-play: RL of a trained model into a new one, or a lab experiment:
          `lmlab lab facts EXPERIMENT` / `lmlab selfplay azr`), list, detail, metrics, live events (SSE), log,
          cancel, resume (training and self-play), delete; an experiment's report.html, results.json and
          plots (report, files)
generate  JSON, or token streaming over Server-Sent Events
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Annotated, Any, Literal

from fastapi import APIRouter, File, HTTPException, Query, Request, Response, UploadFile
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..lab.facts.experiments import EXPERIMENTS as FACTS_EXPERIMENTS
from ..lab.selfplay.text import (
    REWARDS,
    SETTING_FLAGS,
    TextSelfPlayConfig,
    encode_prompts,
    file_sha256,
    saved_run,
)
from ..models import FAMILIES, SIZES, GenerationConfig, ModelConfig, generate, preset_names, stream
from ..models.io import WEIGHTS
from ..tokenizers import Tokenizer
from ..tokenizers.tokenizer import KINDS
from ..train import SCHEDULES, TrainConfig, checkpoint_step, latest_checkpoint
from .app import Lab, State
from .db import ACTIVE
from .extract import Refused, extract
from .inference import NotTrained
from .workspace import (
    BOOK_SUFFIXES,
    LinkError,
    ZipSink,
    book_text,
    check_book_name,
    check_name,
    remove_entry,
    snapshot_dir,
    zip_model_dir,
)

router = APIRouter(prefix="/api/v1")
RunId = Annotated[int, PathParam(ge=1, le=2**62, description="run number")]

# ---- schemas ----------------------------------------------------------------------------------------


class Book(BaseModel):
    name: str
    size_bytes: int
    chars: int
    encoding: str
    created_at: float
    words: int | None = None
    lines: int | None = None
    unique_chars: int | None = None


class BookPreview(BaseModel):
    name: str
    text: str
    truncated: bool


class ModelSpec(BaseModel):
    """A preset (family-size, e.g. `gpt2-tiny`) with optional overrides, or custom fields on a family."""
    model_config = ConfigDict(extra="forbid")
    preset: str | None = Field(None, description="e.g. gpt2-tiny, llama-small; see /api/v1/presets",
                               max_length=40)
    family: Literal["gpt", "gpt2", "llama"] | None = None
    n_layer: int | None = Field(None, ge=1, le=128)
    n_head: int | None = Field(None, ge=1, le=128)
    n_kv_head: int | None = Field(None, ge=1, le=128)
    n_embd: int | None = Field(None, ge=1, le=16384)
    block_size: int | None = Field(None, ge=8, le=32768)
    intermediate_size: int | None = Field(None, ge=1, le=65536)
    dropout: float | None = Field(None, ge=0.0, lt=1.0)
    tokenizer_kind: Literal["bpe", "char", "word"] = "bpe"
    vocab_size: int | None = Field(None, ge=5, le=262144, description="tokenizer and embedding size")
    batch_size: int = Field(16, ge=1, le=4096, description="for the training-memory estimate only")


class ModelCreate(ModelSpec):
    name: str = Field(..., min_length=1, max_length=100)


class Estimate(BaseModel):
    config: dict[str, Any]
    parameters: int
    inference_bytes: int
    training_bytes: int
    batch_size: int
    seq_len: int
    memory_budget_bytes: int
    fits: bool
    reason: str | None = None


class ModelInfo(BaseModel):
    name: str
    family: str
    preset: str | None
    config: dict[str, Any]
    parameters: int
    tokenizer_kind: str
    vocab_size: int
    trained: bool
    trained_run_id: int | None
    trained_steps: int | None
    active_run_id: int | None = Field(description="the queued or running training run of this model")
    selfplay_run_ids: list[int] = Field(default_factory=list, description="queued or running self-play runs that "
                                        "read this model (start from it, or score with it as the judge)")
    origin: dict[str, Any] | None = Field(None, description="how a derived model was made, e.g. {kind: selfplay, "
                                                             "parent, reward, judge, run_id, iterations}; "
                                                             "cleared when the model is trained from scratch, "
                                                             "kept when training continues from its weights")
    created_at: float
    updated_at: float
    problem: str | None = Field(None, description="why the model cannot be used now (e.g. its folder is a symbolic "
                                                  "link, which the server does not follow); null when it can")


class Preset(BaseModel):
    name: str
    family: str
    size: str
    parameters: int
    config: dict[str, Any]


class RunCreate(BaseModel):
    """Hyper-parameters left out get sensible defaults scaled to max_steps (warm-up 10%, ~10 evaluations,
    ~5 checkpoints); every TrainConfig field is accepted."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100)
    books: list[str] = Field(..., min_length=1, max_length=100)
    init_from_trained: bool = Field(False, description="continue from the model's trained weights")
    max_steps: int = Field(200, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=4096)
    lr: float = Field(3e-4, gt=0, le=10)
    min_lr: float | None = Field(None, ge=0, le=10)
    warmup_steps: int | None = Field(None, ge=0, le=10_000_000)
    schedule: Literal["cosine", "linear", "constant", "wsd"] = "cosine"
    decay_fraction: float | None = Field(None, gt=0, le=1, description="wsd: share of the steps spent decaying")
    weight_decay: float = Field(0.1, ge=0, le=10)
    grad_clip: float = Field(1.0, ge=0, le=1000)
    grad_accum_steps: int = Field(1, ge=1, le=1024)
    seq_len: int | None = Field(None, ge=2, le=32768)
    eval_every: int | None = Field(None, ge=0, le=10_000_000)
    eval_batches: int = Field(10, ge=1, le=1000)
    save_every: int | None = Field(None, ge=0, le=10_000_000)
    log_every: int | None = Field(None, ge=1, le=100_000)
    keep_last: int = Field(3, ge=0, le=100)
    early_stopping_patience: int = Field(0, ge=0, le=1000)
    time_budget_s: float | None = Field(None, gt=0, le=30 * 86400)
    seed: int = Field(1337, ge=0, le=2**31 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    val_fraction: float | None = Field(None, gt=0, lt=1)


SP = TextSelfPlayConfig  # the defaults of `lmlab selfplay text`, one home
SERVER_REWARDS = tuple(r for r in REWARDS if r != "file")  # `file` runs user code: CLI only


class SelfPlayCreate(BaseModel):
    """Text self-play (`lmlab selfplay text`): sample groups of completions from a trained model, score them
    with a reward, update with group-relative advantages and a KL penalty to the starting model. The final
    policy becomes the new model `new_model`; the starting model is left as it was."""
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100, description="a trained model of the workspace")
    new_model: str = Field(..., min_length=1, max_length=100,
                           description="name of the model the improved policy is saved as; must not exist")
    reward: str = Field(SP.reward, max_length=40, description="seed (diversity and length), repetition (distinct "
                        "3-grams) or perplexity (log-probability under `judge`). `file` is CLI-only: the server "
                        "does not execute user Python code", examples=list(SERVER_REWARDS))
    judge: str | None = Field(None, min_length=1, max_length=100,
                              description="reward perplexity: the trained model of the workspace that scores")
    prompts: list[Annotated[str, Field(max_length=2000)]] = Field(
        default_factory=list, max_length=64, description="completions start from these; none: from <BOS>")
    iterations: int = Field(SP.iterations, ge=1, le=100_000, description="policy updates")
    group_size: int = Field(SP.group_size, ge=2, le=256, description="completions per prompt")
    prompts_per_iteration: int = Field(SP.prompts_per_iteration, ge=1, le=256)
    max_new_tokens: int = Field(SP.max_new_tokens, ge=1, le=2048, description="tokens per completion")
    lr: float = Field(SP.lr, gt=0, le=1, description="AdamW learning rate")
    kl_coef: float = Field(SP.kl_coef, ge=0, le=100, description="weight of the KL penalty to the starting model")
    temperature: float = Field(SP.temperature, gt=0, le=10, description="sampling temperature")
    seed: int = Field(SP.seed, ge=0, le=2**31 - 1)
    save_every: int = Field(SP.save_every, ge=0, le=100_000,
                            description="checkpoint every N iterations (0: only at the end; a cancel always "
                                        "checkpoints), so that a stopped run can be resumed")



MAX_SEEDS = 5


class ExperimentCreate(BaseModel):
    """A lab experiment, run as its own CLI command into the run directory, which then holds results.json,
    PNG plots and report.html (GET /runs/{id}/report). It makes no model and keeps no checkpoints."""
    model_config = ConfigDict(extra="forbid")
    lab: Literal["facts", "azr"] = Field(description="facts: knowledge acquisition on synthetic biographies "
                                         "(`lmlab lab facts EXPERIMENT`); azr: the Absolute Zero miniature "
                                         "(`lmlab selfplay azr`)")
    experiment: str | None = Field(None, max_length=40, validate_default=True,
                                   description="lab facts: one of " + ", ".join(FACTS_EXPERIMENTS) +
                                               "; lab azr has one experiment and takes none",
                                   examples=list(FACTS_EXPERIMENTS))
    quick: bool = Field(False, description="the lab's --quick: reduced sizes (facts: minutes; azr: a smoke run in "
                                           "seconds whose numbers mean nothing)")
    seeds: list[Annotated[int, Field(ge=0, le=2**31 - 1)]] = Field(
        [0, 1, 2], min_length=1, max_length=MAX_SEEDS, description=f"distinct seeds, at most {MAX_SEEDS}")
    workers: int | None = Field(None, ge=1, le=os.cpu_count() or 1,
                                description="parallel processes, 1 thread each (default: the lab's own)")

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, value: str | None, info: ValidationInfo) -> str | None:
        lab = info.data.get("lab")
        if lab == "facts" and value not in FACTS_EXPERIMENTS:
            raise ValueError(f"experiment ({value!r}) must be one of {', '.join(FACTS_EXPERIMENTS)} for lab facts")
        if lab == "azr" and value not in (None, "azr"):
            raise ValueError(f"lab azr has one experiment; leave experiment ({value!r}) out")
        return "azr" if lab == "azr" else value

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, value: list[int]) -> list[int]:
        if len(set(value)) != len(value):
            raise ValueError(f"seeds ({value}) must be distinct")
        return value


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int | None = Field(None, ge=1, le=10_000_000, description="train further than first planned (for "
                                  "a self-play run: its iterations)")


class Run(BaseModel):
    id: int
    kind: Literal["train", "selfplay", "experiment"] = Field(
        description="train: `lmlab train`; selfplay: `lmlab selfplay text` from `model` into params.new_model; "
                    "experiment: a lab experiment (params.lab, params.experiment), no model (`model` is empty)")
    model: str
    books: list[str]
    status: str
    params: dict[str, Any]
    init_from_trained: bool
    current_step: int
    max_steps: int | None
    progress: float | None
    tokens: int | None
    last_loss: float | None
    last_val_loss: float | None
    best_val_loss: float | None
    lr: float | None
    tokens_per_s: float | None
    last_reward: float | None = Field(description="self-play: mean reward of the latest iteration")
    last_kl: float | None = Field(description="self-play: KL to the starting model at the latest iteration")
    checkpoint_step: int | None
    can_resume: bool
    resumed_from_step: int | None
    launches: int
    cancel_requested: bool
    pid: int | None
    exit_code: int | None
    error: str | None
    stop_reason: str | None
    metrics_epoch: int
    queue_position: int | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    updated_at: float


class MetricsPage(BaseModel):
    run_id: int
    metrics_epoch: int
    status: str
    metrics: list[dict[str, Any]]


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., min_length=1, max_length=100)
    prompt: str = Field("", max_length=20000)
    max_new_tokens: int = Field(100, ge=1, le=2048)
    do_sample: bool = True
    temperature: float = Field(0.8, ge=0, le=10)
    top_k: int = Field(40, ge=0, le=1_000_000)
    top_p: float = Field(1.0, gt=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=10)
    num_beams: int = Field(1, ge=1, le=16)
    length_penalty: float = Field(1.0, ge=-10, le=10)
    stop_strings: list[str] = Field(default_factory=list, max_length=16)
    stop_at_eos: bool = True
    seed: int | None = Field(None, ge=0, le=2**63 - 1)


class Generation(BaseModel):
    model: str
    prompt: str
    text: str
    new_tokens: int
    elapsed_s: float
    tokens_per_s: float


# ---- helpers ----------------------------------------------------------------------------------------

def _fmt_gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


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
        raise HTTPException(422, str(exc)) from None
    return cfg


def estimate(cfg: ModelConfig, batch_size: int, budget: int, seq_len: int | None = None) -> Estimate:
    T = min(seq_len or cfg.block_size, cfg.block_size)
    train = cfg.memory_estimate(batch_size, T, training=True)["total"]
    infer = cfg.memory_estimate(1, T, training=False)["total"]
    reason = None
    if train > budget:
        reason = (f"training this model with batch {batch_size} x {T} tokens needs ~{_fmt_gib(train)} (weights, "
                  f"gradients, AdamW state and activations) but the memory budget is {_fmt_gib(budget)}; "
                  "use fewer layers, a smaller width or context, a smaller batch, or raise --memory-budget-gb")
    return Estimate(config=cfg.to_dict(), parameters=cfg.num_parameters(), inference_bytes=infer,
                    training_bytes=train, batch_size=batch_size, seq_len=T, memory_budget_bytes=budget,
                    fits=reason is None, reason=reason)


def model_info(state: State, row: dict[str, Any], active: list[dict[str, Any]] | None = None) -> ModelInfo:
    """The API view of a model row; `active` (the queued and running runs) is fetched when not given."""
    name = row["name"]
    cfg = ModelConfig.from_dict(row["config"])
    active = state.db.list_runs(status=ACTIVE) if active is None else active
    training = [r["id"] for r in active if r["kind"] == "train" and r["model_name"] == name]
    readers = [r["id"] for r in active
               if r["kind"] == "selfplay" and name in (r["model_name"], r["params"].get("judge"))]
    try:
        trained, problem = (state.ws.model_path(name) / "model.safetensors").is_file(), None
    except LinkError as exc:  # listed with the reason; the other models list as usual
        trained, problem = False, str(exc)
    return ModelInfo(name=name, family=cfg.family, preset=row["preset"], config=cfg.to_dict(),
                     parameters=cfg.num_parameters(), tokenizer_kind=row["tokenizer_kind"],
                     vocab_size=row["tokenizer_vocab"], trained=trained, trained_run_id=row["trained_run_id"],
                     trained_steps=row["trained_steps"], active_run_id=training[0] if training else None,
                     selfplay_run_ids=readers, origin=row["origin"], created_at=row["created_at"],
                     updated_at=row["updated_at"], problem=problem)


def run_info(state: State, row: dict[str, Any], queue: list[int] | None = None) -> Run:
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
        checkpoint_step=ckpt_step,
        can_resume=(row["status"] in ("interrupted", "failed", "cancelled") and ckpt_step is not None
                    and row["kind"] != "experiment"),  # an experiment keeps no checkpoints of its own
        resumed_from_step=row["resumed_from_step"], launches=row["launches"],
        cancel_requested=bool(row["cancel_requested"]), pid=row["pid"], exit_code=row["exit_code"],
        error=row["error"], stop_reason=row["stop_reason"], metrics_epoch=row["metrics_epoch"],
        queue_position=queue.index(row["id"]) if queue and row["id"] in queue else None,
        created_at=row["created_at"], started_at=row["started_at"], finished_at=row["finished_at"],
        updated_at=row["updated_at"])


def need_model(state: State, name: str) -> dict[str, Any]:
    check_name(name, "model name")
    row = state.db.get_model(name)
    if row is None:
        raise HTTPException(404, f"model {name!r} not found")
    return row


def need_book(state: State, name: str) -> dict[str, Any]:
    check_book_name(name)
    row = state.db.get_book(name)
    if row is None or not state.ws.book_path(name).is_file():
        raise HTTPException(404, f"book {name!r} not found")
    return row


def need_run(state: State, run_id: int) -> dict[str, Any]:
    row = state.db.get_run(run_id)
    if row is None:
        raise HTTPException(404, f"run {run_id} not found")
    return row


def save_upload(state: State, upload: UploadFile, *, overwrite: bool, busy_code: int = 409) -> dict[str, Any]:
    """Validate and store an uploaded book: safe name, size limit, not empty, decodable text, and not in use
    by a queued or running run when it replaces a book (`busy_code`, as delete_book answers). Its text is read
    once, in a child process with limits (extract.py), and stored beside it for detail, preview and reindex."""
    name = check_book_name(upload.filename or "")
    target = state.ws.book_path(name)
    if target.exists() and not overwrite:
        raise HTTPException(409, f"a book named {name!r} already exists; delete it first or upload with "
                                 "overwrite=true")
    need_book_unused(state, name, busy_code)  # before the reading; again below, under the lock
    limit = state.settings.max_upload_bytes
    tmp = state.ws.tmp / f"upload-{uuid.uuid4().hex}{target.suffix.lower()}"
    text_tmp = state.ws.tmp / f"text-{uuid.uuid4().hex}"
    size = 0
    try:
        with open(tmp, "wb") as out:
            while block := upload.file.read(1 << 20):
                size += len(block)
                if size > limit:
                    raise HTTPException(413, f"{name} is larger than the upload limit of {limit / 2**20:.1f} MiB "
                                             "(lmlab serve --max-upload-mb)")
                out.write(block)
        if size == 0:
            raise HTTPException(400, f"{name} is empty")
        try:
            header = extract(tmp, text_tmp, name, **state.extract_limits)
        except Refused as exc:
            raise HTTPException(exc.status, str(exc)) from None
        with state.lock:  # a run queued meanwhile must not have its book replaced under it
            need_book_unused(state, name, busy_code)
            os.replace(text_tmp, state.ws.text_path(name))
            os.replace(tmp, target)
            row = state.db.add_book(name, size, header["chars"], header["encoding"])
    finally:
        tmp.unlink(missing_ok=True)
        text_tmp.unlink(missing_ok=True)
    return {**row, **_stats(header)}


def need_book_unused(state: State, name: str, code: int = 409) -> None:
    users = [r["id"] for r in state.db.list_runs(status=ACTIVE) if name in r["books"]]
    if users:
        raise HTTPException(code, f"book {name!r} is in use by run(s) {users}")


def _stats(header: dict[str, Any]) -> dict[str, int]:
    return {k: header[k] for k in ("chars", "words", "lines", "unique_chars")}


def _book_text(state: State, name: str, chars: int = 0) -> tuple[dict[str, Any], str]:
    """The stored text (see book_text); 409 if the book's file can no longer be read as a book."""
    try:
        return book_text(state.ws, name, chars, **state.extract_limits)
    except ValueError as exc:
        raise HTTPException(409, str(exc)) from None


def default_params(req: RunCreate) -> dict[str, Any]:
    """TrainConfig fields for a run: what was given, plus defaults scaled to max_steps."""
    n = req.max_steps
    params = req.model_dump(exclude={"model", "books", "init_from_trained", "val_fraction"})
    if params["warmup_steps"] is None:
        params["warmup_steps"] = min(100, n // 10)
    if params["eval_every"] is None:
        params["eval_every"] = max(1, min(500, n // 10))
    if params["save_every"] is None:
        params["save_every"] = max(1, min(1000, n // 5))
    if params["log_every"] is None:
        params["log_every"] = max(1, min(10, n // 100))
    return {k: v for k, v in params.items() if v is not None}


def start_run(state: State, req: RunCreate) -> dict[str, Any]:
    """Validate a run request against the model, the books and the memory budget, then queue it; under the
    lock from the first check through add_run, so two requests cannot both pass (see Supervisor.lock)."""
    with state.lock:
        return _start_run(state, req)


def _start_run(state: State, req: RunCreate) -> dict[str, Any]:
    model = need_model(state, req.model)
    for book in req.books:
        need_book(state, book)
    if len(set(req.books)) != len(req.books):
        raise HTTPException(422, "a book is listed twice")
    need_unused(state, req.model)
    if req.init_from_trained and not (state.ws.model_path(req.model) / "model.safetensors").is_file():
        raise HTTPException(409, f"model {req.model!r} has no trained weights to continue from")
    params = default_params(req)
    if req.val_fraction is not None:
        params["val_fraction"] = req.val_fraction
    try:
        TrainConfig.from_dict({k: v for k, v in params.items() if k != "val_fraction"})
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    cfg = ModelConfig.from_dict(model["config"])
    if req.seq_len and req.seq_len > cfg.block_size:
        raise HTTPException(422, f"seq_len ({req.seq_len}) exceeds the model's context ({cfg.block_size})")
    est = estimate(cfg, req.batch_size, state.memory_budget, req.seq_len)
    if not est.fits:
        raise HTTPException(422, est.reason)
    run = state.db.add_run(req.model, list(req.books), params, req.init_from_trained, req.max_steps)
    state.supervisor.submit(run["id"])
    return run


def runs_using(state: State, name: str, active: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Queued or running runs (`active`, fetched when not given) that read or write the model `name`: its
    training, self-play from it or judged by it, and self-play that will save its policy under that name."""
    active = state.db.list_runs(status=ACTIVE) if active is None else active
    return [r for r in active if name in (r["model_name"], r["params"].get("judge"), r["params"].get("new_model"))]


def need_unused(state: State, name: str, keep: Callable[[dict[str, Any]], bool] = lambda r: True,
                active: list[dict[str, Any]] | None = None, code: int = 409) -> None:
    """`code` with busy_message if a run in runs_using(name) that `keep` selects is active."""
    busy = [r for r in runs_using(state, name, active) if keep(r)]
    if busy:
        raise HTTPException(code, busy_message(name, busy[0]))


def busy_message(name: str, run: dict[str, Any]) -> str:
    if run["kind"] == "train":
        return f"model {name!r} is already training (run {run['id']}); cancel that run or wait for it"
    role = ("the starting point" if run["model_name"] == name else
            "the judge" if run["params"].get("judge") == name else "the name of the model being made")
    return f"model {name!r} is {role} of self-play run {run['id']}; cancel that run or wait for it"


def need_free_model_name(state: State, name: str, hint: str = "") -> None:
    """409 unless `name` can become a new model now: no model of that name, none whose name differs only in
    letter case (on macOS and Windows the two would share one folder), and no active run that will write it.
    Called under state.lock, through the add_model or add_run that takes the name."""
    if state.db.get_model(name) is not None:
        raise HTTPException(409, f"a model named {name!r} already exists{hint}")
    active = state.db.list_runs(status=ACTIVE)
    taken = [m["name"] for m in state.db.list_models()]
    taken += [r["params"]["new_model"] for r in active if r["params"].get("new_model")]
    twin = next((t for t in taken if t != name and t.casefold() == name.casefold()), None)
    if twin is not None:
        raise HTTPException(409, f"{twin!r} is taken, and names that differ only in letter case would share one "
                                 f"folder on some systems{hint}")
    need_unused(state, name, active=active)  # the name a running self-play will save its model under


def need_trained(state: State, name: str, role: str) -> Any:
    """The directory of a workspace model that has weights and a tokenizer (404 unknown, 409 untrained)."""
    need_model(state, name)
    path = state.ws.model_path(name)
    if not (path / "model.safetensors").is_file() or not (path / "tokenizer.json").is_file():
        raise HTTPException(409, f"model {name!r} has not been trained yet: {role} must be a trained model")
    return path


def selfplay_memory(policy: ModelConfig, batch_size: int, seq_len: int,
                    judge: ModelConfig | None = None) -> dict[str, int]:
    """Rough peak bytes of a self-play update, by part. policy: its training, as `estimate` counts it
    (weights, gradients, AdamW state, activations). reference: the frozen copy of the starting model that
    the KL is taken to, its weights plus one forward over the same batch, whose fp32 logits (B, T, V) are
    held twice (the logits and their log_softmax, rl.token_logprobs). judge (reward perplexity): its
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


def start_selfplay(state: State, req: SelfPlayCreate) -> dict[str, Any]:
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


def need_selfplay_models(state: State, model: str, judge: str | None, new: str,
                         resuming: bool = False) -> tuple[Any, Any]:
    """What a self-play run needs to start or resume: its starting model and judge trained and not training
    (self-play runs may share them: they only read them), and the name of the model it makes free. Returns the
    directories of the starting model and the judge (None without one). Called under state.lock."""
    path = need_trained(state, model, "the model self-play starts from")
    judge_path = need_trained(state, judge, "the judge") if judge is not None else None
    other = "" if resuming else " or choose another name for the new model"
    need_free_model_name(state, new, "; resuming this run saves its policy under that name" if resuming else
                         "; choose another name for the new model")
    if state.ws.model_path(new).exists():  # the finished run would not overwrite it (Supervisor._register_selfplay)
        raise HTTPException(409, f"models/{new}/ exists in the workspace though no model of that name is "
                                 f"indexed; remove it{other}")
    active = state.db.list_runs(status=ACTIVE)
    for name in filter(None, (model, judge)):
        need_unused(state, name, lambda r: r["kind"] == "train", active)
    return path, judge_path


def _start_selfplay(state: State, req: SelfPlayCreate, new: str) -> dict[str, Any]:
    path, judge_path = need_selfplay_models(state, req.model, req.judge, new)
    settings = req.model_dump(include=set(SETTING_FLAGS))
    try:
        TextSelfPlayConfig(reward=req.reward, **settings)
        cfg = ModelConfig.load(path / "config.json")
        judge_cfg = ModelConfig.load(judge_path / "config.json") if judge_path else None
        prompts = encode_prompts(Tokenizer.load(path / "tokenizer.json"), req.prompts or [""],
                                 req.max_new_tokens, cfg.block_size)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    batch, longest = req.group_size * req.prompts_per_iteration, max(map(len, prompts)) + req.max_new_tokens
    mem, budget = selfplay_memory(cfg, batch, longest, judge_cfg), state.memory_budget
    if mem["total"] > budget:
        judged = (f"; the judge {req.judge!r} ~{_fmt_gib(mem['judge'])}: its weights and logits over up to its "
                  f"context of {judge_cfg.block_size} tokens per completion" if judge_cfg else "")
        raise HTTPException(422, f"self-play with {batch} completions x {longest} tokens per update needs "
                                 f"~{_fmt_gib(mem['total'])} (the policy's training ~{_fmt_gib(mem['policy'])}: "
                                 "weights, gradients, AdamW state and activations; the frozen reference copy "
                                 f"~{_fmt_gib(mem['reference'])}: its weights and logits{judged}) but the memory "
                                 f"budget is {_fmt_gib(budget)}; use a smaller group_size, prompts_per_iteration "
                                 f"or max_new_tokens{', a smaller judge' if judge_cfg else ''}, or raise "
                                 "--memory-budget-gb")
    params = {**settings, "reward": req.reward, "judge": req.judge, "prompts": list(req.prompts), "new_model": new}
    run = state.db.add_run(req.model, [], params, True, req.iterations, kind="selfplay")
    state.supervisor.submit(run["id"])
    return run


def sse(event: str, data: Any) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"


def generation_config(req: GenerateRequest) -> GenerationConfig:
    if any(not s for s in req.stop_strings) or any(len(s) > 200 for s in req.stop_strings):
        raise HTTPException(422, "stop strings must be 1 to 200 characters")
    try:
        return GenerationConfig(max_new_tokens=req.max_new_tokens, do_sample=req.do_sample,
                                temperature=req.temperature, top_k=req.top_k, top_p=req.top_p,
                                repetition_penalty=req.repetition_penalty, num_beams=req.num_beams,
                                length_penalty=req.length_penalty, stop_strings=list(req.stop_strings),
                                stop_at_eos=req.stop_at_eos, seed=req.seed)
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None


def load_for_generation(state: State, name: str) -> tuple[Any, Any]:
    need_model(state, name)
    try:
        return state.cache.get(state.ws.model_path(name))
    except NotTrained as exc:
        raise HTTPException(409, str(exc)) from None
    except (ValueError, FileNotFoundError) as exc:
        raise HTTPException(409, f"model {name!r} cannot be loaded: {exc}") from None


class _Counting:
    """The tokenizer, counting the tokens generation produces: the ids of its final decode (generate) or
    the pushes into its stream decoder (stream). Re-encoding the text would miscount partial bytes."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok, self.count = tokenizer, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)

    def decode(self, ids: Any, **kwargs: Any) -> str:
        self.count = len(ids)
        return self._tok.decode(ids, **kwargs)

    def stream_decoder(self) -> Any:
        inner, outer = self._tok.stream_decoder(), self

        class _Decoder:
            def push(self, token_id: int) -> str:
                outer.count += 1
                return inner.push(token_id)

            def flush(self) -> str:
                return inner.flush()
        return _Decoder()


def run_generation(state: State, req: GenerateRequest) -> Generation:
    cfg = generation_config(req)
    model, tok = load_for_generation(state, req.model)
    counting = _Counting(tok)
    t0 = time.perf_counter()
    text = generate(model, counting, req.prompt, cfg)
    elapsed = time.perf_counter() - t0
    n = counting.count
    return Generation(model=req.model, prompt=req.prompt, text=text, new_tokens=n, elapsed_s=round(elapsed, 4),
                      tokens_per_s=round(n / elapsed, 1) if elapsed > 0 else 0.0)


# ---- info -------------------------------------------------------------------------------------------

@router.get("/info", tags=["info"], summary="server version, limits and choices the UI offers")
def info(state: Lab) -> dict[str, Any]:
    s = state.settings
    return {"version": __version__, "schema_version": state.db.version, "max_upload_bytes": s.max_upload_bytes,
            "memory_budget_bytes": state.memory_budget, "max_jobs": s.max_jobs, "families": list(FAMILIES),
            "sizes": list(SIZES), "presets": preset_names(), "tokenizer_kinds": list(KINDS),
            "schedules": list(SCHEDULES), "book_suffixes": list(BOOK_SUFFIXES), "auth": bool(s.api_token),
            "selfplay_rewards": list(SERVER_REWARDS), "facts_experiments": list(FACTS_EXPERIMENTS),
            "max_seeds": MAX_SEEDS, "cpu_count": os.cpu_count() or 1,
            "running": len(state.supervisor.running()), "queued": len(state.db.queued_runs())}


# ---- books ------------------------------------------------------------------------------------------

@router.get("/books", tags=["books"], response_model=list[Book])
def list_books(state: Lab) -> list[dict[str, Any]]:
    return state.db.list_books()


@router.post("/books", tags=["books"], status_code=201, response_model=Book,
             summary="upload a book (.txt .md .html .epub .pdf; UTF-8, UTF-16, cp1251 or KOI8-R)")
def upload_book(state: Lab, file: Annotated[UploadFile, File()], overwrite: bool = Query(False)) -> dict[str, Any]:
    return save_upload(state, file, overwrite=overwrite)


@router.get("/books/{name}", tags=["books"], response_model=Book)
def get_book(state: Lab, name: str) -> dict[str, Any]:
    row = need_book(state, name)
    return {**row, **_stats(_book_text(state, name)[0])}


@router.get("/books/{name}/preview", tags=["books"], response_model=BookPreview)
def preview_book(state: Lab, name: str, chars: int = Query(2000, ge=1, le=100_000)) -> BookPreview:
    need_book(state, name)
    header, text = _book_text(state, name, chars)
    return BookPreview(name=name, text=text, truncated=header["chars"] > chars)


@router.delete("/books/{name}", tags=["books"], status_code=204)
def delete_book(state: Lab, name: str) -> Response:
    with state.lock:  # a run queued meanwhile must not lose its book
        need_book(state, name)
        need_book_unused(state, name)
        state.ws.book_path(name).unlink(missing_ok=True)
        state.ws.text_path(name).unlink(missing_ok=True)
        state.db.delete_book(name)
    return Response(status_code=204)


# ---- models -----------------------------------------------------------------------------------------

@router.get("/presets", tags=["models"], response_model=list[Preset])
def presets() -> list[Preset]:
    out = []
    for name in preset_names():
        cfg = ModelConfig.preset(name)
        out.append(Preset(name=name, family=cfg.family, size=name.split("-", 1)[1],
                          parameters=cfg.num_parameters(), config=cfg.to_dict()))
    return out


@router.post("/models/estimate", tags=["models"], response_model=Estimate,
             summary="parameters and memory of a model before creating it")
def estimate_model(state: Lab, spec: ModelSpec) -> Estimate:
    return estimate(build_config(spec), spec.batch_size, state.memory_budget)


@router.post("/models", tags=["models"], status_code=201, response_model=ModelInfo)
def create_model(state: Lab, spec: ModelCreate) -> ModelInfo:
    name = check_name(spec.name, "model name")
    cfg = build_config(spec)
    est = estimate(cfg, 1, state.memory_budget)
    if not est.fits:
        raise HTTPException(422, est.reason)
    with state.lock:  # from the checks through add_model: see Supervisor.lock
        need_free_model_name(state, name)
        path = state.ws.model_path(name)
        shutil.rmtree(path, ignore_errors=True)  # leftovers of a model deleted outside the server
        cfg.save(path / "config.json")
        row = state.db.add_model(name, cfg.to_dict(), spec.preset, spec.tokenizer_kind, cfg.vocab_size)
    return model_info(state, row)


@router.get("/models", tags=["models"], response_model=list[ModelInfo])
def list_models(state: Lab) -> list[ModelInfo]:
    active = state.db.list_runs(status=ACTIVE)  # once, not once per model
    return [model_info(state, r, active) for r in state.db.list_models()]


@router.get("/models/{name}", tags=["models"], response_model=ModelInfo)
def get_model(state: Lab, name: str) -> ModelInfo:
    return model_info(state, need_model(state, name))


@router.delete("/models/{name}", tags=["models"], status_code=204)
def delete_model(state: Lab, name: str) -> Response:
    with state.lock:  # a run queued meanwhile must not lose its model
        need_model(state, name)
        need_unused(state, name)
        for run in state.db.list_runs(model_name=name):
            remove_entry(state.ws.run_path(run["id"]))
        path = state.ws.models / check_name(name, "model name")  # a link (an unusable model) goes, not its target
        state.cache.forget(path)
        remove_entry(path)
        state.db.delete_model(name)
    return Response(status_code=204)


def download_response(state: State, name: str) -> StreamingResponse:
    need_model(state, name)
    tmp = state.ws.tmp / f"download-{uuid.uuid4().hex}"
    path = snapshot_dir(state.ws.model_path(name), tmp / name)  # one version, whole, however long the download
    if not (path / "model.safetensors").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, f"model {name!r} has not been trained yet: there are no weights to download")
    return StreamingResponse(zip_model_dir(path, name), media_type="application/zip",
                             background=BackgroundTask(shutil.rmtree, tmp, ignore_errors=True),
                             headers={"content-disposition": f"attachment; filename*=UTF-8''{_quote(name)}.zip"})


def _quote(name: str) -> str:
    from urllib.parse import quote
    return quote(name, safe="")


@router.get("/models/{name}/download", tags=["models"], response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}}, "description": "zip of the model directory"}},
            summary="the model directory (config.json, model.safetensors, tokenizer.json, training.json) as a zip")
def download_model(state: Lab, name: str) -> StreamingResponse:
    return download_response(state, name)


@router.get("/models/{name}/export/{fmt}", tags=["models"], response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}}}},
            summary="export for other tools: `hf` (a transformers checkpoint, zipped) or `gguf` (llama.cpp)")
def export_model(state: Lab, name: str, fmt: Literal["hf", "gguf"],
                 dtype: Literal["f32", "f16", "q8_0"] = Query("f32", description="GGUF weight type")) -> Any:
    need_model(state, name)
    tmp = state.ws.tmp / f"export-{uuid.uuid4().hex}"
    path = snapshot_dir(state.ws.model_path(name), tmp / "model" / name)  # one version, whole, while it exports
    if not (path / "model.safetensors").is_file():
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, f"model {name!r} has not been trained yet: there is nothing to export")
    try:
        from ..interop import export_gguf, export_hf
        if fmt == "hf":
            out = export_hf(path, tmp / name)
            files = [f for f in sorted(out.rglob("*")) if f.is_file()]
        else:
            out = export_gguf(path, tmp / f"{name}.gguf", dtype=dtype)
    except ImportError as exc:  # an optional dependency of the exporter is missing
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(409, f"{fmt} export is not available on this server: {exc}") from None
    except ValueError as exc:  # e.g. an architecture the target format has no name for
        shutil.rmtree(tmp, ignore_errors=True)
        raise HTTPException(422, str(exc)) from None
    cleanup = BackgroundTask(shutil.rmtree, tmp, ignore_errors=True)
    quoted = _quote(name)
    if fmt == "gguf":
        return FileResponse(out, media_type="application/octet-stream", background=cleanup,
                            headers={"content-disposition": f"attachment; filename*=UTF-8''{quoted}.gguf"})

    def zipped() -> Iterator[bytes]:
        sink = ZipSink()
        with zipfile.ZipFile(sink, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for f in files:
                zf.write(f, f"{name}-hf/{f.relative_to(out)}")
                yield sink.take()
        yield sink.take()

    return StreamingResponse(zipped(), media_type="application/zip", background=cleanup,
                             headers={"content-disposition": f"attachment; filename*=UTF-8''{quoted}-hf.zip"})


# ---- runs -------------------------------------------------------------------------------------------

@router.post("/runs", tags=["runs"], status_code=201, response_model=Run)
def create_run(state: Lab, req: RunCreate) -> Run:
    return run_info(state, start_run(state, req))


_ERRORS = {400: {"description": "a name that may not become a file name"},
           404: {"description": "an unknown model"},
           409: {"description": "a model that is untrained, already exists, or is in use by another run"},
           422: {"description": "invalid settings, with a one-line reason"}}


@router.post("/runs/selfplay", tags=["runs"], status_code=201, response_model=Run, responses=_ERRORS,
             summary="start text self-play: RL of a trained model against a reward, saved as a new model")
def create_selfplay_run(state: Lab, req: SelfPlayCreate) -> Run:
    return run_info(state, start_selfplay(state, req))


@router.post("/runs/experiment", tags=["runs"], status_code=201, response_model=Run,
             responses={422: {"description": "an unknown lab or experiment, or bad seeds or workers"}},
             summary="start a lab experiment (lab facts EXPERIMENT, or selfplay azr) into the run directory")
def create_experiment_run(state: Lab, req: ExperimentCreate) -> Run:
    params = req.model_dump(exclude_none=True)
    run = state.db.add_run("", [], params, False, None, kind="experiment")
    state.supervisor.submit(run["id"])
    return run_info(state, run)


@router.get("/runs", tags=["runs"], response_model=list[Run])
def list_runs(state: Lab, model: str | None = Query(None, max_length=100),
              status: str | None = Query(None, max_length=20),
              kind: Literal["train", "selfplay", "experiment"] | None = Query(None)) -> list[Run]:
    queue = [r["id"] for r in state.db.queued_runs()]
    rows = state.db.list_runs(model_name=model, status=[status] if status else None, kind=kind)
    return [run_info(state, r, queue) for r in rows]


@router.get("/runs/{run_id}", tags=["runs"], response_model=Run)
def get_run(state: Lab, run_id: RunId) -> Run:
    return run_info(state, need_run(state, run_id))


@router.get("/runs/{run_id}/metrics", tags=["runs"], response_model=MetricsPage,
            summary="logged metrics: training (step, tokens, elapsed_s, loss, lr, tokens_per_s; val_loss on eval "
                    "steps) or self-play (step, reward, reward_std, kl, loss, length, wall_s, sample)")
def run_metrics(state: Lab, run_id: RunId, after_id: int = Query(0, ge=0, le=2**62),
                limit: int = Query(10000, ge=1, le=100000)) -> MetricsPage:
    row = need_run(state, run_id)
    return MetricsPage(run_id=run_id, metrics_epoch=row["metrics_epoch"], status=row["status"],
                       metrics=state.db.get_metrics(run_id, after_id, limit))


@router.get("/runs/{run_id}/log", tags=["runs"], summary="the training process's output (last lines)")
def run_log(state: Lab, run_id: RunId, lines: int = Query(200, ge=1, le=10000)) -> dict:
    need_run(state, run_id)
    try:  # never through a symbolic link (409): a planted log.txt -> /etc/passwd is not served
        text = state.ws.read_bytes(state.ws.run_path(run_id) / "log.txt").decode("utf-8", errors="replace")
    except FileNotFoundError:
        text = ""
    return {"run_id": run_id, "lines": text.splitlines()[-lines:]}


@router.get("/runs/{run_id}/events", tags=["runs"], response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {}}}},
            summary="Server-Sent Events: `metric` per logged step, `status` on change, `reset`, `end`")
async def run_events(state: Lab, run_id: RunId, request: Request) -> StreamingResponse:
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

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})


# What an experiment's run directory may serve: plain names, no dot first, of the kinds the labs write.
RUN_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*\.(png|json|html)$")
_MEDIA = {"png": "image/png", "json": "application/json", "html": "text/html; charset=utf-8"}
# report.html is generated content (plot captions, claims, settings): no scripts, no requests out, its PNGs
# inlined as data: URIs (lab/*/report.py), framed only by the app itself (the Lab tab's iframe).
REPORT_CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; base-uri 'none'; "
              "form-action 'none'; frame-ancestors 'self'")


def run_file(state: State, run_id: int, name: str) -> Response:
    """A file directly in a completed experiment run's directory, by a name RUN_FILE allows; 404 for anything
    else: another kind of run, one not completed, a name with a path in it, or a symbolic link (the file or
    the run's folder: opened with O_NOFOLLOW at every step)."""
    row = need_run(state, run_id)
    if row["kind"] != "experiment":
        raise HTTPException(404, f"run {run_id} is a {row['kind']} run; only lab experiment runs serve files")
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
    return Response(data, media_type=_MEDIA[name.rsplit(".", 1)[1]],
                    headers={"content-security-policy": REPORT_CSP, "x-frame-options": "SAMEORIGIN",
                             "cache-control": "no-store"})


@router.get("/runs/{run_id}/report", tags=["runs"], response_class=FileResponse,
            responses={200: {"content": {"text/html": {}}}, 404: {"description": "no report (yet)"}},
            summary="a lab experiment's report.html (plots inlined; served with a script-free CSP)")
def run_report(state: Lab, run_id: RunId) -> Response:
    return run_file(state, run_id, "report.html")


@router.get("/runs/{run_id}/files/{name}", tags=["runs"], response_class=FileResponse,
            responses={200: {"content": {"application/json": {}, "image/png": {}, "text/html": {}}}},
            summary="a file of a lab experiment's run directory: results.json, a .png plot, report.html")
def run_file_endpoint(state: Lab, run_id: RunId, name: str = PathParam(..., max_length=200)) -> Response:
    return run_file(state, run_id, name)


@router.post("/runs/{run_id}/cancel", tags=["runs"], response_model=Run,
             summary="stop a run: queued ones at once, running ones after a final checkpoint")
def cancel_run(state: Lab, run_id: RunId) -> Run:
    row = need_run(state, run_id)
    if row["status"] not in ACTIVE:
        raise HTTPException(409, f"run {run_id} is {row['status']}, not queued or running")
    return run_info(state, state.supervisor.cancel(run_id) or row)


def _resumable_models(state: State, run: dict[str, Any]) -> None:
    """A resumed run reads and writes models as when it started. Training writes its model when it completes:
    not while self-play reads it or another run trains it. Self-play needs what it needed to start."""
    if run["kind"] == "train":
        need_unused(state, run["model_name"], lambda r: r["id"] != run["id"])
    else:
        p = run["params"]
        paths = need_selfplay_models(state, run["model_name"], p.get("judge"), p["new_model"], resuming=True)
        need_same_weights(state, run, paths)


def need_same_weights(state: State, run: dict[str, Any], paths: tuple[Any, Any]) -> None:
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
            raise HTTPException(409, f"run {run['id']}: model {name!r} has other weights than when this run started "
                                     "(trained since?); a resumed run keeps its starting weights: start a new "
                                     "self-play run instead")


@router.post("/runs/{run_id}/resume", tags=["runs"], response_model=Run,
             summary="continue an interrupted, failed or cancelled run (training or self-play) from its last "
                     "checkpoint; max_steps trains further (self-play: iterations)")
def resume_run(state: Lab, run_id: RunId, req: ResumeRequest | None = None) -> Run:
    with state.lock:  # from the check through queueing: see Supervisor.lock
        need_run(state, run_id)
        try:
            row = state.supervisor.resume(run_id, req.max_steps if req else None,
                                          ready=lambda run: _resumable_models(state, run))
        except LookupError as exc:
            raise HTTPException(404, str(exc)) from None
        except ValueError as exc:
            raise HTTPException(409, str(exc)) from None
    return run_info(state, row)


@router.delete("/runs/{run_id}", tags=["runs"], status_code=204)
def delete_run(state: Lab, run_id: RunId) -> Response:
    with state.lock:  # not while it is being resumed
        row = need_run(state, run_id)
        if row["status"] in ACTIVE:
            raise HTTPException(409, f"run {run_id} is {row['status']}; cancel it first")
        remove_entry(state.ws.run_path(run_id))  # a symbolic link: the link, not where it points
        state.db.delete_run(run_id)
    return Response(status_code=204)


# ---- generation -------------------------------------------------------------------------------------

@router.post("/generate", tags=["generate"], response_model=Generation)
def generate_text(state: Lab, req: GenerateRequest) -> Generation:
    return run_generation(state, req)


@router.post("/generate/stream", tags=["generate"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}},
             summary="Server-Sent Events: `token` events with text pieces as they are sampled, then `done`")
def generate_stream(state: Lab, req: GenerateRequest) -> StreamingResponse:
    if req.num_beams > 1:
        raise HTTPException(422, "streaming needs num_beams=1 (beam search knows its winner only at the end)")
    cfg = generation_config(req)
    model, tok = load_for_generation(state, req.model)

    def events() -> Iterator[str]:
        t0 = time.perf_counter()
        pieces = []
        counting = _Counting(tok)
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

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"cache-control": "no-store", "x-accel-buffering": "no"})

