"""/api/v1/presets and /api/v1/models: presets, estimate (parameters, memory, fits the budget?) before
creating, create, list, detail, delete, download (zip of the model directory), export (hf, gguf)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Response
from fastapi.responses import StreamingResponse

from ...models import ModelConfig, preset_names
from ..app import StateDep
from ..db import ACTIVE
from ..schemas import Estimate, ModelCreate, ModelInfo, ModelSpec, Preset, Version
from ..services import (
    build_config,
    download_response,
    estimate,
    export_response,
    make_model,
    model_info,
    model_versions,
    need_model,
    remove_model,
)

router = APIRouter()
# A version of the model, for download, export and generation: a run's final model or one of its checkpoints
RunParam = Query(None, ge=1, le=2**62, description="a run of this model: its final model (the current weights "
                                                   "when left out)")
StepParam = Query(None, ge=0, le=2**62, description="with run: that run's checkpoint at this step")


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
def estimate_model(state: StateDep, spec: ModelSpec) -> Estimate:
    return estimate(build_config(spec), spec.batch_size, state.memory_budget)


@router.post("/models", tags=["models"], status_code=201, response_model=ModelInfo)
def create_model(state: StateDep, spec: ModelCreate) -> ModelInfo:
    return model_info(state, make_model(state, spec.name, spec))


@router.get("/models", tags=["models"], response_model=list[ModelInfo])
def list_models(state: StateDep) -> list[ModelInfo]:
    active = state.db.list_runs(status=ACTIVE)  # once, not once per model
    return [model_info(state, r, active) for r in state.db.list_models()]


@router.get("/models/{name}", tags=["models"], response_model=ModelInfo)
def get_model(state: StateDep, name: str) -> ModelInfo:
    return model_info(state, need_model(state, name))


@router.delete("/models/{name}", tags=["models"], status_code=204)
def delete_model(state: StateDep, name: str) -> Response:
    remove_model(state, name)
    return Response(status_code=204)


@router.get("/models/{name}/versions", tags=["models"], response_model=list[Version],
            summary="every version its runs keep: each run's final model and checkpoints (training, self-play), "
                    "oldest first")
def list_versions(state: StateDep, name: str) -> list[Version]:
    return model_versions(state, name)


@router.get("/models/{name}/download", tags=["models"], response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}}, "description": "zip of the model directory"}},
            summary="the model directory (config.json, model.safetensors, tokenizer.json, training.json) as a zip")
def download_model(state: StateDep, name: str, run: int | None = RunParam,
                   step: int | None = StepParam) -> StreamingResponse:
    return download_response(state, name, run, step)


@router.get("/models/{name}/export/{fmt}", tags=["models"], response_class=StreamingResponse,
            responses={200: {"content": {"application/zip": {}, "application/octet-stream": {}}}},
            summary="export for other tools: `hf` (a transformers checkpoint, zipped) or `gguf` (llama.cpp)")
def export_model(state: StateDep, name: str, fmt: Literal["hf", "gguf"],
                 dtype: Literal["f32", "f16", "q8_0"] = Query("f32", description="GGUF weight type"),
                 run: int | None = RunParam, step: int | None = StepParam) -> Any:
    return export_response(state, name, fmt, dtype, run, step)
