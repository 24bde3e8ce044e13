"""Embedding drift and latent volatility (`lmlab lab data drift`): how far each token's embedding row (and the
hidden states of chosen probe texts) moves between checkpoints, against how often the token occurs in training.

    lmlab lab data drift --run runs/demo --out runs/demo-drift --probe "Once upon a time" --token the

Drift of a row is ||e_b - e_a|| / ||e_a|| (relative, so rows of any norm compare). A row whose token never
occurs as an input in training gets no gradient from the input side; AdamW then only decays it
(Loshchilov & Hutter 2019: p <- p (1 - lr_t wd), and Adam's moments stay zero, so its update is exactly 0), so
its drift is exactly 1 - prod_t (1 - lr_t wd): the weight-decay line in the report. That holds for an untied
head only (the llama family): a tied head (gpt, gpt2) hands every row the output-side gradient of the softmax,
which pushes never-seen tokens' logits down, so those rows move more than decay explains.

During training, `lmlab train --drift-every N` (train/drift.py's DriftCallback) records the same per-row drift from
step 0 into RUN_DIR/drift.json (and its metrics `drift/...` into metrics.jsonl); from a finished run, `run_drift`
compares the saved checkpoints (the first is the reference: the Trainer saves no step 0).

Drift against the kind of text (`--kinds DIR`, the folder `lmlab lab data split` wrote: reasoning.txt,
knowledge.txt, noise.txt): each token belongs to the kind that holds at least KIND_SHARE of its occurrences in
those files (else "mixed"; never there: "absent"). Drift grows with frequency, so beside each kind's mean drift
the report gives its mean frequency-adjusted drift: a token's drift over the median drift of all tokens whose
training count falls in the same power-of-two bin (1 = as much as its frequency predicts).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data import TokenDataset
from ..train import TrainConfig, checkpoint_step, checkpoints, lr_at
from ..train.checkpoint import checkpoint_model
from ..train.drift import DriftCallback, decay_drift, last_hidden, row_drift, token_counts
from ..train.trainer import read_run_config
from ..tune.lora import checkpoint_adapters
from .facts.report import _plt, line_plot, save_figure, write_report
from .interp.views import label

__all__ = ["DriftCallback", "decay_drift", "neighbours", "row_drift", "run_drift", "token_counts"]


def neighbours(emb: torch.Tensor, ids: Sequence[int], k: int = 5) -> dict[int, list[int]]:
    """The k nearest rows (cosine) of each id in `ids`, itself excluded."""
    unit = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = unit[list(ids)] @ unit.T
    sims[torch.arange(len(ids)), torch.tensor(list(ids))] = -2.0
    return {i: sims[r].topk(k).indices.tolist() for r, i in enumerate(ids)}


def hidden_drift(model_a: Any, model_b: Any, probes: Sequence[Sequence[int]]) -> list[float]:
    """Per probe text: mean over its positions of the relative change of the last residual stream."""
    return [float(row_drift(last_hidden(model_a, ids), last_hidden(model_b, ids)).mean()) for ids in probes]


KIND_SHARE = 2 / 3


def token_kinds(kind_counts: dict[str, np.ndarray]) -> np.ndarray:
    """Per token id: the kind holding >= KIND_SHARE of its occurrences, "mixed", or "absent" (no occurrence)."""
    names = list(kind_counts)
    table = np.stack([kind_counts[k] for k in names]).astype(np.float64)  # (kinds, V)
    total = table.sum(0)
    best = table.argmax(0)
    out = np.where(total == 0, "absent", "mixed").astype(object)
    strong = (total > 0) & (table[best, np.arange(table.shape[1])] >= KIND_SHARE * total)
    out[strong] = np.array(names, dtype=object)[best[strong]]
    return out


def drift_by_kind(drift: np.ndarray, kinds: np.ndarray, counts: np.ndarray) -> list[dict[str, Any]]:
    """Per kind: tokens, median count, mean drift, and mean drift over the median drift of the tokens in the same
    power-of-two count bin (bins over every token; count 0 is a bin of its own)."""
    bins = np.where(counts > 0, np.floor(np.log2(np.maximum(counts, 1))) + 1, 0).astype(np.int64)
    expected = np.zeros_like(drift)
    for b in np.unique(bins):
        expected[bins == b] = np.median(drift[bins == b])
    adjusted = drift / np.maximum(expected, 1e-30)
    rows = []
    for kind in [k for k in (*sorted(set(kinds) - {"mixed", "absent"}), "mixed", "absent") if (kinds == k).any()]:
        sel = kinds == kind
        rows.append({"kind": kind, "tokens": int(sel.sum()), "median_count": float(np.median(counts[sel])),
                     "mean_drift": float(drift[sel].mean()), "mean_adjusted_drift": float(adjusted[sel].mean())})
    return rows


def split_counts(folder: str | Path, tok: Any, vocab_size: int) -> dict[str, np.ndarray]:
    """Token counts per kind from the text files `lmlab lab data split` wrote."""
    from .split import LABELS
    folder = Path(folder)
    missing = [f"{k}.txt" for k in LABELS if not (folder / f"{k}.txt").is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: give the --out folder of `lmlab lab data split`")
    return {k: np.bincount(np.asarray(tok.encode((folder / f"{k}.txt").read_text(encoding="utf-8")), dtype=np.int64),
                           minlength=vocab_size)[:vocab_size] for k in LABELS}


def _scatter(path: Path, counts: np.ndarray, drift: np.ndarray, decay: float | None, title: str) -> Path:
    fig, ax = _plt().subplots(figsize=(6.4, 4.0), dpi=100)
    ax.scatter(counts + 1, drift, s=6, alpha=0.6)
    if decay is not None:
        ax.axhline(decay, ls="--", color="grey", lw=1, label="weight decay alone (tokens never seen)")
        ax.legend(fontsize=8)
    ax.set(xscale="log", title=title, xlabel="occurrences in the training data + 1", ylabel="relative drift")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def token_name(tok: Any, i: int) -> str:
    """Token i as the report names it: its text quoted (" the", not "Ġthe"); a byte-level token that ends inside a
    UTF-8 character by its bytes (interp's labels: alone it decodes to "�", as every such token did); #i past the
    vocabulary."""
    if i >= len(tok):
        return f"#{i}"
    text = tok.decode([i])
    return repr(text) if "\ufffd" not in text else f"'{label(tok, i)}'"


def run_drift(run_dir: str | Path, out: str | Path, probes: Sequence[str] = (), tokens: Sequence[str] = (),
              top: int = 20, command: str = "", kinds: str | Path | None = None) -> dict[str, Any]:
    """The drift report of a run from its saved checkpoints: results.json, report.html,
    drift_vs_frequency.png, drift_over_time.png."""
    from ..tokenizers import Tokenizer
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:  # 0 wrote a report of no tokens
        raise ValueError(f"--top ({top!r}) must be >= 1")
    for name, value in (("probes", probes), ("tokens", tokens)):
        if isinstance(value, (str, bytes)):  # its characters were taken for as many probes or tokens
            raise ValueError(f"{name} must be a list of texts, not the single string {value!r}; give [{value!r}]")
    run_dir, out = Path(run_dir), Path(out)
    t0 = time.perf_counter()
    saved = read_run_config(run_dir)
    cps = checkpoints(run_dir)
    if len(cps) < 2:
        raise ValueError(f"{run_dir} has {len(cps)} checkpoint(s); drift needs at least two (train with a smaller "
                         "--save-every and --keep-last 0)")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # its report and plots replaced a user's own
        raise ValueError(f"{out} exists and is not an empty folder; choose another --out (nothing is overwritten)")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    empty = [text for text in probes if not tok.encode(text)]
    if empty:  # a probe's drift is that of its hidden states: it needs a token
        raise ValueError(f"--probe {empty[0]!r} is empty: it gives no tokens")
    tc = TrainConfig.from_dict(saved["train"])
    horizon = json.loads((cps[-1] / "state.json").read_text()).get("schedule_steps")
    steps = [checkpoint_step(p) for p in cps]
    # one checkpoint in memory beside the first (all of them at once grew with their number: 1.5 GB at 40 of a
    # small model); each gives its rows' drift from the first and the probes' hidden drift, then goes
    start = checkpoint_model(cps[0], checkpoint_adapters)
    emb0 = start.tok_emb.weight.detach()
    drift, probe_drift, emb_last = [], {text: [] for text in probes}, emb0
    for path in cps[1:]:
        model = checkpoint_model(path, checkpoint_adapters)
        emb_last = model.tok_emb.weight.detach()
        drift.append(row_drift(emb0, emb_last).numpy())
        for text in probes:
            probe_drift[text].append(hidden_drift(start, model, [tok.encode(text)])[0])
        del model
    V = emb0.shape[0]
    data = saved.get("dataset")
    counts = None
    if data:
        path = Path(data) if Path(data).is_absolute() else run_dir / data
        counts = token_counts(TokenDataset.open(path), V) if path.is_dir() else None
    tied = bool(start.config.tie_embeddings)
    # per interval between checkpoints, and from the first to each
    lrs = [lr_at(t, tc, horizon) for t in range(steps[-1])]
    decay = [decay_drift(lrs[steps[0]:s], tc.weight_decay) for s in steps[1:]]
    final = drift[-1]
    unseen = np.flatnonzero(counts == 0) if counts is not None else np.array([], dtype=np.int64)
    order = np.argsort(-final)
    volatile = [{"token": token_name(tok, int(i)), "id": int(i),
                 "drift": float(final[i]), "count": None if counts is None else int(counts[i])} for i in order[:top]]
    # a token by its name in the vocabulary ("Ġthe") or by a text that is one token (" the"; not the unknown token)
    def one_token(t: str) -> int | None:
        if tok.token_to_id(t) is not None:
            return tok.token_to_id(t)
        ids = tok.encode(t)
        return ids[0] if len(ids) == 1 and tok.decode(ids).strip() == t.strip() else None
    one = {t: one_token(t) for t in tokens}
    chosen = [i for i in one.values() if i is not None]
    missing = [repr(t) for t, i in one.items() if i is None]
    if missing:
        raise ValueError(f"not tokens of this run's tokenizer (nor texts of one token): {', '.join(missing)}")
    nn_rows = []
    if chosen:
        first, last = neighbours(emb0, chosen), neighbours(emb_last, chosen)
        for i in chosen:
            kept = len(set(first[i]) & set(last[i]))
            nn_rows.append({"token": token_name(tok, i),
                            f"neighbours at step {steps[0]}": " ".join(token_name(tok, j) for j in first[i]),
                            f"neighbours at step {steps[-1]}": " ".join(token_name(tok, j) for j in last[i]),
                            "kept": f"{kept}/{len(first[i])}"})
    by_kind = []
    if kinds is not None:
        per_kind = split_counts(kinds, tok, V)
        base = counts if counts is not None else sum(per_kind.values())
        by_kind = drift_by_kind(final, token_kinds(per_kind), base)
    probe_rows = [{"probe": text, **{f"step {s}": d for s, d in zip(steps[1:], probe_drift[text])}}
                  for text in probes]
    checks: dict[str, bool | None] = {}
    measured = f"{V} rows over steps {steps[0]}..{steps[-1]}; mean drift {final.mean():.4f}"
    if len(unseen):
        err = float(np.abs(final[unseen] - decay[-1]).max())
        measured += (f"; {len(unseen)} tokens never in the training data drift {final[unseen].mean():.6f} "
                     f"(weight decay alone: {decay[-1]:.6f}, max deviation {err:.2e})")
        checks["never-seen tokens drift as weight decay alone predicts"] = None if tied else err < 1e-5
    plots = [_scatter(out / "drift_vs_frequency.png", counts if counts is not None else np.zeros(V), final,
                      decay[-1] if len(unseen) else None, f"embedding drift, step {steps[0]} -> {steps[-1]}")]
    series = [(v["token"], [(np.array(steps[1:]), np.array([d[v["id"]] for d in drift]))]) for v in volatile[:5]]
    series.append(("mean over all rows", [(np.array(steps[1:]), np.array([d.mean() for d in drift]))]))
    if len(unseen):
        series.append(("weight decay alone", [(np.array(steps[1:]), np.array(decay))]))
    plots.append(line_plot(out / "drift_over_time.png", "drift from the first checkpoint", "step", "relative drift",
                           series))
    results = {"run": str(run_dir), "steps": steps, "tied_embeddings": tied, "weight_decay": tc.weight_decay,
               "decay_only": decay, "unseen_tokens": len(unseen), "volatile": volatile, "neighbours": nn_rows,
               "probes": probe_rows, "by_kind": by_kind, "drift_final": final.tolist(),
               "counts": None if counts is None else counts.tolist(),
               "speed": {"wall_s": time.perf_counter() - t0}}
    extra = [("neighbour changes of chosen tokens", nn_rows), ("hidden-state drift of probe texts", probe_rows),
             ("drift by the kind of text a token occurs in (lmlab lab data split)", by_kind)]
    write_report(out, "drift", "A token's embedding moves with the gradient it gets; a token that never occurs in "
                 "training (untied head) only shrinks by weight decay.", measured, checks, volatile, plots, results,
                 command or f"lmlab lab data drift --run {run_dir} --out {out}",
                 [(c, t) for c, t in extra if t], title="lmlab lab data", claim_label="<b>Claim</b>",
                 note="Drift = ||e_b - e_a|| / ||e_a|| per embedding row, from the first saved checkpoint. "
                      + ("This model ties its head to the embedding: every row gets gradient through the head, "
                         "so never-seen tokens are not decay-only." if tied else ""))
    return results

