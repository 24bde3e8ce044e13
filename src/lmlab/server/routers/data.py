"""/api/v1/books/{name}/data/...: the Data tab's cards for one book, computed on its stored text (the text
extracted at upload, in a child process with limits; the upload itself is never parsed here): what it holds
(language, exact duplicates, tokens for a model, tokens per parameter, the epoch advisor), its duplicate
paragraphs (exact and MinHash near duplicates, clusters with the shingles they share), what the quality
filters would do (receipts, nothing written), and which items of an evaluation task it contains (word n-gram
overlap), and how far the embeddings of the runs trained on it drifted (drift.json of runs that track it). The
same library functions as `lmlab data inspect | dedup | filter | contamination`."""

from __future__ import annotations

import json
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, HTTPException, Query

from ...data.dedup import DedupConfig, dedup_texts, shingles
from ...data.filters import apply_filters, identify, parse_filters
from ...data.inspect import duplicates, epoch_advice, histogram
from ...eval.contamination import contamination
from ...eval.tasks import load_task, solved_text
from ...models import ModelConfig
from ...tokenizers import Tokenizer
from ...train.drift import DRIFT_FILE
from ..app import Problem, StateDep
from ..services import bad_settings, book_full_text, need_book, need_model
from ..workspace import LinkError
from .evals import bad_task, task_files

router = APIRouter()
PREVIEW = 160  # characters of a paragraph shown in a cluster or a contaminated item
MEMBERS = 50   # the members of a duplicate cluster shown (members_total counts them all)
# Characters of a book the overview tokenises: a GET must not tokenise a whole book in the server process (a
# 20 MiB book took 41 s and 6.7 GB there, and under a memory cap the Rust tokenizer aborted the server); past
# this the token count is an estimate from the first paragraphs, scaled by characters
TOKENS_SAMPLE = 1 << 20


@router.get("/books/{name}/data/overview", tags=["data"],
            summary="what a book holds: characters, language, exact duplicates; with a model its tokens, tokens "
                    "per parameter and a paragraph-length histogram (counted on the first 1,048,576 characters "
                    "at most: past that the tokens are an estimate, tokens_estimated); with planned_tokens the "
                    "epoch advisor")
def overview(state: StateDep, name: str, model: str | None = Query(None, max_length=100),
             planned_tokens: int | None = Query(None, ge=1, le=10**13)) -> dict[str, Any]:
    row, text = book_full_text(state, name)
    lang, score = identify(text) if text.strip() else ("und", 0.0)
    out: dict[str, Any] = {"book": name, "characters": len(text), "encoding": row.get("encoding"),
                           "language": lang, "language_score": round(score, 4), **duplicates([text])}
    if planned_tokens is not None and model is None:
        raise Problem(422, "advisor_needs_model", "the epoch advisor counts tokens: choose a model (its tokenizer)")
    if model is not None:
        need_model(state, model)
        path = state.ws.model_path(model)
        if not (path / "tokenizer.json").is_file():
            raise HTTPException(409, f"model {model!r} has no tokenizer yet: train it first")
        tok, cfg = Tokenizer.load(path / "tokenizer.json"), ModelConfig.load(path / "config.json")
        sample = text_sample(text, TOKENS_SAMPLE)
        paragraphs = [p for p in (p.strip() for p in sample.split("\n\n")) if p]
        lengths = [len(ids) for ids in tok.encode_batch(paragraphs)] if paragraphs else []
        tokens = len(tok.encode(sample))
        if len(sample) < len(text):
            tokens = round(tokens * len(text) / len(sample))
        n = cfg.num_parameters()
        # Hoffmann et al. 2022 (Chinchilla): compute-optimal training uses ~20 tokens per parameter
        out.update(model=model, tokens=tokens, tokens_estimated=len(sample) < len(text),
                   tokens_counted_characters=len(sample), parameters=n, tokens_per_parameter=tokens / n,
                   chinchilla_tokens=20 * n, paragraph_histogram=histogram(lengths))
        if planned_tokens is not None:
            out["epoch_advice"] = epoch_advice(tokens, planned_tokens)
    return out


def text_sample(text: str, limit: int) -> str:
    """The text, or its first paragraphs within `limit` characters (its first `limit` characters cut at a
    whitespace when a paragraph is longer): a cut word would be tokens the book does not have."""
    if len(text) <= limit:
        return text
    for sep in ("\n\n", "\n", " "):
        end = text.rfind(sep, 0, limit)
        if end > 0:
            return text[:end]
    return text[:limit]


@router.get("/books/{name}/data/duplicates", tags=["data"],
            summary="exact and near-duplicate paragraphs of a book (MinHash + LSH, as lmlab data dedup --level "
                    "paragraph): statistics and the first clusters, each with the shingles its members share")
