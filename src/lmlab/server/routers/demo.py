"""POST /api/v1/demo: the web app's one-click start, what `lmlab demo` does, made of the API's own services:
the built-in book (a generated collection of tales) stored as a book, the demo's ~1M-parameter Llama-style
model (its BPE tokenizer is trained with the run), and a short training run of it, queued like any other."""

from __future__ import annotations

import io

from fastapi import APIRouter, UploadFile
from pydantic import BaseModel, ConfigDict, Field

from ...train.demo_corpus import demo_corpus
from ...train.recipes import demo_model_config
from ..app import AppState, Problem, StateDep
from ..schemas import ModelSpec, Run, RunCreate
from ..services import make_model, need_free_model_name, run_info, save_upload, start_run

router = APIRouter()

DEMO_BOOK = "demo-tales.txt"
DEMO_VOCAB = 1024
# `lmlab demo`'s optimiser settings; 300 steps of 16x128 tokens take the val loss from 6.9 to about 1 nat/token
# and take a minute or two on a 2-core CPU (the CLI's demo fits ~900 steps to a 3-minute budget)
DEMO_RUN = dict(batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30, weight_decay=0.1, eval_batches=8)


class DemoCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_steps: int = Field(300, ge=1, le=10_000, description="training steps of the demo run")


@router.post("/demo", tags=["runs"], status_code=201, response_model=Run,
             summary="the built-in book, a small model and a short training run of it, in one call")
def start_demo(state: StateDep, req: DemoCreate | None = None) -> Run:
    req = req or DemoCreate()
    if state.db.get_book(DEMO_BOOK) is None:  # the book is generated from a fixed seed: the same text again
        upload = UploadFile(io.BytesIO(demo_corpus().encode("utf-8")), filename=DEMO_BOOK)
        save_upload(state, upload, overwrite=False)
    cfg = demo_model_config(DEMO_VOCAB)
    spec = ModelSpec(family=cfg.family, n_layer=cfg.n_layer, n_head=cfg.n_head, n_kv_head=cfg.n_kv_head,
                     n_embd=cfg.n_embd, block_size=cfg.block_size, tokenizer_kind="bpe", vocab_size=DEMO_VOCAB)
    with state.lock:  # the name found free is taken before another request can take it
        name = next(n for n in ("demo", *(f"demo-{i}" for i in range(2, 10_000))) if _free(state, n))
        make_model(state, name, spec)
    return run_info(state, start_run(state, RunCreate(model=name, books=[DEMO_BOOK], max_steps=req.max_steps,
                                                      **DEMO_RUN)))


def _free(state: AppState, name: str) -> bool:
    """Whether a new model may take `name` by every rule make_model applies: not only an indexed model of that
    name, but one differing only in letter case, a folder on disk, a name an active run will create."""
    try:
        need_free_model_name(state, name)
    except Problem:
        return False
    return True
