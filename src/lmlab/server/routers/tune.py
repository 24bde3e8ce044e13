"""/api/v1/datasets and /api/v1/runs/tune: fine-tuning in the web app (docs/TUNE.md; the Tune view).

Datasets are JSONL files of the workspace, `datasets/NAME.jsonl`, each of one kind: conversations, prompt–completion
pairs (both for SFT), preference pairs (DPO, IPO, SimPO, ORPO) or labelled completions (KTO). An upload is checked
by the reader the run uses (lmlab.tune.data, lmlab.tune.preference) before anything is stored: a bad file is a 422
with the reader's one line naming the line. Its kind and count are kept beside it in `datasets/.NAME.jsonl.json`.
A preview shows, for a chosen model, the ids an example becomes and which of them are trained: the chat renderer's
mask (lmlab.tune.chat.render) for conversations, exactly as `lmlab tune sft` builds its examples
(tune.sft.encode_examples), or the scored completion of a preference example (tune.preference.render).

A fine-tuning run is `lmlab tune sft | dpo --loss L | grpo --task T` (commands.tune_command) under the supervisor,
from a trained model into a new one (or `lmlab tune distill`: the trained model teaches a new student of a preset
on books of the workspace), registered when it completes as self-play's is (jobs.Supervisor). It reads
its own copy of the dataset (runs/run-N/dataset.jsonl, a hard link where the file system has them), so the
workspace's dataset can be replaced or deleted while the run is stopped and it still resumes on its data.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Annotated, Any, Literal

import torch
from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile

from ...data.jsonl import read_jsonl
from ...files import atomic_write_text
from ...models import ModelConfig, Transformer, preset_names
from ...models.quant import QUANTIZATION
from ...tokenizers import Tokenizer
from ...tune.chat import with_chat_tokens
from ...tune.data import check_conversation, check_sft_example
from ...tune.grpo import PromptSource
from ...tune.lora import LoRAConfig, apply_lora, parse_targets
from ...tune.preference import fit, read_examples
from ...tune.preference import render as render_completion
from ...tune.rewards import TASKS, get_task
from ...tune.sft import encode_examples
from ..app import AppState, Problem, StateDep
from ..commands import DATASET, LORA_SETTINGS, TUNE_SETTINGS
from ..schemas import DATASET_KINDS, Dataset, DatasetPreview, Run, TuneCreate
from ..services import (
    bad_settings,
    estimate,
    need_book,
    need_selfplay_models,
    need_trained,
    over_budget,
    receive_upload,
    run_info,
)
from ..workspace import NAME_MAX, BadName, check_name, inside, link_or_copy, remove_entry

log = logging.getLogger("lmlab.server")

router = APIRouter()
META = ".json"  # datasets/.NAME.jsonl.json: the dataset's kind and count
SUFFIX = ".jsonl"
# what each method trains on (dpo: the pairs; its loss kto: labelled completions)
METHOD_KINDS = {"sft": ("conversations", "prompt_completion"), "dpo": ("pairs",), "kto": ("kto",)}
# each method's own defaults where TuneCreate leaves a setting out: a metrics line every step, for the live charts
DEFAULTS = {"sft": {"batch_size": 8, "warmup_steps": 0, "log_every": 1, "eval_every": 0},
            "dpo": {"batch_size": 8, "warmup_steps": 0, "log_every": 1, "loss": "dpo"},
            "grpo": {"prompts_per_step": 4, "group_size": 4, "max_new_tokens": 16, "eval_every": 0, "eval_prompts": 50},
            "distill": {"batch_size": 8, "log_every": 1, "eval_every": 0, "mode": "logits"}}
COMMON = {"method", "model", "new_model", "max_steps", "lr", "seed", "save_every"}
# distill trains a new student whole: no LoRA
OWN = {"sft": {"dataset", *LORA_SETTINGS}, "dpo": {"dataset", "loss", *LORA_SETTINGS}, "grpo": {"task", *LORA_SETTINGS},
       "distill": {"books", "preset"}}


# ---- datasets ---------------------------------------------------------------------------------------

def check_dataset_name(name: str) -> str:
    name = check_name(name, "dataset file name", max_len=200, max_bytes=NAME_MAX - len(f".{META}"), allow_space=True)
    if not name.lower().endswith(SUFFIX):
        raise BadName(f"dataset {name!r} must end in {SUFFIX}", "dataset_suffix", name=name, suffix=SUFFIX)
    return name


def dataset_path(state: AppState, name: str) -> Any:
    return inside(state.ws.datasets, check_dataset_name(name))


def read_dataset(path: Any, kind: str) -> list[tuple[int, Any]]:
    """(line, example) of a file of `kind`, checked by the reader its run uses; ValueError naming the line."""
    if kind == "conversations":
        return read_jsonl(path, check_conversation)
    if kind == "prompt_completion":  # as read_sft reads it: a record with "messages" is a conversation
        def check(record: Any) -> Any:
            what, example = check_sft_example(record)
            if what != "prompt":
                raise ValueError("a conversation in a file of prompt–completion pairs")
            return example
        return read_jsonl(path, check)
    return [(r["line"], r) for r in read_examples(path, kind)]


def dataset_info(state: AppState, name: str) -> dict[str, Any]:
    """The dataset's record (kind, examples, size, created_at), or a problem saying why it has none."""
    path = dataset_path(state, name)
    try:
        meta = json.loads(state.ws.read_bytes(path.parent / f".{name}{META}"))
        return {"name": name, "size": path.stat().st_size, **{k: meta[k] for k in ("kind", "examples", "created_at")}}
    except (OSError, ValueError, KeyError, TypeError):
        return {"name": name, "kind": "", "examples": 0, "size": path.stat().st_size,
                "problem": "no record of its kind: upload it again"}


