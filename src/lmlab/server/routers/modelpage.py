"""A model's page: its card (size on disk, bits per weight, parameters, how it was made, measured decoding
speed) and the actions that make a new model from it as a job of the supervisor: quantization (`lmlab
quantize`, commands.DERIVED) into a new model of the workspace, the model itself left as it was.

Bits per weight are counted from model.safetensors' own header: every tensor's elements times its dtype's
bits (int4 is stored as uint8 holding two), over the model's parameters (a tied embedding once), so scales,
zeros and what stays fp32 count, as llama.cpp counts a file's bits per weight. Tokens per second are only
ever a measurement of these weights on this server (POST .../speed): stored beside the weights in the model's
folder (SPEED_FILE), which a new version of the model replaces whole (workspace.swap_dir), and shown only
while the weights it measured are still the model's."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from fastapi import APIRouter, HTTPException
from safetensors import SafetensorError
from tokenizers import Tokenizer as HFTokenizer

from ...files import atomic_write_text
from ...models import ModelConfig, Transformer
from ...models.generation import generate_ids
from ...models.io import TRAINING, WEIGHTS
from ...models.merge import NEEDS_BASE, check_parameters, check_parents
from ...models.quant import (
    FORMATS,
    GROUP_SIZES,
    METHODS,
    QUANTIZATION,
    QuantConfig,
    check_shapes,
    plan_modules,
    weight_bits,
)
from ...tokenizers import Tokenizer
from ...tune.chat import TEMPLATE, TEMPLATE_FILE, chat_token_ids, fit_history, has_template
from ..app import AppState, Problem, StateDep
from ..schemas import ChatFit, MergeCreate, ModelCard, QuantizeCreate, Run, Speed
from ..services import (
    bad_settings,
    cached_model,
    need_book,
    need_free_model_name,
    need_model,
    need_trained,
    need_unused,
    run_info,
)
from ..workspace import SPEED_FILE, LinkError, check_name

router = APIRouter()
SPEED_TOKENS = 32  # a short decode: enough steps that the prompt's forward and the warm-up do not dominate


# ---- quantization as a job ------------------------------------------------------------------------

@router.post("/chat/fit", tags=["models"], summary="how many of a conversation's oldest messages to leave out")
def chat_fit(state: StateDep, req: ChatFit) -> dict[str, int]:
    """{"drop": N}: the Chat view leaves out the first N messages after the system prompt (whole rounds, oldest
    first) so that the prompt and `max_tokens` (a quarter of the context when not given) fit in the model's
    context, as `lmlab chat` does (tune.chat.fit_history). 422 when the last message alone does not fit."""
    path = need_trained(state, req.model, "the model to chat with")
    if not has_template(path):
        raise HTTPException(409, f"model {req.model!r} has no lmlab chat template")
    block = ModelConfig.load(path / "config.json").block_size
    if req.max_tokens is not None and req.max_tokens >= block:
        raise Problem(422, "chat_no_room", f"max_tokens ({req.max_tokens}) leaves no room for the conversation in "
                      f"the model's context of {block} tokens; ask for fewer", max_tokens=req.max_tokens, block=block)
    room = block - (req.max_tokens or max(block // 4, 1))
    messages = [m.model_dump() for m in req.messages]
    try:
        kept = fit_history(messages, Tokenizer.load(path / "tokenizer.json"), room)
    except ValueError as exc:  # the last message alone does not fit (the messages are checked by ChatFit)
        raise Problem(422, "chat_too_long", str(exc), room=room) from None
    return {"drop": len(messages) - len(kept)}


@router.post("/runs/quantize", tags=["models"], status_code=201, response_model=Run,
             responses={404: {"description": "an unknown model or book"},
                        409: {"description": "an untrained or already quantized model, a model in training, a "
                                             "name that is taken"},
                        422: {"description": "a format, group size, method or calibration that does not fit"}},
             summary="quantize a trained model (`lmlab quantize`) into a new model of the workspace")
def create_quantize_run(state: StateDep, req: QuantizeCreate) -> Run:
    if req.to not in FORMATS:
        raise HTTPException(422, f"to ({req.to!r}) must be {' or '.join(FORMATS)}")
    if req.method not in METHODS:
        raise HTTPException(422, f"method ({req.method!r}) must be {' or '.join(METHODS)}")
    if req.to == "int8" and req.group_size is not None:
        raise HTTPException(422, "group_size is for int4; int8 has one scale per output row")
    if req.to == "int4" and req.group_size not in (None, *GROUP_SIZES):
        raise HTTPException(422, f"group_size ({req.group_size}) must be one of {', '.join(map(str, GROUP_SIZES))}")
    if req.method == "gptq" and not req.calibration:
        raise Problem(422, "gptq_needs_calibration", "method gptq needs calibration: books to measure the layers' "
                      "inputs on")
    if req.method == "rtn" and req.calibration:
        raise HTTPException(422, "calibration is used by method gptq only")
    if len(set(req.calibration)) != len(req.calibration):
        raise HTTPException(422, "a calibration book is listed twice")
    new = check_name(req.new_model, "new model name")
    with state.lock:  # from the checks through add_run: see Supervisor.lock
        path = need_trained(state, req.model, "the model to quantize")
        if (path / QUANTIZATION).is_file():
            raise HTTPException(409, f"model {req.model!r} is already quantized; quantize the model it was made from")
        if req.to == "int4":  # a width the group size does not divide: the job's own check, on a weightless copy
            with torch.device("meta"):
                skeleton = Transformer(ModelConfig.load(path / "config.json"))
            try:
                check_shapes(skeleton, plan_modules(skeleton, req.keep_head)[0], 4, req.group_size or 32)
            except ValueError as exc:
                raise bad_settings(str(exc).replace("--group-size", "group_size")) from None
        for book in req.calibration:
            need_book(state, book)
        need_free_model_name(state, new, "; choose another name for the new model")
        # a model in training gets new weights when the run ends, under the quantization's feet
        need_unused(state, req.model, lambda r: r["kind"] == "train")
        source = state.db.get_model(req.model)
        params = {"new_model": new, "to": req.to, "group_size": (req.group_size or 32) if req.to == "int4" else None,
                  "method": req.method, "calibration": list(req.calibration), "keep_head": req.keep_head}
        run = state.db.add_run(req.model, [], params, False, None, kind="quantize",
                               parent_run_id=source["trained_run_id"], step_offset=source["trained_steps"] or 0)
    state.supervisor.submit(run["id"])
    return run_info(state, run)


# ---- merging as a job -----------------------------------------------------------------------------

@router.post("/runs/merge", tags=["models"], status_code=201, response_model=Run,
             responses={404: {"description": "an unknown model"},
                        409: {"description": "an untrained parent, a model in training, a name that is taken"},
                        422: {"description": "a method or parameters that do not fit, parents that cannot merge "
                                             "(another architecture or tokenizer, quantized)"}},
             summary="merge trained models (`lmlab merge`) into a new model of the workspace")
def create_merge_run(state: StateDep, req: MergeCreate) -> Run:
    parents = [req.model, *req.others]
    try:
        check_parameters(req.method, len(parents), req.base, req.weights, t=req.t, density=req.density,
                         lam=req.lam, seed=req.seed)
    except ValueError as exc:
        raise bad_settings(str(exc).replace("--base BASE", "base").replace("--", "")) from None
    new = check_name(req.new_model, "new model name")
    with state.lock:  # from the checks through add_run: see Supervisor.lock
        paths = [need_trained(state, m, "every model to merge") for m in [*parents, *([req.base] if req.base else [])]]
        try:
            check_parents(paths)
        except ValueError as exc:  # named by model, not by the workspace's folders
            why = str(exc).replace(str(state.ws.models) + "/", "model ")
            raise Problem(422, "merge_refused", why, reason=why) from None
        need_free_model_name(state, new, "; choose another name for the new model")
        for m in {*parents, *([req.base] if req.base else [])}:  # new weights under the merge's feet
            need_unused(state, m, lambda r: r["kind"] == "train")
        source = state.db.get_model(req.model)
        uses = {"t": req.method == "slerp", "density": req.method in ("ties", "dare"),
                "lambda": req.method in NEEDS_BASE, "seed": req.method == "dare"}
        given = {"t": req.t, "density": req.density, "lambda": req.lam, "seed": req.seed}
        params = {"new_model": new, "others": list(req.others), "method": req.method, "base": req.base,
                  "weights": req.weights, **{k: v if uses[k] else None for k, v in given.items()}}
        run = state.db.add_run(req.model, [], params, False, None, kind="merge",
                               parent_run_id=source["trained_run_id"], step_offset=source["trained_steps"] or 0)
    state.supervisor.submit(run["id"])
    return run_info(state, run)


# ---- the card -------------------------------------------------------------------------------------

def made(state: AppState, row: dict[str, Any], path: Path, trained: bool, qc: QuantConfig | None) -> dict[str, Any]:
    """How the model came to be: quantized or self-played from another model of the workspace (its origin),
    tuned (training.json of `lmlab tune`), trained (its steps), or untrained."""
    origin = row["origin"] or {}
    if origin.get("kind") == "quantize" and origin.get("run_id") == row["trained_run_id"]:
        return {"how": "quantized", "from": origin["parent"], "run": origin["run_id"]}
    if origin.get("kind") == "merge" and origin.get("run_id") == row["trained_run_id"]:
        return {"how": "merged", "from": [origin["parent"], *origin["others"]], "method": origin["method"],
                "run": origin["run_id"]}
    if origin.get("kind") == "selfplay" and origin.get("run_id") == row["trained_run_id"]:
        return {"how": "selfplay", "from": origin["parent"], "run": origin["run_id"], "reward": origin.get("reward")}
    if not trained:
        return {"how": "untrained"}
    if qc is not None:  # quantized outside the server; a tuned model's quantization keeps its training.json
        return {"how": "quantized", "from": Path(qc.source).name if qc.source else None, "run": None}
    try:
        training = json.loads(state.ws.read_bytes(path / TRAINING))
    except (OSError, LinkError, ValueError):
        training = {}
    tuned = next((k for k in ("sft", "preference", "grpo") if isinstance(training.get(k), dict)), None)
    if tuned:
        base = training[tuned].get("base") or training[tuned].get("model") or training.get("init")  # grpo: init
        if base and Path(base).parent == state.ws.models.resolve():  # a model of this workspace: its name
            base = Path(base).name
        return {"how": "tuned", "mode": tuned, "from": base,
                "steps": training.get("steps"), "run": row["trained_run_id"]}
    return {"how": "trained", "steps": row["trained_steps"], "run": row["trained_run_id"]}


def quantization(path: Path) -> QuantConfig | str | None:
    """The model's quantization.json (None: fp32), or why it does not read."""
    if not (path / QUANTIZATION).is_file():
        return None
    try:
        return QuantConfig.load(path / QUANTIZATION)
    except (OSError, ValueError, TypeError) as exc:
        return f"unreadable {QUANTIZATION}: {exc}"


