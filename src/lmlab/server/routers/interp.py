"""/api/v1/models/{name}/interp: the interpretability lab's views of a trained model on a prompt, as JSON for the
model page's "Look inside" section (lab/interp/views.py, the same numbers `lmlab lab interp` writes): the logit
lens, every head's attention, activation patching between a clean and a corrupted prompt.

Computed in the request, on a private copy of the model: the views hook the model's modules (patching even
replaces activations), and the cached copy serves generation at the same time."""

from __future__ import annotations

import copy
from typing import Any

import torch
from fastapi import APIRouter, HTTPException

from ...lab.interp.views import attention_view, check_view, encode, lens_view, patch_view, token_id
from ..app import StateDep
from ..schemas import InterpRequest
from ..services import cached_model, need_trained

router = APIRouter()
MAX_TOKENS = 64  # the page draws a cell per position (attention: layers x heads x T x T numbers)


@router.post("/models/{name}/interp", tags=["models"],
             responses={409: {"description": "an untrained model, or one that cannot be loaded"},
                        422: {"description": "a prompt that is empty, too long or of the wrong length for patching"}},
             summary="look inside a model on a prompt: logit lens, attention patterns or activation patching")
def interp(state: StateDep, name: str, req: InterpRequest) -> dict[str, Any]:
    try:
        check_view(req.view, req.corrupt, req.target, req.foil, dash="")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    path = need_trained(state, name, "a model to look inside")
    cached, tok = cached_model(state, name, path)
    if state.settings.torch_threads:  # OpenMP's thread count is per thread: this worker gets the server's
        torch.set_num_threads(state.settings.torch_threads)
    model = copy.deepcopy(cached).eval()
    try:
        ids = encode(model, tok, req.prompt, "prompt", req.bos)
        if len(ids) > MAX_TOKENS:
            raise ValueError(f"prompt is {len(ids)} tokens; the page shows at most {MAX_TOKENS}")
        target = token_id(tok, req.target, "target") if req.target is not None else None
        if req.view == "lens":
            view = lens_view(model, tok, ids, target, req.top_k)
        elif req.view == "attention":
            view = attention_view(model, tok, ids)
            view["attention"] = view["attention"].numpy().round(4).tolist()
        else:
            corrupt = encode(model, tok, req.corrupt or "", "corrupt", req.bos)
            foil = token_id(tok, req.foil, "foil") if req.foil is not None else None
            view = patch_view(model, tok, ids, corrupt, target, foil, ("prompt", "corrupt", "target", "foil"))
            view["restored"] = view["restored"].tolist()
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    return {"model": name, "view": req.view, **view}