def need_dataset(state: AppState, name: str) -> dict[str, Any]:
    path = dataset_path(state, name)  # a bad name: BadName, a 400 (app.py)
    if not path.is_file():
        raise Problem(404, "dataset_not_found", f"dataset {name!r} not found", name=name)
    return dataset_info(state, name)


@router.get("/datasets", tags=["tune"], response_model=list[Dataset], summary="the workspace's fine-tuning datasets")
def list_datasets(state: StateDep) -> list[dict[str, Any]]:
    folder = state.ws.datasets
    return [dataset_info(state, p.name) for p in sorted(folder.iterdir())  # any case: A.JSONL is a dataset too
            if p.name.lower().endswith(SUFFIX) and not p.name.startswith(".") and p.is_file() and not p.is_symlink()
            and _usable_name(p.name)]


def _usable_name(name: str) -> bool:
    """A file put there by hand whose name the API cannot take ("my data?.jsonl") is not listed: it failed the
    whole listing, and could be neither opened nor deleted."""
    try:
        return check_dataset_name(name) == name
    except BadName:
        log.warning("not listing datasets/%s: its name is not one the API takes", name)
        return False


@router.post("/datasets", tags=["tune"], status_code=201, response_model=Dataset,
             responses={409: {"description": "a dataset of that name exists (overwrite=true replaces it)"},
                        413: {"description": "larger than the upload limit"},
                        422: {"description": "not a valid file of its kind: the reason, naming the line"}},
             summary="upload a JSONL dataset of a kind: conversations, prompt_completion, pairs or kto")
def upload_dataset(state: StateDep, file: Annotated[UploadFile, File()],
                   kind: Annotated[Literal["conversations", "prompt_completion", "pairs", "kto"], Form()],
                   overwrite: bool = Query(False)) -> dict[str, Any]:
    target = dataset_path(state, file.filename or "")
    name = target.name
    record = target.parent / f".{name}{META}"

    def need_new() -> None:
        if target.exists() and not overwrite:
            raise Problem(409, "dataset_exists", f"a dataset named {name!r} already exists; delete it first or "
                          "upload with overwrite=true", name=name)
        for entry in (target, record):  # a folder (or a link) there: os.replace would fail on it (a 500)
            if entry.is_symlink() or (entry.exists() and not entry.is_file()):
                raise HTTPException(409, f"datasets/{entry.name} is not a file; remove it, or choose another name")

    need_new()  # before the reading; again below, under the lock (another upload of the name may end first)
    tmp = state.ws.tmp / f"upload-{uuid.uuid4().hex}{SUFFIX}"
    try:
        receive_upload(state, file, name, tmp)
        try:
            examples = len(read_dataset(tmp, kind))
        except ValueError as exc:  # the reader's line names the file: the user's name, not the server's temp file
            why = str(exc).replace(str(tmp), name)
            raise Problem(422, "dataset_invalid", why, name=name, reason=why) from None
        meta = json.dumps({"kind": kind, "examples": examples, "created_at": time.time()})
        # a run never reads this file after it was queued (it has its own copy): replaced at any time
        meta_tmp = tmp.with_suffix(".meta")
        meta_tmp.write_text(meta, encoding="utf-8")
        with state.lock:  # the record and the file of one upload, not of two that end together
            need_new()
            old = record.read_text(encoding="utf-8") if record.is_file() else None
            os.replace(meta_tmp, record)
            try:
                os.replace(tmp, target)
            except BaseException:  # the old file stays: so does its record (the new kind over the old data misnamed it)
                if old is None:
                    record.unlink(missing_ok=True)
                else:
                    atomic_write_text(record, old)
                raise
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_suffix(".meta").unlink(missing_ok=True)
    return dataset_info(state, name)


