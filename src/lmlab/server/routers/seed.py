"""The endpoints of the AZR Model Trainer app (github.com/Slavikpro557/ai-neural-network-project), which lmlab
grew from, kept for its clients: same paths, request fields and response fields.

What changed underneath: a model is a ModelConfig of the `gpt` family (the app's CustomTransformerLM),
its tokenizer is trained from the book when training starts (byte-level BPE; char below 260 tokens);
`/train` queues a supervised OS process instead of a thread sharing the serving model; errors are 4xx
with a reason instead of 500s; nothing uploaded is ever unpickled.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, File, HTTPException, UploadFile
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from ...models import ModelConfig
from ..app import StateDep
from ..db import ACTIVE
from ..schemas import GenerateRequest, ModelSpec, RunCreate
from ..services import download_response, make_model, need_unused, run_generation, save_upload, start_run
from ..workspace import check_name

router = APIRouter(tags=["seed-compatible"])


class SeedModelConfig(BaseModel):
    name: str = Field(..., min_length=1, max_length=100)
    vocab_size: int = Field(8000, ge=5, le=262144)
    d_model: int = Field(256, ge=1, le=16384)
    num_layers: int = Field(6, ge=1, le=128)
    num_heads: int = Field(8, ge=1, le=128)
    d_ff: int = Field(1024, ge=1, le=65536)
    max_seq_len: int = Field(256, ge=8, le=32768)


class SeedTrainingConfig(BaseModel):
    model_name: str = Field(..., min_length=1, max_length=100)
    book_file: str = Field(..., min_length=1, max_length=200)
    max_iterations: int = Field(1000000, ge=1, le=10_000_000)
    batch_size: int = Field(16, ge=1, le=4096)
    learning_rate: float = Field(3e-4, gt=0, le=10)
    save_every: int = Field(1000, ge=1, le=10_000_000)


class SeedGenerateConfig(BaseModel):
    model_name: str = Field(..., min_length=1, max_length=100)
    prompt: str = Field(..., max_length=20000)
    max_length: int = Field(100, ge=1, le=2048)
    temperature: float = Field(0.8, ge=0, le=10)
    top_k: int = Field(40, ge=0, le=1_000_000)


def seed_config(name: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """A ModelConfig in the app's keys (what its clients read back)."""
    return {"name": name, "vocab_size": cfg["vocab_size"], "d_model": cfg["n_embd"], "num_layers": cfg["n_layer"],
            "num_heads": cfg["n_head"], "d_ff": cfg["intermediate_size"], "max_seq_len": cfg["block_size"]}


@router.post("/create_model")
def create_model(state: StateDep, config: SeedModelConfig) -> dict[str, Any]:
    # the app's fields as a `gpt` ModelSpec, made as POST /api/v1/models makes a model (one service)
    spec = ModelSpec(family="gpt", n_layer=config.num_layers, n_head=config.num_heads, n_embd=config.d_model,
                     intermediate_size=config.d_ff, block_size=config.max_seq_len, vocab_size=config.vocab_size,
                     tokenizer_kind="bpe" if config.vocab_size >= 260 else "char")
    row = make_model(state, config.name, spec)
    return {"status": "success", "message": f"Model '{row['name']}' created successfully",
            "parameters": ModelConfig.from_dict(row["config"]).num_parameters(), "config": config.model_dump()}


@router.post("/upload_book")
def upload_book(state: StateDep, file: Annotated[UploadFile, File()]) -> dict[str, Any]:
    # the seed replaced a book of the same name; not one a queued or running run reads (400: the app's answer
    # for a model already training)
    row = save_upload(state, file, overwrite=True, busy_code=400)
    return {"status": "success", "filename": row["name"], "path": f"books/{row['name']}"}


@router.get("/books")
def list_books(state: StateDep) -> dict[str, Any]:
    return {"books": [b["name"] for b in state.db.list_books()]}


@router.get("/models")
def list_models(state: StateDep) -> dict[str, Any]:
    return {"models": [{"name": m["name"], "config": seed_config(m["name"], m["config"])}
                       for m in state.db.list_models()]}


@router.post("/train")
def train(state: StateDep, config: SeedTrainingConfig) -> dict[str, Any]:
    with state.lock:  # from the checks through queueing: see Supervisor.lock
        if state.db.get_model(check_name(config.model_name, "model name")) is None:
            raise HTTPException(404, f"Model '{config.model_name}' not found")
        # 400, the app's answer for a model already training, for any run using it (self-play reads it too)
        need_unused(state, config.model_name, code=400)
        # the app trains from scratch each time; the earlier version stays with its run (new_version)
        req = RunCreate(model=config.model_name, books=[config.book_file], max_steps=config.max_iterations,
                        batch_size=config.batch_size, lr=config.learning_rate, save_every=config.save_every,
                        new_version=True)
        run = start_run(state, req)  # 404 for an unknown book, 422 for a model over the memory budget
    ahead = len(state.db.queued_runs()) - 1 + len(state.supervisor.running())
    message = "Training started in background" if ahead <= 0 else \
        f"Training queued in background (run {run['id']}, behind {ahead} other job(s))"
    return {"status": "success", "message": message, "config": config.model_dump()}


@router.get("/training_status")
def training_status(state: StateDep) -> dict[str, Any]:
    """The most recent training or self-play run, in the app's shape (the app knew no other kind: a later
    evaluation or quantization must not hide the training under way). Training runs have no reward (0.0);
    self-play runs report their mean reward per iteration, as the app's self-play trainer did."""
    runs = [r for r in state.db.list_runs() if r["kind"] in ("train", "selfplay")]
    if not runs:
        return {"is_training": False, "current_iteration": 0, "max_iterations": 0, "current_loss": 0.0,
                "current_reward": 0.0, "model_name": None, "history": []}
    run = runs[0]
    metrics = state.db.get_metrics(run["id"])
    history = [{"iteration": m["step"], "loss": m.get("loss"), "reward": m.get("reward", 0.0), "lr": m.get("lr"),
                "timestamp": datetime.fromtimestamp(m.get("time") or run["updated_at"]).isoformat(timespec="seconds")}
               for m in metrics[-100:]]
    out = {"is_training": run["status"] in ACTIVE, "current_iteration": run["current_step"],
           "max_iterations": run["max_steps"] or 0, "current_loss": run["last_loss"] or 0.0,
           "current_reward": run["last_reward"] or 0.0, "model_name": run["model_name"], "history": history}
    if run["status"] == "failed":
        out["error"] = run["error"]  # the seed added this key when its training thread failed
    return out


@router.post("/generate")
def generate(state: StateDep, config: SeedGenerateConfig) -> dict[str, Any]:
    req = GenerateRequest(model=config.model_name, prompt=config.prompt, max_new_tokens=config.max_length,
                          temperature=config.temperature, top_k=config.top_k)
    out = run_generation(state, req)
    # the seed decoded prompt + continuation together
    return {"status": "success", "prompt": config.prompt, "generated_text": config.prompt + out.text}


@router.get("/download_model/{model_name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}}}})
def download_model(state: StateDep, model_name: str) -> StreamingResponse:
    return download_response(state, model_name)

