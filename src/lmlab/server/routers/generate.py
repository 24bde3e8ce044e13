"""/api/v1/generate: text from a trained model of the workspace, as JSON or as tokens streamed over
Server-Sent Events, optionally steered by one of the model's saved steering directions (listed by
/api/v1/models/NAME/steering)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from ..app import StateDep
from ..schemas import GenerateRequest, Generation, SteeringDirection
from ..services import event_stream, generation_events, run_generation, steering_directions

router = APIRouter()


@router.post("/generate", tags=["generate"], response_model=Generation)
def generate_text(state: StateDep, req: GenerateRequest) -> Generation:
    return run_generation(state, req)


@router.post("/generate/stream", tags=["generate"], response_class=StreamingResponse,
             responses={200: {"content": {"text/event-stream": {}}}},
             summary="Server-Sent Events: `token` events with text pieces as they are sampled, then `done`")
def generate_stream(state: StateDep, req: GenerateRequest) -> StreamingResponse:
    return event_stream(generation_events(state, req))


@router.get("/models/{name}/steering", tags=["generate"], response_model=list[SteeringDirection],
            summary="the model's steering directions (models/NAME/steering/DIR, from lmlab lab interp steer)")
def list_steering(state: StateDep, name: str) -> list[SteeringDirection]:
    return steering_directions(state, name)
