"""Knowledge distillation of a trained teacher into a student, on the ordinary Trainer (its resume, checkpoints,
metrics and evaluation), not a second training loop.

    lmlab tune distill --teacher runs/big/final --preset gpt2-tiny --data books/ --out runs/kd --max-steps 500
    lmlab tune distill --teacher runs/big/final --model runs/small/final --data books/ --out runs/kd --alpha 0.5
    lmlab tune distill --teacher runs/big/final --preset gpt2-tiny --data books/ --out runs/skd --mode sequence
    lmlab tune distill --out runs/kd --resume

mode logits (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network", arXiv:1503.02531):
per token, loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(data).
T^2 keeps the soft term's gradients at the scale of the hard term's as T changes (the paper, section 2). The
KL is the soft-target cross-entropy minus the teacher's entropy, a constant of the student: the same gradients.

mode sequence (Kim & Rush 2016, "Sequence-Level Knowledge Distillation", arXiv:1606.07947): the teacher
continues `teacher_samples` windows of the books (`prompt_tokens` each, drawn with the run's seed; greedy at
temperature 0, else sampled with the seed); the prompts and continuations are written to teacher_samples.jsonl
({"prompt", "completion"} lines, the SFT format) and the student trains on them with the usual loss. A resumed
run reads that file back and never samples again.

Both modes evaluate on the held-out part of the books (val_loss, and val_kl: the mean KL(teacher || student)
per token at T = 1). The teacher and the student share the tokenizer (a student from --preset takes the
teacher's); the teacher may be an int8/int4 model (it only runs forward).

Run directory: what `lmlab train` writes (data/ is the books' tokens), plus teacher_samples.jsonl and
samples-data/ in sequence mode; config.json's "distill" section names the teacher and the settings.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..configs import knob, settings_from, validate
from ..data import TokenDataset, find_documents, prepare, prepare_texts
from ..files import atomic_write_text, file_sha256
from ..models import GenerationConfig, ModelConfig, Transformer, generate_ids
from ..models.io import WEIGHTS, load_pretrained
from ..models.quant import refuse_quantized
from ..tokenizers import Tokenizer
from ..train import TrainConfig
from ..train.checkpoint import RUN_FILES, claim_run, refuse_existing_run, resumed_model, run_folder, unlock_run
from ..train.trainer import Callback, Objective, TrainResult, check_fits, dist_env, read_run_config, train

SAMPLES = "teacher_samples.jsonl"


# The teacher writes every sample, 32 at a time, before the first step: a million continuations of 128 tokens
# are 4M batched decoding steps, hours to days on a CPU (2**63 was a TypeError inside torch.randint).
MAX_TEACHER_SAMPLES = 1_000_000


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    mode: str = knob("logits", "logits or sequence", choices=("logits", "sequence"))
    # at most 100, the web app's bound: the KD term is T^2 x KL, and at 1e30 T^2 overflowed float32 (a NaN loss at
    # the first step)
    temperature: float = knob(2.0, "T of the soft targets (logits mode)", gt=0, le=100)
    alpha: float = knob(0.5, "weight of the KD term; 1 - alpha on the data's cross-entropy", ge=0, le=1)
    teacher_samples: int = knob(256, "sequence mode: teacher continuations", ge=1, le=MAX_TEACHER_SAMPLES)
    prompt_tokens: int = knob(16, "sequence mode: book tokens that start each one", ge=1)
    continuation_tokens: int = knob(128, "sequence mode: tokens the teacher writes after each prompt (at most)", ge=1)
    teacher_temperature: float = knob(1.0, "sequence mode: 0 is greedy", ge=0)

    def __post_init__(self) -> None:
        validate(self)  # types, finite numbers and the bounds above: "2" was a TypeError in a comparison


def kd_kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean over the tokens in `mask` (B, T) of KL(softmax(teacher / T) || softmax(student / T)), logits
    (B, T, V), in fp32."""
    log_s = F.log_softmax(student.float() / temperature, -1)
    log_t = F.log_softmax(teacher.float() / temperature, -1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1)  # (B, T)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


