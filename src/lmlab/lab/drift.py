"""Embedding drift and latent volatility (`lmlab lab data drift`): how far each token's embedding row (and the
hidden states of chosen probe texts) moves between checkpoints, against how often the token occurs in training.

    lmlab lab data drift --run runs/demo --out runs/demo-drift --probe "Once upon a time" --token the

Drift of a row is ||e_b - e_a|| / ||e_a|| (relative, so rows of any norm compare). A row whose token never
occurs as an input in training gets no gradient from the input side; AdamW then only decays it
(Loshchilov & Hutter 2019: p <- p (1 - lr_t wd), and Adam's moments stay zero, so its update is exactly 0), so
its drift is exactly 1 - prod_t (1 - lr_t wd): the weight-decay line in the report. That holds for an untied
head only (the llama family): a tied head (gpt, gpt2) hands every row the output-side gradient of the softmax,
which pushes never-seen tokens' logits down, so those rows move more than decay explains.

During training, `DriftCallback(model)` records the same per-row drift from the initial weights every `every`
steps (and its metrics `drift/...` go into metrics.jsonl); from a finished run, `run_drift` compares the saved
checkpoints (the first is the reference: the Trainer saves no step 0).
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
from ..train import Callback, TrainConfig, checkpoint_step, checkpoints, lr_at
from ..train.checkpoint import checkpoint_model
from ..train.trainer import read_run_config
from .facts.report import _plt, line_plot, save_figure, write_report
from .interp.hooks import run_with_residuals


def row_drift(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """Per row: ||after - before|| / ||before|| (float64)."""
    before, after = before.double(), after.double()
    return (after - before).norm(dim=1) / before.norm(dim=1).clamp_min(1e-30)


def decay_drift(lrs: Sequence[float], weight_decay: float) -> float:
    """The drift of a row that gets no gradient, after AdamW steps at learning rates `lrs`: 1 - prod(1 - lr wd)."""
    return 1.0 - float(np.prod([1.0 - lr * weight_decay for lr in lrs], dtype=np.float64))


def token_counts(dataset: TokenDataset, vocab_size: int) -> np.ndarray:
    """How often each token id occurs in the training region (the inputs the model sees)."""
    train = dataset.tokens[: dataset.train_tokens]
    return np.bincount(np.asarray(train, dtype=np.int64), minlength=vocab_size)[:vocab_size]


def neighbours(emb: torch.Tensor, ids: Sequence[int], k: int = 5) -> dict[int, list[int]]:
    """The k nearest rows (cosine) of each id in `ids`, itself excluded."""
    unit = torch.nn.functional.normalize(emb.double(), dim=1)
    sims = unit[list(ids)] @ unit.T
    sims[torch.arange(len(ids)), torch.tensor(list(ids))] = -2.0
    return {i: sims[r].topk(k).indices.tolist() for r, i in enumerate(ids)}


def hidden_drift(model_a: Any, model_b: Any, probes: Sequence[Sequence[int]]) -> list[float]:
    """Per probe text: mean over its positions of the relative change of the last residual stream."""
    out = []
    for ids in probes:
        ha = run_with_residuals(model_a, list(ids))[1][-1][0]
        hb = run_with_residuals(model_b, list(ids))[1][-1][0]
        out.append(float(row_drift(ha, hb).mean()))
    return out


class DriftCallback(Callback):
    """Per-row embedding drift from the weights at construction (step 0), every `every` steps: `records` holds
    (step, drift per row as float64 numpy, the weight-decay-only drift predicted from the learning rates seen so
    far), and the step's metrics get drift/mean, drift/max and drift/decay_only."""

    def __init__(self, model: Any, every: int = 10) -> None:
        if every < 1:
            raise ValueError(f"every ({every}) must be >= 1")
        self.every, self.start = every, model.tok_emb.weight.detach().clone()
        self.lrs: list[float] = []
        self.records: list[tuple[int, np.ndarray, float]] = []

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        self.lrs.append(float(metrics["lr"]))
        if trainer.step % self.every and not trainer.should_stop:
            return
        drift = row_drift(self.start, trainer.model.tok_emb.weight.detach().cpu()).numpy()
        decay = decay_drift(self.lrs, trainer.config.weight_decay)
        self.records.append((trainer.step, drift, decay))
        metrics.update({"drift/mean": float(drift.mean()), "drift/max": float(drift.max()),
                        "drift/decay_only": decay})