def book_duplicates(state: StateDep, name: str, ngram: int = Query(5, ge=1, le=50),
                    bands: int = Query(14, ge=1, le=64), rows: int = Query(8, ge=1, le=64),
                    threshold: float | None = Query(None, ge=0, le=1),
                    limit: int = Query(20, ge=1, le=200)) -> dict[str, Any]:
    _, text = book_full_text(state, name)
    try:  # DedupConfig's own rules over the knobs together (bands x rows within the signature)
        cfg = DedupConfig(level="paragraph", ngram=ngram, bands=bands, rows=rows, threshold=threshold)
    except ValueError as exc:
        raise bad_settings(exc) from None
    res = dedup_texts([text], cfg)
    clusters = []
    for c in res.clusters[:limit]:  # up to MEMBERS of each shown (a cluster of templated text has thousands)
        parts = [text[res.units[u].start:res.units[u].end] for u in c["members"][:MEMBERS]]
        sets = [shingles(p, ngram) for p in parts]
        shared = set.intersection(*sets)
        clusters.append({"id": c["id"], "kind": c["kind"], "pairs": c["pairs"], "pairs_total": c["pairs_total"],
                         "members_total": len(c["members"]),
                         "members": [{"start": res.units[u].start, "end": res.units[u].end, "kept": u in c["kept"],
                                      "jaccard_with_first": round(len(s & sets[0]) / max(1, len(s | sets[0])), 4),
                                      "preview": " ".join(p.split())[:PREVIEW]}
                                     for u, p, s in zip(c["members"][:MEMBERS], parts, sets)],
                         "shared_shingles": len(shared), "shared_examples": sorted(shared)[:10]})
    return {"book": name, "stats": res.stats, "clusters": clusters}


@router.get("/books/{name}/data/filters", tags=["data"],
            summary="what the quality filters would do to a book (as lmlab data filter; nothing is written): "
                    "receipts per filter with the rule, value and limit of each removal")
def book_filters(state: StateDep, name: str,
                 spec: str = Query(..., min_length=1, max_length=500, description="e.g. gopher,c4,fineweb,lang=ru"),
                 level: Literal["document", "paragraph"] = Query("document", description="what the filters judge: "
                                                                 "the whole book, or each paragraph on its own")
                 ) -> dict[str, Any]:
    if "bad_words" in spec:  # a path of the server's file system, read by the server: the CLI's alone
        raise HTTPException(422, "c4's bad_words names a file to read; the server reads no path given in a "
                                 "request: use `lmlab data filter --filters c4:bad_words=FILE` on your machine")
    _, text = book_full_text(state, name)
    try:
        kept, receipts = apply_filters([text], [name], parse_filters(spec, level))
    except ValueError as exc:
        raise bad_settings(exc) from None
    return {"book": name, "spec": spec, "level": level, "kept": kept[0] is not None, **receipts}


@router.get("/books/{name}/data/contamination", tags=["data"],
            summary="which items of an evaluation task the book contains: word n-gram overlap (13 by default, "
                    "as lm-evaluation-harness's decontamination), per contaminated item")
def book_contamination(state: StateDep, name: str, task: str = Query(..., max_length=200),
                       n: int = Query(13, ge=1, le=100)) -> dict[str, Any]:
    _, text = book_full_text(state, name)
    files = task_files(state)
    if task not in files:
        raise HTTPException(404, f"task {task!r} not found")
    try:
        t = load_task(files[task])
    except ValueError as exc:
        raise bad_task(task, exc) from None
    items = [solved_text(t, item) for item in t.items]
    per_item = contamination([text], items, n=n, train_names=[name])
    dirty = [r for r in per_item if r["contaminated"]]
    return {"book": name, "task": task, "n": n, "items": len(items), "contaminated": len(dirty),
            "clean": len(items) - len(dirty),
            "per_item": [{**r, "text": " ".join(items[r["index"]].split())[:PREVIEW]} for r in dirty]}


@router.get("/books/{name}/data/drift", tags=["data"],
            summary="embedding drift of the training runs on this book that track it (lmlab train --drift-every; "
                    "the train form's drift option): per record the mean and largest drift from step 0 and what "
                    "weight decay alone gives; the last record's drift against each token's count in the training "
                    "data (at most `points` tokens, a fixed sample) and the most volatile tokens")
def book_drift(state: StateDep, name: str, points: int = Query(3000, ge=10, le=100_000)) -> dict[str, Any]:
    need_book(state, name)
    runs = []
    for run in state.db.list_runs():
        if run["kind"] != "train" or name not in run["books"]:
            continue
        try:  # never through a symbolic link; a run without drift tracking has no drift.json
            found = json.loads(state.ws.read_bytes(state.ws.run_path(run["id"]) / DRIFT_FILE))
        except (FileNotFoundError, LinkError, json.JSONDecodeError):
            continue
        drift, counts = np.asarray(found["drift"], dtype=np.float64), found.get("counts")
        keep = np.arange(len(drift))
        if len(keep) > points:  # the same sample on every call: the chart does not jump between refreshes
            keep = np.sort(np.random.default_rng(0).choice(len(drift), points, replace=False))
        unseen = np.flatnonzero(np.asarray(counts) == 0) if counts is not None else np.array([], dtype=np.int64)
        runs.append({"id": run["id"], "model": run["model_name"], "status": run["status"],
                     "tied_embeddings": found["tied_embeddings"], "step": found["step"],
                     "records": found["records"], "probes": found["probes"], "volatile": found.get("volatile", []),
                     "vocab_size": len(drift), "mean": float(drift.mean()),
                     "unseen_tokens": len(unseen), "unseen_mean": float(drift[unseen].mean()) if len(unseen) else None,
                     "points": {"count": None if counts is None else [counts[i] for i in keep],
                                "drift": [float(drift[i]) for i in keep]}})
    return {"book": name, "runs": runs}
