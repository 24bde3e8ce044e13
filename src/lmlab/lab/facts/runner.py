"""One training run of the knowledge lab, and many of them in parallel (one process and one thread each).

A run is the project's Trainer on a Biographies dataset with FactsCallback attached; nothing here is a
second training loop. `run_many` spreads runs over the CPU cores with spawned processes, one thread each:
seeds are independent, and a d=64 model gains little from intra-op threads while a shared machine punishes
them (the 300-step test run took 570 s with 2 threads and 40 s with 1 on this machine at load ~8;
`benchmarks/bench_facts.py --threads-vs-processes` times the two on a quieter machine).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from ...configs import knob, validate
from ...files import atomic_path, atomic_write_text
from ...models import ModelConfig, Transformer
from ...train import Callback, TrainConfig, console, latest_checkpoint, train
from ...train.checkpoint import mismatch
from ..interp.hooks import AttentionRecorder
from ..parallel import process_map
from .data import BioConfig, Biographies
from .metrics import FactsCallback, plateau_times


@dataclass
class RunConfig:
    """A model, an optimiser schedule and a population: everything one run needs (saved with its results)."""

    bio: BioConfig = knob(factory=BioConfig, help="the population and how biographies are drawn from it")
    family: str = knob("gpt2", "model family", choices=("gpt", "gpt2", "llama"))
    n_layer: int = knob(3, "transformer blocks", gt=0)
    n_head: int = knob(4, "attention heads", gt=0)
    n_embd: int = knob(64, "model width", gt=0)
    batch_size: int = knob(32, "biographies per step", gt=0)
    lr: float = knob(3e-3, "peak learning rate", gt=0)
    schedule: str = knob("cosine", "learning-rate schedule (the paper: cosine, no warm-up)")
    weight_decay: float = knob(0.1, "AdamW weight decay", ge=0)
    steps: int = knob(2000, "optimizer steps", gt=0)
    eval_every: int = knob(50, "evaluate every N steps", gt=0)
    seed: int = knob(0, "weights and data order (the population has its own, bio.seed)")
    stop_at_acc: float | None = knob(None, "end the run once held-out accuracy reaches this", gt=0, le=1)
    probes: bool = knob(True, "record the attention and probe metrics")
    init_from: str | None = knob(None, "a saved state dict (safetensors) to start from: fine-tuning")
    patch_from: str | None = knob(None, "a reference state dict whose attention patterns replace the model's")
    snapshot_steps: tuple[int, ...] = knob((), "save the weights at these steps (patching references)")
    split_old: int = knob(0, "fine-tuning evaluates old and new individuals apart: population rows [0, old) and "
                          "[old, total)", ge=0)
    split_celebrities: int = knob(0, "... and, after celebrity pre-training, old rows [0, c) (the celebrities) and "
                                  "[c, old) apart as well (Fig. P)", ge=0)

    def __post_init__(self) -> None:
        if isinstance(self.bio, dict):
            self.bio = BioConfig(**self.bio)
        self.snapshot_steps = tuple(int(s) for s in self.snapshot_steps)
        validate(self)
        if not 0 <= self.split_old <= self.bio.n_individuals:
            raise ValueError(f"split_old ({self.split_old}) must be in [0, n_individuals = {self.bio.n_individuals}]")
        if self.split_celebrities and not 0 < self.split_celebrities < self.split_old:
            raise ValueError(f"split_celebrities ({self.split_celebrities}) must be in (0, split_old = "
                             f"{self.split_old})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Snapshots(Callback):
    """Keeps the weights at chosen steps (step 0 too: it is written before the first update)."""

    def __init__(self, steps: Sequence[int], out: Path) -> None:
        self.steps, self.out = set(steps), out
        self.paths: dict[int, str] = {}

    def save(self, model: Transformer, step: int) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / f"step-{step}.safetensors"
        with atomic_path(path) as tmp:
            save_model(model, str(tmp))  # handles the tied head as the Trainer's checkpoints do
        self.paths[step] = str(path)

    def on_step(self, trainer: Any, metrics: dict[str, Any]) -> None:
        if trainer.step in self.steps:
            self.save(trainer.model, trainer.step)


class DataState(Callback):
    """Saves the dataset's own state (Biographies.state_dict: the warm-up clock) into every checkpoint as
    `data_state.json`, since the Trainer checkpoints only its generator. Before `train(..., resume=True)`,
    `restore(out_dir)` puts back the state of the checkpoint the Trainer will resume from."""

    FILE = "data_state.json"

    def __init__(self, data: Biographies) -> None:
        self.data = data

    def on_checkpoint(self, trainer: Any, path: Path) -> None:
        atomic_write_text(Path(path) / self.FILE, json.dumps(self.data.state_dict()) + "\n")

    def restore(self, out_dir: str | Path) -> None:
        path = latest_checkpoint(out_dir)
        if path is None:
            raise FileNotFoundError(f"no checkpoint to resume from in {Path(out_dir) / 'checkpoints'}")
        if not (path / self.FILE).is_file():
            raise ValueError(f"{path} has no {self.FILE}: the run was not trained with DataState, so its warm-up "
                             f"clock is lost")
        self.data.load_state_dict(json.loads((path / self.FILE).read_text()))


def load_weights(model: Transformer, path: str) -> None:
    missing, unexpected = load_model(model, path, strict=False)  # resolves the tied head
    if missing or unexpected:
        raise mismatch(path, "the model", missing, unexpected)


class AttentionPatch:
    """Train a model with a reference model's attention probabilities (paper §3, App. D.1): before each
    forward, the frozen reference runs on the same tokens and every layer of the patched model mixes its own
    values with the reference's attention (stop-gradient; its queries and keys get no gradient)."""

    def __init__(self, model: Transformer, reference: Transformer) -> None:
        self.model, self.reference = model, reference.eval().requires_grad_(False)
        self.probs: list[torch.Tensor] = []
        model.register_forward_pre_hook(self._pre)
        for i, block in enumerate(model.blocks):
            block.attn.forward = self._patched(block.attn, i)

    def _pre(self, module: torch.nn.Module, args: tuple) -> None:
        with torch.no_grad(), AttentionRecorder(self.reference) as rec:
            self.reference(args[0])
        self.probs = rec.probs

    def _patched(self, attn: torch.nn.Module, layer: int):
        def forward(x, rope, mask, cache, _layer):
            B, T, C = x.shape
            _q, _k, v = attn.qkv(x).split(attn.split, dim=-1)
            v = v.view(B, T, attn.n_kv_head, attn.head_dim).transpose(1, 2)
            v = v.repeat_interleave(attn.n_head // attn.n_kv_head, dim=1)          # (B, H, T, D)
            y = self.probs[layer] @ v
            return attn.resid_dropout(attn.proj(y.transpose(1, 2).reshape(B, T, C)))
        return forward


class _OldNew(FactsCallback):
    """FactsCallback under a prefix (fine-tuning tracks old and new individuals separately)."""

    def __init__(self, data: Biographies, prefix: str) -> None:
        super().__init__(data, sets=("seen_eval",), probes=False)
        self.prefix = prefix

    def on_eval(self, trainer: Any, metrics: dict[str, Any]) -> None:
        extra: dict[str, Any] = {}
        super().on_eval(trainer, extra)
        for k, v in extra.items():
            metrics[k.replace("facts/", f"facts/{self.prefix}/")] = v


def model_config(cfg: RunConfig, data: Biographies) -> ModelConfig:
    return ModelConfig(family=cfg.family, vocab_size=data.tokenizer.vocab_size, n_layer=cfg.n_layer,
                       n_head=cfg.n_head, n_embd=cfg.n_embd, block_size=data.seq_len)


def split_groups(cfg: RunConfig) -> dict[str, BioConfig]:
    """Fine-tuning's evaluation groups, each a uniform slice of the one population: "old" rows [0, split_old),
    "new" the rest (if any: fine-tuning on seen individuals has none), and with split_celebrities = c also
    "old_celeb" [0, c) and "old_rest" [c, split_old)."""
    b = cfg.bio
    old = dataclasses.replace(b, first_individual=0, n_individuals=cfg.split_old, n_unseen=0,
                              sampling="uniform", n_celebrities=0, celebrity_weight=1.0,
                              replay_individuals=0, replay_weight=1.0)
    groups = {"old": old}
    if b.n_individuals > cfg.split_old:
        groups["new"] = dataclasses.replace(old, first_individual=cfg.split_old,
                                            n_individuals=b.n_individuals - cfg.split_old)
    if cfg.split_celebrities:
        c = cfg.split_celebrities
        groups["old_celeb"] = dataclasses.replace(old, n_individuals=c)
        groups["old_rest"] = dataclasses.replace(old, first_individual=c, n_individuals=cfg.split_old - c)
    return groups


def run_one(cfg: RunConfig, out_dir: str | Path, quiet: bool = True) -> dict[str, Any]:
    """Train one model and return its evaluation history, plateau times and speed."""
    out = Path(out_dir)
    data = Biographies(cfg.bio)
    callbacks: list[Callback] = []
    views: dict[str, FactsCallback] = {}
    if cfg.split_old:
        views = {g: _OldNew(Biographies(b, data.tokenizer, data.pools), g) for g, b in split_groups(cfg).items()}
        callbacks += views.values()
    else:
        sets = ("seen_eval", "seen_train", "unseen") if cfg.bio.n_unseen else ("seen_eval", "seen_train")
        facts = FactsCallback(data, sets, probes=cfg.probes and cfg.patch_from is None, stop_at_acc=cfg.stop_at_acc)
        views = {"main": facts}
        callbacks.append(facts)
    callbacks.append(DataState(data))
    snaps = Snapshots(cfg.snapshot_steps, out / "snapshots") if cfg.snapshot_steps else None
    if snaps:
        callbacks.append(snaps)
    mc = model_config(cfg, data)
    torch.manual_seed(cfg.seed)
    model = Transformer(mc)
    if cfg.init_from:
        load_weights(model, cfg.init_from)
    if cfg.patch_from:
        ref = Transformer(mc)
        load_weights(ref, cfg.patch_from)
        AttentionPatch(model, ref)
    if snaps and 0 in cfg.snapshot_steps:
        snaps.save(model, 0)
    tc = TrainConfig(batch_size=cfg.batch_size, seq_len=data.seq_len, lr=cfg.lr, warmup_steps=0,
                     schedule=cfg.schedule, min_lr=cfg.lr / 10 if cfg.schedule != "constant" else None,
                     weight_decay=cfg.weight_decay, max_steps=cfg.steps, eval_every=cfg.eval_every,
                     eval_batches=1, save_every=0, keep_last=1, log_every=10**9, device="cpu", seed=cfg.seed,
                     peak_flops=1e12,  # a fixed MFU denominator: skips the start-up matmul timing
                     sample_every=0)  # no text samples: the lab measures with its own probes
    # step 0: the untrained model, so every curve starts at initialisation
    for cb in views.values():
        cb.on_eval(_AtStep0(model), {})
    t0 = time.perf_counter()
    with console.quiet() if quiet else contextlib.nullcontext():
        result = train(model, data.tokenizer, data, tc, out, callbacks)
    if result.stop_reason == "interrupted":  # Ctrl-C stopped this run: stop the experiment, not just the run
        raise KeyboardInterrupt
    wall = time.perf_counter() - t0
    if snaps and result.steps not in snaps.paths:
        snaps.save(model, result.steps)
    final = Path(out) / "final" / "model.safetensors"
    summary: dict[str, Any] = {"config": cfg.to_dict(), "steps": result.steps, "wall_s": wall,
                               "steps_per_s": result.steps / wall, "baseline": data.baseline(),
                               "data": data.describe(), "final_weights": str(final),
                               "snapshots": {str(k): v for k, v in (snaps.paths if snaps else {}).items()}}
    for name, cb in views.items():
        key = "history" if name == "main" else f"history_{name}"
        summary[key] = cb.history
        if name == "main":
            steps = [r["step"] for r in cb.history]
            summary["plateau"] = plateau_times(steps, [r["seen_eval/loss"] for r in cb.history], cb.baseline)
    return summary


class _AtStep0:
    """Stands in for the Trainer when evaluating before the first step."""

    def __init__(self, model: Transformer) -> None:
        self.model, self.step, self.should_stop = model, 0, False


def _worker(args: tuple[RunConfig, str]) -> dict[str, Any]:
    torch.set_num_threads(1)  # one core per run; runs, not threads, use the machine's cores
    return run_one(*args)


def run_many(jobs: Sequence[tuple[RunConfig, str | Path]], workers: int | None = None) -> list[dict[str, Any]]:
    """Run jobs in parallel, one spawned process per CPU core (at most), each single-threaded; results in
    job order."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    args = [(cfg, str(out)) for cfg, out in jobs]
    if workers == 1:
        threads = torch.get_num_threads()
        try:
            return [_worker(a) for a in args]
        finally:
            torch.set_num_threads(threads)
    return process_map(_worker, args, workers)