@router.delete("/datasets/{name}", tags=["tune"], status_code=204)
def delete_dataset(state: StateDep, name: str) -> Response:
    need_dataset(state, name)
    path = dataset_path(state, name)
    remove_entry(path)
    remove_entry(path.parent / f".{name}{META}")
    return Response(status_code=204)


# Examples a preview tokenises for its counts: a GET must not tokenise a whole dataset in the server process (an
# upload of 100 MiB is 3 million short examples); a run's start still checks them all
PREVIEW_COUNTED = 2000


@router.get("/datasets/{name}/preview", tags=["tune"], response_model=DatasetPreview,
            responses={409: {"description": "an untrained model"},
                       422: {"description": "an example that leaves nothing to train on in the model's context"}},
            summary="the first examples as the model's tokens, with which of them are trained (the mask), and the "
                    "trained and truncated counts of the dataset's first 2000 examples (counted)")
def preview_dataset(state: StateDep, name: str, model: str = Query(..., max_length=100),
                    rows: int = Query(5, ge=1, le=50)) -> DatasetPreview:
    info = need_dataset(state, name)
    if not info["kind"]:
        raise HTTPException(409, f"dataset {name!r} has {info['problem']}")
    examples, added, out = examine(need_trained(state, model, "the model to preview with"),
                                   dataset_path(state, name), name, info["kind"], rows, count=PREVIEW_COUNTED)
    return DatasetPreview(name=name, kind=info["kind"], model=model, examples=len(examples),
                          counted=min(len(examples), PREVIEW_COUNTED), added_tokens=added, **out)


def _row(tok: Tokenizer, line: int, side: str, ids: list[int], mask: list[int], cut: bool) -> dict[str, Any]:
    pieces = tok.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return {"line": line, "side": side, "ids": ids, "mask": mask, "truncated": cut,
            "tokens": [{"text": p, "trained": bool(m)} for p, m in zip(pieces, mask)]}


REMEDY = "shorten it: the model's context holds no more"  # the web app sets no --seq-len


def sft_rows(examples: list[tuple[int, Any]], kind: str, tok: Tokenizer, block: int, n: int,
             name: str = "data", completion_only: bool = False) -> dict[str, Any]:
    """What `lmlab tune sft` trains on: its examples (encode_examples) over the whole file for the counts, the
    first `n` shown; an example is cut to block + 1 ids (the model's inputs and targets)."""
    found = "messages" if kind == "conversations" else "prompt"
    encode = lambda rows: encode_examples(found, rows, tok, block, path=name,  # noqa: E731 (errors name the line)
                                          completion_only=completion_only, remedy=REMEDY)
    encoded, truncated = encode(examples)
    shown = [_row(tok, e.line, "", e.ids.tolist(), e.mask.astype(int).tolist(), encode([ex])[1] > 0)
             for e, ex in zip(encoded[:n], examples)]
    return {"context": block + 1, "supervised_tokens": int(sum(e.mask.sum() for e in encoded)),
            "truncated": truncated, "rows": shown}


def preference_rows(examples: list[tuple[int, Any]], kind: str, tok: Tokenizer, block: int, n: int,
                    name: str) -> dict[str, Any]:
    """What `lmlab tune dpo` scores: each completion's tokens and the EOS after them (tune.preference.render),
    after its prompt, whose first tokens go when the two are longer than the context."""
    shown, supervised, truncated = [], 0, 0
    for i, (line, r) in enumerate(examples):
        sides = ([("chosen", r["chosen"]), ("rejected", r["rejected"])] if kind == "pairs" else
                 [("desirable" if r["label"] else "undesirable", r["completion"])])
        cut_any = False
        for side, completion in sides:  # as the run packs them (a prompt merged into its completion: refused)
            p, c = render_completion(tok, r["prompt"], completion)
            p, cut = fit(p, c, block, f"{name}:{line}")
            cut_any |= cut
            supervised += len(c)
            if i < n:
                shown.append(_row(tok, line, side, p + c, [0] * len(p) + [1] * len(c), cut))
        truncated += cut_any
    return {"context": block, "supervised_tokens": supervised, "truncated": truncated, "rows": shown}