def weights_format(qc: QuantConfig | str | None) -> str:
    if qc is None or isinstance(qc, str):
        return qc or "fp32"
    return f"int{qc.bits}" + (f" g{qc.group_size}" if qc.group_size else "") + f" {qc.method}"


def stamp(path: Path) -> list[int]:
    """What tells these weights from others written later (as the model cache tells them: inference.py)."""
    st = (path / WEIGHTS).stat()
    return [st.st_mtime_ns, st.st_size]


def stored_speed(state: AppState, path: Path) -> Speed | None:
    """The last measurement of the model's current weights; None when there is none or it measured others."""
    try:
        data = json.loads(state.ws.read_bytes(path / SPEED_FILE))
        return Speed(**data["speed"]) if data["weights"] == stamp(path) else None
    except (OSError, LinkError, ValueError, KeyError, TypeError):
        return None


def speaks_chat(state: AppState, path: Path) -> bool:
    """Whether the chat route serves the model (openai.render_chat): lmlab's template, and a tokenizer with the
    chat tokens the template names. The template alone, written beside a model never fine-tuned on conversations,
    offered the Chat tab a model whose every message failed."""
    try:
        if state.ws.read_bytes(path / TEMPLATE_FILE) != TEMPLATE.encode():
            return False
        chat_token_ids(Tokenizer(HFTokenizer.from_str(state.ws.read_bytes(path / "tokenizer.json").decode())))
    except Exception:  # noqa: BLE001 - OSError, LinkError, ValueError, and the plain Exception tokenizers raises
        return False
    return True


