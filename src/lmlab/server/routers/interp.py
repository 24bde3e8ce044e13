"""/api/v1/models/{name}/interp: the interpretability lab's views of a trained model on a prompt, as JSON for the
model page's "Look inside" section (lab/interp/views.py, the same numbers `lmlab lab interp` writes): the logit
lens, every head's attention, activation patching between a clean and a corrupted prompt. /saes: the sparse
autoencoders saved beside the model (`lmlab lab interp sae`, MODEL/sae/NAME/), and a feature browser over a
book of the workspace (lab/interp/saelab.feature_browser, as in the SAE's report.html).

Computed in the request, on a private copy of the model: the views hook the model's modules (patching even
replaces activations), and the cached copy serves generation at the same time."""

from __future__ import annotations

import copy
import json
from typing import Any

import numpy as np
import torch
from fastapi import APIRouter, HTTPException
from safetensors import SafetensorError, safe_open

from ...lab.interp.sae import WEIGHTS, load_sae, stream_activations
from ...lab.interp.saelab import feature_browser
from ...lab.interp.views import attention_view, check_view, encode, lens_view, patch_view, token_id
from ..app import AppState, Problem, StateDep
from ..schemas import InterpRequest, SAEBrowse
from ..services import book_full_text, cached_model, need_trained, saved_folder, saved_folders
from .data import text_sample

router = APIRouter()
MAX_TOKENS = 64  # the page draws a cell per position (attention: layers x heads x T x T numbers)


SAES = "sae"  # MODEL/sae/NAME/: sae.safetensors + config.json (lab/interp/sae.py save_sae)


def _private(state: AppState, name: str) -> tuple[Any, Any]:
    """A copy of the served model (the views hook its modules) and its tokenizer."""
    cached, tok = cached_model(state, name, need_trained(state, name, "a model to look inside"))
    if state.settings.torch_threads:  # OpenMP's thread count is per thread: this worker gets the server's
        torch.set_num_threads(state.settings.torch_threads)
    return copy.deepcopy(cached).eval(), tok


@router.post("/models/{name}/interp", tags=["models"],
             responses={409: {"description": "an untrained model, or one that cannot be loaded"},
                        422: {"description": "a prompt that is empty, too long or of the wrong length for patching"}},
             summary="look inside a model on a prompt: logit lens, attention patterns or activation patching")
def interp(state: StateDep, name: str, req: InterpRequest) -> dict[str, Any]:
    try:
        check_view(req.view, req.corrupt, req.target, req.foil, dash="")
    except ValueError as exc:
        raise HTTPException(422, str(exc)) from None
    model, tok = _private(state, name)
    try:
        ids = encode(model, tok, req.prompt, "prompt", req.bos)
        if len(ids) > MAX_TOKENS:
            raise Problem(422, "prompt_too_long", f"prompt is {len(ids)} tokens; the page shows at most {MAX_TOKENS}",
                          tokens=len(ids), limit=MAX_TOKENS)
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
    except ValueError as exc:  # the prompt, target or corrupted prompt, as the view's own checks say
        raise Problem(422, "prompt_invalid", str(exc), reason=str(exc)) from None
    return {"model": name, "view": req.view, **view}



@router.get("/models/{name}/saes", tags=["models"],
            summary="the sparse autoencoders saved beside the model (lmlab lab interp sae): kind, stream, size, "
                    "the metrics measured when it was trained")
def list_saes(state: StateDep, name: str) -> list[dict[str, Any]]:
    out = []
    for d in saved_folders(state, name, SAES):
        try:
            meta = json.loads((d / "config.json").read_text(encoding="utf-8"))
            cfg = meta["sae"]
            with safe_open(d / WEIGHTS, "pt") as weights:  # reads the header only: a file cut short or garbage
                weights.keys()
            out.append({"name": d.name, **{k: cfg[k] for k in ("kind", "stream", "n_features", "d_in", "k")},
                        "metrics": meta.get("metrics")})
        except (OSError, ValueError, KeyError, TypeError, SafetensorError):
            continue  # not an SAE (or a broken one): nothing to offer
    return out


def first_ids(tok: Any, text: str, n: int) -> list[int]:
    """tok.encode(text)[:n], encoding only a prefix of the text that holds them (a book can be 100 MiB: the
    whole of it once took 6.7 GB in the server process): 4 characters a token to start with, doubled until
    the prefix gives more than n. The prefix ends before a whitespace (data.text_sample), where no tokenizer here
    joins two pieces into one token, so its tokens are the text's (a prefix with no whitespace is cut where it
    ends: the tokens next to the cut may differ from the whole text's)."""
    end = 4 * n
    while end < len(text):
        ids = tok.encode(text_sample(text, end))
        if len(ids) > n:
            return ids[:n]
        end *= 2
    return tok.encode(text)[:n]


@router.post("/models/{name}/saes/{sae}/browse", tags=["models"],
             responses={404: {"description": "an unknown model, SAE or book"},
                        409: {"description": "an SAE that does not fit the model or cannot be loaded"},
                        422: {"description": "a book too short for one window, or features out of range"}},
             summary="feature cards of a saved SAE over a book: top activating contexts, the tokens each feature "
                     "fires on, the tokens its decoder direction promotes and suppresses")
def browse_sae(state: StateDep, name: str, sae: str, req: SAEBrowse) -> dict[str, Any]:
    folder = saved_folder(state, name, SAES, sae, "sparse autoencoder")
    model, tok = _private(state, name)
    try:
        auto = load_sae(folder)
    # SafetensorError (a file that is no safetensors) is neither an OSError nor a ValueError
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, SafetensorError) as exc:
        raise HTTPException(409, f"sparse autoencoder {sae!r} cannot be loaded: {exc}") from None
    if auto.cfg.d_in != model.config.n_embd or not 0 <= auto.cfg.stream <= model.config.n_layer:
        raise HTTPException(409, f"sparse autoencoder {sae!r} reads a stream of width {auto.cfg.d_in} at stream "
                                 f"{auto.cfg.stream}; the model has width {model.config.n_embd} and streams "
                                 f"0..{model.config.n_layer}")
    bad = [f for f in req.features or () if not 0 <= f < auto.cfg.n_features]
    if bad:
        raise Problem(422, "sae_feature_range", f"feature {bad[0]} out of range: the SAE has features "
                      f"0..{auto.cfg.n_features - 1}", feature=bad[0], last=auto.cfg.n_features - 1)
    _, text = book_full_text(state, req.book)
    T = model.config.block_size
    ids = first_ids(tok, text, req.tokens)
    if len(ids) < T:
        raise Problem(422, "book_too_short", f"book {req.book!r} gives {len(ids)} tokens, fewer than one window of "
                      f"{T}", name=req.book, tokens=len(ids), window=T)
    x = torch.tensor([ids[i:i + T] for i in range(0, len(ids) - T + 1, T)])
    acts = stream_activations(model, x, auto.cfg.stream)                      # (n, T, d)
    with torch.no_grad():
        freq = (auto.encode(acts.flatten(0, 1)) > 0).float().mean(0)
    alive = [int(i) for i in (freq > 0).nonzero().flatten()]
    # as the SAE's report.html: a seeded sample of the features that fire here, unless features are asked for
    shown = req.features or sorted(np.random.default_rng(0).choice(alive, min(req.count, len(alive)),
                                                                   replace=False).tolist())
    return {"model": name, "sae": sae, "book": req.book, "stream": auto.cfg.stream, "tokens": int(x.numel()),
            "alive": len(alive), "n_features": auto.cfg.n_features,
            "features": feature_browser(auto, model, tok, x, acts, shown) if shown else []}