def examine(model_dir: Any, data: Any, name: str, kind: str, n: int, completion_only: bool = False,
            count: int | None = None) -> tuple[list[tuple[int, Any]], list[str], dict[str, Any]]:
    """A dataset as a run on the model reads it: its examples, the chat tokens added to the tokenizer, and
    sft_rows' or preference_rows' counts over the first `count` examples (all by default) with the first `n`
    rows. What the run would refuse at its start (an example with nothing to train on in the context, a pair whose
    prompt has no token of its own) is a 422 naming the dataset's line: for the preview (in the examples it
    counts), and for a run before it is queued (in all)."""
    tok = Tokenizer.load(model_dir / "tokenizer.json")
    block = ModelConfig.load(model_dir / "config.json").block_size
    added: list[str] = []
    try:
        examples = read_dataset(data, kind)
        if kind == "conversations":
            tok, added = with_chat_tokens(tok)  # as `lmlab tune sft` adds them
        counted = examples[:count]
        out = (sft_rows(counted, kind, tok, block, n, name, completion_only) if kind in METHOD_KINDS["sft"] else
               preference_rows(counted, kind, tok, block, n, name))
    except ValueError as exc:
        why = str(exc).replace(str(data), name)
        raise Problem(422, "dataset_invalid", why, name=name, reason=why) from None
    return examples, added, out


# ---- runs -------------------------------------------------------------------------------------------

@router.get("/tune/options", tags=["tune"],
            summary="what a fine-tuning run can be: methods, losses, tasks, kinds, student presets")
def tune_options() -> dict[str, Any]:
    return {"methods": list(TUNE_SETTINGS), "losses": ["dpo", "ipo", "simpo", "orpo", "kto"], "tasks": list(TASKS),
            "kinds": list(DATASET_KINDS), "method_kinds": METHOD_KINDS, "defaults": DEFAULTS,
            "presets": preset_names()}


@router.post("/runs/tune", tags=["tune"], status_code=201, response_model=Run,
             responses={400: {"description": "a name that may not become a file name"},
                        404: {"description": "an unknown model or dataset"},
                        409: {"description": "a model that is untrained, in training, or a name already taken"},
                        422: {"description": "settings that do not fit the method, data of the wrong kind, or a run "
                                             "over the memory budget"}},
             summary="start fine-tuning (sft, dpo with a loss, grpo on a task; LoRA optional) into a new model, or "
                     "distillation of the model into a new student")