def model_card(state: AppState, name: str) -> ModelCard:
    row = need_model(state, name)
    try:
        path = state.ws.model_path(name)
    except LinkError as exc:
        raise HTTPException(409, str(exc)) from None
    cfg = ModelConfig.from_dict(row["config"])
    trained = (path / WEIGHTS).is_file() and not (path / WEIGHTS).is_symlink()
    # the model's own files: not the server's note of its measured speed, which would change the size it reports
    size = sum(f.stat().st_size for f in path.iterdir()
               if f.is_file() and not f.is_symlink() and f.name != SPEED_FILE) if path.is_dir() else 0
    try:
        bpw, qbpw = weight_bits(path / WEIGHTS, cfg.num_parameters()) if trained else (None, None)
    except (SafetensorError, OSError, KeyError):  # not a whole safetensors file: loading it says why
        bpw = qbpw = None
    chat = trained and speaks_chat(state, path)
    qc = quantization(path) if trained else None
    return ModelCard(name=name, trained=trained, size_bytes=size, parameters=cfg.num_parameters(),
                     weights=weights_format(qc), bits_per_weight=bpw, quantized_bits_per_weight=qbpw,
                     made=made(state, row, path, trained, qc if isinstance(qc, QuantConfig) else None), chat=chat,
                     speed=stored_speed(state, path) if trained else None)


