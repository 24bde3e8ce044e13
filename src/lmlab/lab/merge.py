"""The merge explorer (`lmlab lab merge`): is there a loss barrier on the straight path between two models?

Linear mode connectivity (Frankle et al. 2020, "Linear Mode Connectivity and the Lottery Ticket Hypothesis",
https://arxiv.org/abs/1912.05671; Neyshabur et al. 2020, "What is being transferred in transfer learning?",
https://arxiv.org/abs/2008.11687): two fine-tunings of one pre-trained parent end in one basin, so the loss stays
low all along theta(t) = (1 - t) theta_A + t theta_B, and averaging them (a linear merge) works; two models
trained from different random initialisations do not, and their midpoint is much worse than either. This is
why merging methods (lmlab.models.merge, mergekit) start from siblings of one parent.

Per seed s, on the built-in tales (lmlab.train.demo_corpus), all with the Trainer:
- a parent trained from scratch for `parent_steps`; two siblings fine-tuned from it for `finetune_steps` with
  different data orders (seeds 2s + 1, 2s + 2);
- two strangers trained from scratch for parent_steps + finetune_steps with different initialisations and data
  orders (the same number of steps as a sibling has seen in all).
Held-out loss (mean token NLL over every held-out window) at `points` values of t along the linear path of each
pair, and along SLERP's path for the siblings (per tensor, as `lmlab merge --method slerp`). The barrier of a
path is max_t [L(t) - ((1 - t) L(0) + t L(1))]: the height above the straight line between the endpoints' losses.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..configs import knob, parse_seeds, validate
from ..data import TokenDataset, prepare_texts
from ..models import ModelConfig, Transformer
from ..models.io import load_pretrained
from ..models.merge import merge_tensors
from ..tokenizers import Tokenizer
from ..train import TrainConfig, train
from ..train.console import quiet
from ..train.demo_corpus import demo_corpus
from .facts.report import line_plot, write_report


@dataclasses.dataclass
class MergeLabConfig:
    parent_steps: int = 300
    finetune_steps: int = 150
    points: int = 11              # values of t on each path, 0, 0.5 and 1 included (odd)
    preset: str = "llama-tiny"
    block_size: int = knob(64, "context of every model", ge=1)
    vocab_size: int = knob(512, "the BPE tokenizer's vocabulary (4 specials + 256 bytes at least)", ge=260)
    batch_size: int = 16
    lr: float = knob(3e-3, "the parents' learning rate", gt=0)
    finetune_lr: float = knob(1e-3, "the siblings' fine-tuning learning rate", gt=0)
    stories: int = 400

    def __post_init__(self) -> None:
        validate(self)  # types and finite numbers ("3" was a TypeError below, nan passed), the bounds above
        for name in ("parent_steps", "finetune_steps", "batch_size", "stories"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.points < 3 or self.points % 2 == 0:  # the report's midpoint loss is the middle point's
            raise ValueError(f"points must be odd and >= 3 (both ends and t = 0.5), got {self.points}")
        # an unknown preset (or one the sizes above do not fit) was refused only after out/data was written
        ModelConfig.preset(self.preset, vocab_size=self.vocab_size, block_size=self.block_size)

    @classmethod
    def quick(cls) -> MergeLabConfig:
        return cls(parent_steps=30, finetune_steps=15, points=5, vocab_size=300, stories=60)


def held_out_loss(model: Transformer, ds: TokenDataset, seq_len: int) -> float:
    """Mean token NLL over every held-out window."""
    model.eval()
    with torch.no_grad():
        losses = [(model(x, y).loss.item(), x.shape[0]) for x, y in ds.eval_batches(16, seq_len)]
    return sum(loss * n for loss, n in losses) / sum(n for _, n in losses)


def path_losses(a: Transformer, b: Transformer, ds: TokenDataset, ts: np.ndarray, method: str,
                seq_len: int) -> list[float]:
    """Held-out loss of merge_tensors([a, b], method) at each t (linear: weights 1 - t and t)."""
    sa, sb, probe = a.state_dict(), b.state_dict(), copy.deepcopy(a)
    out = []
    for t in ts:
        t = float(t)
        kw = {"weights": [1 - t, t]} if method == "linear" else {"t": t}
        probe.load_state_dict({k: merge_tensors([sa[k].float(), sb[k].float()], method, **kw) for k in sa})
        out.append(held_out_loss(probe, ds, seq_len))
    return out


def barrier(ts: np.ndarray, losses: list[float]) -> float:
    line = (1 - ts) * losses[0] + ts * losses[-1]
    return float(np.max(np.asarray(losses) - line))


def _train(cfg: MergeLabConfig, tok: Tokenizer, ds: TokenDataset, out: Path, steps: int, seed: int,
           start: Transformer | None) -> Transformer:
    lr = cfg.lr if start is None else cfg.finetune_lr  # fine-tuning continues at a lower rate
    if start is None:
        torch.manual_seed(seed)
        start = Transformer(ModelConfig.preset(cfg.preset, vocab_size=tok.vocab_size, block_size=cfg.block_size))
    tc = TrainConfig(max_steps=steps, batch_size=cfg.batch_size, lr=lr, warmup_steps=min(20, steps // 5),
                     eval_every=0, save_every=0, log_every=steps, seed=seed)
    with quiet():
        train(start, tok, ds, tc, out)
    return load_pretrained(out / "final")[0]


def run_merge_lab(out: str | Path, seeds: list[int], cfg: MergeLabConfig, command: str = "") -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    # before out/data: none was a StatisticsError after it, one twice trained and then found its folder taken
    seeds = parse_seeds(seeds)
    t0, cpu0 = time.perf_counter(), time.process_time()
    text = demo_corpus(n_stories=cfg.stories, seed=0)
    tok = Tokenizer.train([text], kind="bpe", vocab_size=cfg.vocab_size)
    ds = prepare_texts([text], tok, out / "data", seq_len=cfg.block_size)
    ts = np.linspace(0.0, 1.0, cfg.points)
    per_seed, curves = [], {"siblings (linear)": [], "siblings (slerp)": [], "strangers (linear)": []}
    for s in seeds:
        runs = out / "runs" / f"seed{s}"
        parent = _train(cfg, tok, ds, runs / "parent", cfg.parent_steps, 1000 + s, None)
        sib = [_train(cfg, tok, ds, runs / f"sibling{i}", cfg.finetune_steps, 2 * s + i, copy.deepcopy(parent))
               for i in (1, 2)]
        strangers = [_train(cfg, tok, ds, runs / f"stranger{i}", cfg.parent_steps + cfg.finetune_steps,
                            2000 + 2 * s + i, None) for i in (1, 2)]
        row: dict[str, Any] = {"seed": s}
        for label, (a, b), method in (("siblings (linear)", sib, "linear"), ("siblings (slerp)", sib, "slerp"),
                                      ("strangers (linear)", strangers, "linear")):
            losses = path_losses(a, b, ds, ts, method, cfg.block_size)
            curves[label].append((ts, np.asarray(losses)))
            row[label] = {"t": ts.tolist(), "loss": losses, "barrier": barrier(ts, losses)}
        per_seed.append(row)

    def stats(label: str) -> tuple[float, float | None]:
        """The mean barrier over seeds and its sample std; no std from one seed (as in lab facts)."""
        xs = [r[label]["barrier"] for r in per_seed]
        return statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else None

    def text(m: float, sd: float | None) -> str:
        return f"{m:.3f}" + ("" if sd is None else f" ± {sd:.3f}")

    table = []
    for label in curves:
        m, sd = stats(label)
        ends = [v for r in per_seed for v in (r[label]["loss"][0], r[label]["loss"][-1])]
        mids = [r[label]["loss"][len(ts) // 2] for r in per_seed]
        table.append({"path": label, "barrier (nats)": m, **({} if sd is None else {"barrier (nats)_std": sd}),
                      "endpoint loss": statistics.mean(ends), "midpoint loss": statistics.mean(mids)})
    sib, strange = stats("siblings (linear)"), stats("strangers (linear)")
    lower_every_seed = all(r["siblings (linear)"]["barrier"] < r["strangers (linear)"]["barrier"] for r in per_seed)
    checks = {"siblings' barrier below strangers' on every seed": lower_every_seed,
              "siblings' barrier below strangers' by more than both spreads":
                  (strange[0] - sib[0] > sib[1] + strange[1]) if len(seeds) > 1 else None}
    measured = (f"barrier{', mean ± std' if len(seeds) > 1 else ''} over {len(seeds)} seed(s): siblings "
                f"{text(*sib)} nats, strangers {text(*strange)} nats")
    plot = line_plot(out / "paths.png", "held-out loss along the path between two models", "t", "loss (nats/token)",
                     list(curves.items()))
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "per_seed": per_seed,
               "speed": {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - cpu0}}
    write_report(out, "merge", "Two fine-tunings of one parent are linearly connected (a small loss barrier on the "
                 "path between them); two models trained from scratch with different seeds are not (Frankle et al. "
                 "2020; Neyshabur et al. 2020).", measured, checks, table, [plot], results,
                 command or "lmlab lab merge", title="lmlab lab merge",
                 claim_label="<b>Claim</b> (linear mode connectivity)",
                 note="Barrier = max over t of L(t) minus the straight line between the endpoints' losses. "
                      "Each seed trains its own parent, siblings and strangers; every path point is scored on "
                      "every held-out window.")
    return results