class DistillObjective(Objective):
    """Logit distillation: the metrics rows carry both parts, kd_loss (T^2 x KL) and ce_loss. At alpha 0 the
    KD term is only measured, not differentiated, so the run is plain training step for step."""

    def __init__(self, teacher: Transformer, temperature: float, alpha: float):
        self.teacher, self.temperature, self.alpha = teacher.eval().requires_grad_(False), temperature, alpha

    def teacher_logits(self, x: torch.Tensor) -> torch.Tensor:
        # Computed per batch, not cached: a cache of the teacher's logits holds tokens x vocab floats (4 GB for
        # 1M tokens at a vocabulary of 1024), more than the data and both models together.
        if next(self.teacher.parameters()).device != x.device:
            self.teacher.to(x.device)
        with torch.no_grad():
            return self.teacher(x).logits

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        out = model(x, y)
        teacher = self.teacher_logits(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.alpha > 0):
            kd = self.temperature ** 2 * kd_kl(out.logits, teacher, y != -100, self.temperature)
        loss = out.loss if self.alpha == 0 else self.alpha * kd + (1 - self.alpha) * out.loss
        return loss, {"kd_loss": kd.detach(), "ce_loss": out.loss.detach()}

    def evaluate(self, trainer: Any) -> dict[str, float]:
        """The Trainer's own held-out loss, plus val_kl: KL(teacher || student) at T = 1 on the same windows."""
        objective, trainer.objective = trainer.objective, None  # (sequence mode's _KL calls this too)
        try:
            metrics = trainer.evaluate()
        finally:
            trainer.objective = objective
        metrics["val_kl"] = mean_kl(trainer.model, self.teacher, trainer.dataset, trainer.config.batch_size,
                                    trainer.seq_len, trainer.config.eval_batches)
        return metrics


@torch.no_grad()
def mean_kl(student: Transformer, teacher: Transformer, dataset: Any, batch_size: int, seq_len: int,
            max_batches: int | None = None) -> float:
    """Mean KL(teacher || student) per held-out token at T = 1, over dataset.eval_batches."""
    was_training, device = student.training, next(student.parameters()).device
    student.eval()
    teacher.to(device)
    total, count = 0.0, 0
    for x, y in dataset.eval_batches(batch_size, seq_len, max_batches):
        x, mask = x.to(device), (y != -100).to(device)
        total += float(kd_kl(student(x).logits, teacher(x).logits, mask, 1.0)) * int(mask.sum())
        count += int(mask.sum())
    student.train(was_training)
    return total / max(count, 1)


class SamplesDataset:
    """Sequence mode: trains on the teacher's samples, evaluates on the books' held-out part."""

    def __init__(self, samples: TokenDataset, books: TokenDataset):
        self.samples, self.books, self.path = samples, books, samples.path
        self.train_tokens = samples.train_tokens

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        return self.samples.sample_batch(batch_size, seq_len, generator)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> Iterator[Any]:
        return self.books.eval_batches(batch_size, seq_len, max_batches)

    def bytes_per_token(self) -> float:
        return self.books.bytes_per_token()


@torch.no_grad()
def sample_teacher(teacher: Transformer, tok: Tokenizer, books: TokenDataset, cfg: DistillConfig,
                    seed: int) -> list[dict[str, str]]:
    """`cfg.teacher_samples` windows of the books' training part (seeded), each continued by the teacher."""
    starts = torch.randint(books.train_tokens - cfg.prompt_tokens, (cfg.teacher_samples,),
                           generator=torch.Generator().manual_seed(seed)).numpy()
    region = books.tokens[: books.train_tokens]
    prompts = [region[s:s + cfg.prompt_tokens].astype(np.int64).tolist() for s in starts]
    gen = GenerationConfig(max_new_tokens=cfg.continuation_tokens, do_sample=cfg.teacher_temperature > 0,
                           temperature=cfg.teacher_temperature, seed=seed)
    rows = []
    for i in range(0, len(prompts), 32):  # batches of 32: bounded KV cache
        part = prompts[i:i + 32]
        for p, ids in zip(part, generate_ids(teacher.eval(), part, dataclasses.replace(gen, seed=seed + i),
                                             eos_token_id=tok.eos_id, pad_id=tok.pad_id)):
            rows.append({"prompt": tok.decode(p), "completion": tok.decode(ids)})
    return rows