def _scatter(path: Path, counts: np.ndarray, drift: np.ndarray, decay: float | None, title: str) -> Path:
    fig, ax = _plt().subplots(figsize=(6.4, 4.0), dpi=100)
    ax.scatter(counts + 1, drift, s=6, alpha=0.6)
    if decay is not None:
        ax.axhline(decay, ls="--", color="grey", lw=1, label="weight decay alone (tokens never seen)")
        ax.legend(fontsize=8)
    ax.set(xscale="log", title=title, xlabel="occurrences in the training data + 1", ylabel="relative drift")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def run_drift(run_dir: str | Path, out: str | Path, probes: Sequence[str] = (), tokens: Sequence[str] = (),
              top: int = 20, command: str = "") -> dict[str, Any]:
    """The drift report of a run from its saved checkpoints: results.json, report.html,
    drift_vs_frequency.png, drift_over_time.png."""
    from ..tokenizers import Tokenizer
    run_dir, out = Path(run_dir), Path(out)
    t0 = time.perf_counter()
    saved = read_run_config(run_dir)
    cps = checkpoints(run_dir)
    if len(cps) < 2:
        raise ValueError(f"{run_dir} has {len(cps)} checkpoint(s); drift needs at least two (train with a smaller "
                         "--save-every and --keep-last 0)")
    if (out / "results.json").exists():
        raise ValueError(f"{out} already holds results.json; choose another --out")
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    tc = TrainConfig.from_dict(saved["train"])
    horizon = json.loads((cps[-1] / "state.json").read_text()).get("schedule_steps")
    steps = [checkpoint_step(p) for p in cps]
    models = [checkpoint_model(p) for p in cps]
    embs = [m.tok_emb.weight.detach() for m in models]
    V = embs[0].shape[0]
    data = saved.get("dataset")
    counts = None
    if data:
        path = Path(data) if Path(data).is_absolute() else run_dir / data
        counts = token_counts(TokenDataset.open(path), V) if path.is_dir() else None
    tied = bool(models[0].config.tie_embeddings)
    # per interval between checkpoints, and from the first to each
    lrs = [lr_at(t, tc, horizon) for t in range(steps[-1])]
    drift = [row_drift(embs[0], e).numpy() for e in embs[1:]]
    decay = [decay_drift(lrs[steps[0]:s], tc.weight_decay) for s in steps[1:]]
    final = drift[-1]
    unseen = np.flatnonzero(counts == 0) if counts is not None else np.array([], dtype=np.int64)
    order = np.argsort(-final)
    volatile = [{"token": tok.id_to_token(int(i)) if int(i) < len(tok) else f"#{i}", "id": int(i),
                 "drift": float(final[i]), "count": None if counts is None else int(counts[i])} for i in order[:top]]
    chosen = [i for t in tokens if (i := tok.token_to_id(t)) is not None]
    missing = [t for t in tokens if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"not tokens of this run's tokenizer: {', '.join(missing)}")
    nn_rows = []
    if chosen:
        first, last = neighbours(embs[0], chosen), neighbours(embs[-1], chosen)
        for i in chosen:
            kept = len(set(first[i]) & set(last[i]))
            nn_rows.append({"token": tok.id_to_token(i), f"neighbours at step {steps[0]}":
                            " ".join(tok.id_to_token(j) or "?" for j in first[i]),
                            f"neighbours at step {steps[-1]}": " ".join(tok.id_to_token(j) or "?" for j in last[i]),
                            "kept": f"{kept}/{len(first[i])}"})
    probe_rows = [{"probe": text, **{f"step {s}": hidden_drift(models[0], m, [tok.encode(text)])[0]
                                     for s, m in zip(steps[1:], models[1:])}} for text in probes]
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
               "probes": probe_rows, "drift_final": final.tolist(),
               "counts": None if counts is None else counts.tolist(),
               "speed": {"wall_s": time.perf_counter() - t0}}
    extra = [("neighbour changes of chosen tokens", nn_rows), ("hidden-state drift of probe texts", probe_rows)]
    write_report(out, "drift", "A token's embedding moves with the gradient it gets; a token that never occurs in "
                 "training (untied head) only shrinks by weight decay.", measured, checks, volatile, plots, results,
                 command or f"lmlab lab data drift --run {run_dir} --out {out}",
                 [(c, t) for c, t in extra if t], title="lmlab lab data", claim_label="<b>Claim</b>",
                 note="Drift = ||e_b - e_a|| / ||e_a|| per embedding row, from the first saved checkpoint. "
                      + ("This model ties its head to the embedding: every row gets gradient through the head, "
                         "so never-seen tokens are not decay-only." if tied else ""))
    return results

