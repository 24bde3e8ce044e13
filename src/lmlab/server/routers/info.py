"""GET /api/v1/info: the server's version, limits and the choices the UI offers."""

from __future__ import annotations

import os
from typing import Any

from fastapi import APIRouter

from ... import __version__
from ...data.documents import SUFFIXES
from ...lab.facts.experiments import EXPERIMENTS as FACTS_EXPERIMENTS
from ...models import FAMILIES, SIZES, preset_names
from ...tokenizers.tokenizer import KINDS
from ...train import SCHEDULES
from ..app import StateDep
from ..schemas import MAX_SEEDS, SERVER_REWARDS
from ..services import devices

router = APIRouter()


@router.get("/info", tags=["info"], summary="server version, limits and choices the UI offers")
def info(state: StateDep) -> dict[str, Any]:
    s = state.settings
    return {"version": __version__, "schema_version": state.db.version, "max_upload_bytes": s.max_upload_bytes,
            "memory_budget_bytes": state.memory_budget, "max_jobs": s.max_jobs, "families": list(FAMILIES),
            "sizes": list(SIZES), "presets": preset_names(), "tokenizer_kinds": list(KINDS),
            "schedules": list(SCHEDULES), "book_suffixes": list(SUFFIXES), "auth": bool(s.api_token),
            "selfplay_rewards": list(SERVER_REWARDS), "facts_experiments": list(FACTS_EXPERIMENTS),
            "max_seeds": MAX_SEEDS, "cpu_count": os.cpu_count() or 1, "devices": devices(),
            "running": len(state.supervisor.running()), "queued": len(state.db.queued_runs())}