def _sequence_data(out: Path, teacher: Transformer, tok: Tokenizer, books: TokenDataset, cfg: DistillConfig,
                   seed: int, seq_len: int, echo: Any) -> SamplesDataset:
    """The teacher's samples as a token dataset: made once (teacher_samples.jsonl, written atomically), read back
    on resume."""
    path = out / SAMPLES
    if not path.is_file():
        rows = sample_teacher(teacher, tok, books, cfg, seed)
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        echo(f"{len(rows)} teacher samples written to {path}")
    # split at "\n" only: splitlines() also splits at U+2028 and U+0085, which json.dumps leaves in a text as they are
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]
    data = prepare_texts([r["prompt"] + r["completion"] for r in rows], tok, out / "samples-data",
                         val_fraction=0.0, seq_len=seq_len, overwrite=True)  # made again on resume, the same
    return SamplesDataset(data, books)


def _window(config: TrainConfig, teacher: Transformer, student: Transformer) -> int:
    """The training window: --seq-len, else the shorter of the two contexts (the teacher scores every window
    the student trains on, so a window past its context cannot be scored)."""
    limit = teacher.config.block_size
    if config.seq_len and config.seq_len > limit:
        raise ValueError(f"--seq-len ({config.seq_len}) is longer than the teacher's context ({limit} tokens); the "
                         "teacher scores every window")
    return config.seq_len or min(student.config.block_size, limit)


def _load_teacher(teacher_dir: str | Path) -> tuple[Transformer, Tokenizer]:
    teacher, tok = load_pretrained(teacher_dir)  # an int8/int4 teacher loads too: it only runs forward
    if tok is None:
        raise ValueError(f"{teacher_dir} has no tokenizer.json (distillation needs the teacher's tokenizer)")
    return teacher, tok


def _check_vocab(teacher: Transformer, student_config: ModelConfig) -> None:
    if teacher.config.vocab_size != student_config.vocab_size:
        raise ValueError(f"the teacher's vocab_size ({teacher.config.vocab_size}) differs from the student's "
                         f"({student_config.vocab_size}); the KD term compares their logits token by token")


def run_distill(teacher_dir: str | Path, books: Sequence[str | Path], out_dir: str | Path, config: TrainConfig,
                cfg: DistillConfig = DistillConfig(), *, preset: str | None = None,
                model_config: ModelConfig | None = None, student_dir: str | Path | None = None,
                val_fraction: float = 0.05, callbacks: Sequence[Callback] = (), echo: Any = print) -> TrainResult:
    """Distil the model in `teacher_dir` into a new student (a preset or a ModelConfig, with the teacher's
    tokenizer) or into the model in `student_dir` (same tokenizer), on `books`. Bad input fails before anything
    is written."""
    out = run_folder(out_dir)
    refuse_existing_run(out, (*RUN_FILES, "tokenizer.json", "data"), "lmlab tune distill")
    if sum(x is not None for x in (preset, model_config, student_dir)) != 1:
        raise ValueError("choose the student: --preset NAME or --model DIR (one of them)")
    teacher, tok = _load_teacher(teacher_dir)
    if student_dir is not None:
        student, student_tok = load_pretrained(student_dir)
        refuse_quantized(student)  # before the data is written
        if student_tok is None or student_tok.fingerprint() != tok.fingerprint():
            raise ValueError(f"the student {student_dir} does not share the teacher's tokenizer; distillation "
                             "compares their predictions token by token")
        student.train()
    else:
        mc = model_config or ModelConfig.preset(preset, vocab_size=teacher.config.vocab_size)
        torch.manual_seed(config.seed)  # as train() initialises a ModelConfig
        student = Transformer(mc)
    _check_vocab(teacher, student.config)
    seq_len = _window(config, teacher, student)
    config = dataclasses.replace(config, seq_len=seq_len)
    check_fits(student.config, config, world=dist_env()[1])  # the Trainer's own check, before the data is written
    paths = find_documents(books)
    # held from its first file on (train/checkpoint.py claim_run): a second distillation into it is refused
    # before it writes, and a refused one deletes nothing of the other's
    claim, created = claim_run(out, (*RUN_FILES, "tokenizer.json", "data"), "lmlab tune distill") if (
        dist_env()[0] == 0) else (None, False)
    try:
        ds: Any = prepare(paths, tok, out / "data", val_fraction=val_fraction, seq_len=seq_len,
                          overwrite=True)  # the new run's own folder
        if cfg.mode == "sequence" and ds.train_tokens <= cfg.prompt_tokens:  # no window to start a teacher sample
            shutil.rmtree(out if created else out / "data", ignore_errors=True)
            raise ValueError(f"the books' training part has {ds.train_tokens} tokens, not more than "
                             f"--prompt-tokens ({cfg.prompt_tokens}): sequence mode starts each teacher sample from "
                             "that many")
        provenance = {"dataset": str(Path(ds.path).resolve()), "sources": [str(p) for p in paths],
                      "init": str(student_dir) if student_dir else None, "data_stats": ds.stats(),
                      "distill": {**dataclasses.asdict(cfg), "teacher": str(Path(teacher_dir).resolve()),
                                  "teacher_sha256": file_sha256(Path(teacher_dir) / WEIGHTS)}}
        return _fit(teacher, tok, student, ds, cfg, config, out, callbacks, provenance, echo, resume=False)
    finally:
        unlock_run(claim)