@router.get("/cards", tags=["models"], response_model=list[ModelCard],
            summary="every model's card: size on disk, bits per weight, parameters, how it was made, measured "
                    "tokens/s, whether it chats")
def list_cards(state: StateDep) -> list[ModelCard]:
    out = []
    for row in state.db.list_models():
        try:
            out.append(model_card(state, row["name"]))
        except HTTPException:  # an unusable folder: listed in /models with its problem
            continue
    return out


@router.get("/models/{name}/card", tags=["models"], response_model=ModelCard)
def get_card(state: StateDep, name: str) -> ModelCard:
    return model_card(state, name)


@router.post("/models/{name}/speed", tags=["models"], response_model=ModelCard,
             responses={409: {"description": "an untrained model"}},
             summary="measure tokens/s: a greedy decode of 32 tokens from <BOS>, batch 1, on the server's threads; "
                     "stored with the model")
def measure_speed(state: StateDep, name: str) -> ModelCard:
    path = need_trained(state, name, "a model to measure")
    weights = stamp(path)
    model, tok = cached_model(state, name, path)
    n = min(SPEED_TOKENS, model.config.block_size - 1)
    if state.settings.torch_threads:  # OpenMP's thread count is per thread: this request's worker gets the server's
        torch.set_num_threads(state.settings.torch_threads)
    prompt = [[tok.bos_id]]
    generate_ids(model, prompt, max_new_tokens=2, do_sample=False, eos_token_id=None)  # warm-up: first-call costs
    t0 = time.perf_counter()
    ids = generate_ids(model, prompt, max_new_tokens=n, do_sample=False, eos_token_id=None)[0]
    elapsed = time.perf_counter() - t0
    speed = Speed(tokens_per_s=round(len(ids) / elapsed, 1), new_tokens=len(ids), elapsed_s=round(elapsed, 4),
                  threads=torch.get_num_threads(), measured_at=time.time())
    if stamp(path) == weights:  # a new version swapped in meanwhile was not what was measured
        atomic_write_text(path / SPEED_FILE, json.dumps({"weights": weights, "speed": speed.model_dump()}) + "\n")
    return model_card(state, name)
