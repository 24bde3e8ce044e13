"""/api/v1/generate: text from a trained model of the workspace, as JSON or as tokens streamed over
Server-Sent Events."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..app import StateDep
from ..schemas import GenerateRequest, Generation
from ..services import event_stream, generation_events, run_generation

router = APIRouter()


@router.post("/generate", tags=["generate"], response_model=Generation)
def generate_text(state: StateDep, req: GenerateRequest) -> Generation:
    return run_generation(state, req)


@router.post("/generate/stream", tags=["generate"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}},
             summary="Server-Sent Events: `token` events with text pieces as they are sampled, then `done`")
def generate_stream(state: StateDep, req: GenerateRequest) -> StreamingResponse:
    return event_stream(generation_events(state, req))