def _fit(teacher: Transformer, tok: Tokenizer, student: Transformer, books: TokenDataset, cfg: DistillConfig,
         config: TrainConfig, out: Path, callbacks: Sequence[Callback], provenance: dict[str, Any], echo: Any, *,
         resume: bool) -> TrainResult:
    seq_len = config.seq_len or student.config.block_size
    if cfg.mode == "sequence":
        ds = _sequence_data(out, teacher, tok, books, cfg, config.seed, seq_len, echo)
        return train(student, tok, ds, config, out, callbacks, resume=resume, provenance=provenance,
                     objective=_KL(teacher))
    objective = DistillObjective(teacher, cfg.temperature, cfg.alpha)
    return train(student, tok, books, config, out, callbacks, resume=resume, provenance=provenance,
                 objective=objective)


class _KL(Objective):
    """Sequence mode: the usual loss; evaluation adds val_kl as logit distillation's does."""

    def __init__(self, teacher: Transformer):
        self.inner = DistillObjective(teacher, 1.0, 0.0)

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y = batch
        return model(x, y).loss, {}

    def evaluate(self, trainer: Any) -> dict[str, float]:
        return self.inner.evaluate(trainer)


def resume_distill(out_dir: str | Path, overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (),
                   echo: Any = print) -> TrainResult:
    """Continue a distillation run from its last checkpoint with its own teacher, data and settings (sequence
    mode: its own teacher samples)."""
    out = Path(out_dir)
    saved = read_run_config(out)
    d = saved.get("distill")
    if not isinstance(d, dict):
        raise ValueError(f"{out} is not a distillation run (its config.json has no distill section)")
    teacher, tok = _load_teacher(d["teacher"])
    if tok.fingerprint() != Tokenizer.load(out / "tokenizer.json").fingerprint():
        raise ValueError(f"the teacher {d['teacher']} no longer has the run's tokenizer")
    if d.get("teacher_sha256") and file_sha256(Path(d["teacher"]) / WEIGHTS) != d["teacher_sha256"]:
        raise ValueError(f"cannot resume {out}: the teacher's weights ({d['teacher']}) differ from those the run "
                         "started with; start a new run")
    cfg = settings_from({k: v for k, v in d.items() if k not in ("teacher", "teacher_sha256")}, DistillConfig, {},
                        out / "config.json")
    config = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
    student = resumed_model(out, saved["model"])
    books = TokenDataset.open(out / "data", tok)
    provenance = {k: v for k, v in saved.items() if k not in ("train", "model")}
    return _fit(teacher, tok, student, books, cfg, config, out, callbacks, provenance, echo, resume=True)