def create_tune_run(state: StateDep, req: TuneCreate) -> Run:
    given = req.model_dump(exclude_none=True)
    allowed = COMMON | OWN[req.method] | set(TUNE_SETTINGS[req.method])
    foreign = [k for k in given if k not in allowed]
    if foreign:
        verb = "is not a setting" if len(foreign) == 1 else "are not settings"
        raise HTTPException(422, f"{', '.join(foreign)} {verb} of {req.method} runs")
    params = {**DEFAULTS[req.method], **given}
    if req.method == "grpo" and params.get("task") not in TASKS:
        raise HTTPException(422, f"task ({params.get('task')!r}) must be one of {', '.join(TASKS)}")
    if req.method in ("sft", "dpo") and not req.dataset:
        raise HTTPException(422, f"{req.method} needs a dataset")
    if req.method == "distill":
        if not req.books or not req.preset:
            raise HTTPException(422, "distill needs books and the student's preset")
        if req.preset not in preset_names():
            raise HTTPException(422, f"preset ({req.preset!r}) is unknown; choose one of {', '.join(preset_names())}")
    if params.get("sft_weight") and params.get("loss") in ("orpo", "kto"):
        raise HTTPException(422, f"sft_weight is for the dpo, ipo and simpo losses, not {params['loss']}")
    # a 0 given is given, as `lmlab tune` takes it (lora_dropout 0 without a rank reached the run, which refused it
    # as it started); lora_hard_tokens 0 is its off
    lora = {k: v for k in (*LORA_SETTINGS, "lora_hard_tokens") if (v := params.get(k)) is not None and v is not False
            and (k != "lora_hard_tokens" or v)}
    if lora and "lora_rank" not in lora:
        raise Problem(422, "lora_needs_rank", f"{', '.join(lora)} needs lora_rank", settings=", ".join(lora))
    if req.method == "grpo" and params.get("lora_dropout"):  # what `tune grpo` refuses, refused before it starts
        raise Problem(422, "lora_dropout_grpo", "lora_dropout does not apply to grpo: it scores the policy with "
                      "dropout off, as it samples")
    new = check_name(req.new_model, "new model name")
    if req.dataset:  # the examples as the run will read them, outside the lock (a large file takes a while)
        kind = need_dataset(state, req.dataset)["kind"]
        if kind in METHOD_KINDS["kto" if params.get("loss") == "kto" else req.method]:
            examine(need_trained(state, req.model, "the model a fine-tuning run starts from"),
                    dataset_path(state, req.dataset), req.dataset, kind, 0, bool(params.get("completion_only")))
    with state.lock:  # from the checks through add_run: see Supervisor.lock
        path, _ = need_selfplay_models(state, req.model, None, new, role="the teacher" if req.method == "distill" else
                                       "the model a fine-tuning run starts from")
        for book in req.books or ():
            need_book(state, book)
        if req.dataset:
            kind = need_dataset(state, req.dataset)["kind"]
            how = "kto" if params.get("loss") == "kto" else req.method
            if kind not in METHOD_KINDS[how]:
                raise HTTPException(422, f"dataset {req.dataset!r} holds {kind or 'unknown'} data; {how} trains on "
                                         f"{' or '.join(METHOD_KINDS[how])}")
            if params.get("completion_only") and kind != "prompt_completion":
                raise HTTPException(422, "completion_only is for prompt_completion data; conversations train on "
                                         "the assistant turns")
        if req.method != "distill" and (path / QUANTIZATION).is_file():  # the run's own refusal, up front
            raise Problem(422, "quantized_cannot_train", f"model {req.model!r} is an int8/int4 model, which cannot "
                          "train; fine-tune the model it was quantized from", name=req.model)
        cfg = ModelConfig.load(path / "config.json")
        if req.method == "grpo":  # its prompts and max_new_tokens in the model's context, as the run checks them
            try:
                task = get_task(params["task"])
                PromptSource(Tokenizer.load(path / "tokenizer.json"), cfg.block_size, params["max_new_tokens"],
                             task=task, heldout=task.heldout(params["eval_prompts"]))
            except ValueError as exc:
                raise bad_settings(exc) from None
        if params.get("lora_rank"):  # a target the model lacks, a rank above its matrices: the run's own checks,
            try:                     # on a weightless copy
                with torch.device("meta"):
                    apply_lora(Transformer(cfg), LoRAConfig(rank=params["lora_rank"],
                                                            targets=parse_targets(params.get("lora_targets"))))
            except ValueError as exc:
                raise bad_settings(exc) from None
        batch = (params["group_size"] * params["prompts_per_step"] if req.method == "grpo" else
                 params["batch_size"] * (2 if req.method == "dpo" else 1))  # dpo: chosen and rejected rows
        if req.method == "distill":  # the student trains, not the teacher: as `lmlab tune distill` checks it, a
            # new student of the preset at the teacher's window (its longest that the teacher can score)
            est = estimate(ModelConfig.preset(req.preset, vocab_size=cfg.vocab_size), batch, state.memory_budget,
                           seq_len=cfg.block_size)
        else:
            est = estimate(cfg, batch, state.memory_budget)
        if not est.fits:
            raise over_budget(est)
        # its steps go on from the starting model's; a distilled student is new
        start = {} if req.method == "distill" else state.db.get_model(req.model)
        run = state.db.add_run(req.model, req.books or [], params, True, req.max_steps, kind="tune",
                               parent_run_id=start.get("trained_run_id"), step_offset=start.get("trained_steps") or 0)
        if req.dataset:  # the run's own copy: what it trains on, and resumes on
            try:  # a link where the run's folder or its copy goes is refused (LinkError: 409), the run undone
                state.ws.run_dir(run["id"]).mkdir(parents=True, exist_ok=True)
                link_or_copy(dataset_path(state, req.dataset), state.ws.run_dir(run["id"]) / DATASET)
            except BaseException:
                state.db.delete_run(run["id"])
                raise
    state.supervisor.submit(run["id"])
    return run_info(state, run)
