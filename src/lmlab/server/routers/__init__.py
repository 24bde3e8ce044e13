"""The HTTP routes, one module per resource; each handler checks its input through services and shapes the
answer. `api` is the versioned REST API (`/api/v1`, OpenAPI at /docs), in the order of its document; `seed`
keeps the AZR Model Trainer app's endpoints for its old clients; `openai` is the OpenAI-compatible API (`/v1`)."""

from fastapi import APIRouter

from . import books, data, demo, evals, generate, info, interp, modelpage, models, openai, runs, seed, tune

api = APIRouter(prefix="/api/v1")
for _resource in (info, books, data, models, modelpage, interp, runs, generate, evals, tune, demo):
    api.include_router(_resource.router)

__all__ = ["api", "openai", "seed"]
