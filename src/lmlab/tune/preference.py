"""Preference optimisation: DPO, IPO, SimPO, ORPO and KTO as one Objective over per-sequence log-probabilities,
on the project's Trainer (its resume, checkpoints, metrics and DDP).

    lmlab tune dpo --model runs/sft/final --data pairs.jsonl --out runs/dpo --loss dpo --max-steps 200
    lmlab tune dpo --model runs/sft/final --data pairs.jsonl --out runs/dpo-lora --lora-rank 8   # RUN/adapter
    lmlab tune dpo --model runs/sft/final --data pairs.jsonl --out runs/rpo --sft-weight 1   # DPO + NLL (RPO)

Data (JSONL, one example a line): preference pairs {"prompt", "chosen", "rejected"} for dpo, ipo, simpo and orpo;
unpaired labels {"prompt", "completion", "label": true|false} for kto. The prompt's tokens are context, the
completion's tokens (and an EOS after them) are scored. Reference log-probabilities are computed once, with
dropout off, and cached on disk under a hash of the model's weights and the tokenised data.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..configs import settings_from
from ..data.jsonl import read_jsonl
from ..files import atomic_path, file_sha256
from ..models.io import WEIGHTS
from ..models.quant import refuse_quantized
from ..train.checkpoint import RUN_FILES, refuse_existing_run, run_folder
from ..train.trainer import Objective, check_fits, dist_env
from .chat import ChatTemplate, has_template
from .lora import LoRAConfig
from .rl import kl_k3

LOSSES = ("dpo", "ipo", "simpo", "orpo", "kto")
DATA_COPY = "data.jsonl"  # a run's own copy of its pairs (or KTO examples)
# beta's usual value per loss: DPO/IPO/KTO papers and TRL's default 0.1; SimPO's paper sweeps 2.0-2.5; ORPO's
# lambda 0.1 (Hong et al. 2024, section 6)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}
RENDER = "plain-v2"  # changes whenever render() does: part of the reference cache's key


# ---- data -------------------------------------------------------------------------------------------

def read_examples(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """The examples of a pairs (`kind="pairs"`) or KTO (`kind="kto"`) file, validated: ValueError naming the
    file and line for bad JSON, a missing or non-string field, an empty string, chosen == rejected, a label
    that is not true/false."""
    fields = ("prompt", "chosen", "rejected") if kind == "pairs" else ("prompt", "completion", "label")

    def check(row: Any) -> dict[str, Any]:
        if not isinstance(row, dict):
            raise ValueError(f"expected an object with {', '.join(fields)}")
        for f in fields[:3 if kind == "pairs" else 2]:
            if f not in row:
                raise ValueError(f"missing field {f!r}")
            if not isinstance(row[f], str):
                raise ValueError(f"{f!r} must be a string")
            if not row[f].strip():
                raise ValueError(f"{f!r} is empty")
        if kind == "pairs" and row["chosen"] == row["rejected"]:
            raise ValueError("chosen and rejected are the same text")
        if kind == "kto" and not isinstance(row.get("label"), bool):
            raise ValueError("'label' must be true or false")
        return {f: row[f] for f in fields}

    rows = [{"line": n, **row} for n, row in read_jsonl(path, check)]
    if kind == "kto" and len(rows) < 2:
        raise ValueError(f"{path}: KTO needs 2 examples or more (its KL estimate pairs prompts with other completions)")
    return rows


def render(tokenizer: Any, prompt: str, completion: str) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids + EOS) of plain text: where a chat renderer plugs in. The completion starts
    where the tokenised prompt and prompt + completion part (tokens may merge across the boundary), as TRL's
    DPOTrainer does, so the scored ids are exactly the ids of the full text."""
    bos = getattr(tokenizer, "adds_bos", False)  # the tokenizer's own <BOS> before a text, as generate puts it
    p = tokenizer.encode(prompt, add_bos=bos)
    full = tokenizer.encode(prompt + completion, add_bos=bos)
    k = next((i for i, (a, b) in enumerate(zip(p, full)) if a != b), min(len(p), len(full)))
    return full[:k], full[k:] + [tokenizer.eos_id]


def fit(p: list[int], c: list[int], max_len: int, at: str) -> tuple[list[int], bool]:
    """A prompt and completion in max_len tokens: the completion whole, the prompt's first tokens cut when the two
    are longer. -> (the prompt kept, whether it was cut). ValueError naming `at` (the file's line) for a pair that
    cannot be scored: a completion longer than the context, a prompt with no token of its own."""
    if len(c) + 1 > max_len:
        raise ValueError(f"{at}: the completion has {len(c)} tokens with EOS; the model's context of {max_len} "
                         "leaves no room for the prompt")
    if not p:
        raise ValueError(f"{at}: the prompt has no tokens of its own")
    cut = len(p) + len(c) > max_len
    return (p[len(p) + len(c) - max_len:] if cut else p), cut


def _pack(seqs: Sequence[tuple[list[int], list[int]]], max_len: int, where: Sequence[str], pad: int
          ) -> tuple[torch.Tensor, torch.Tensor, list[bool]]:
    """Right-padded (N, L) ids and a mask of the scored (completion) tokens; a sequence longer than max_len
    loses its prompt's first tokens (keeps its end). -> (ids, mask, whether each row was cut)."""
    cuts, rows = [], []
    for (p, c), at in zip(seqs, where):
        p, cut = fit(p, c, max_len, at)
        cuts.append(cut)
        rows.append((p, c))
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), L), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), L), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, len(p):len(p) + len(c)] = True
    return ids, mask, cuts


class PreferenceData:
    """Tokenised examples as tensors, one row each: sample_batch(batch_size, seq_len, generator) draws rows for
    the Trainer. Pairs: chosen/rejected ids and masks; KTO: ids, mask, label, and the KL pair's ids and mask
    (the prompt with the previous example's completion, file order, cyclic: the mismatched pairs of Ethayarajh
    et al. 2024 section 4.1, as TRL's KTOTrainer builds them by rotating completions). After attach_reference,
    each row also carries its reference per-token log-probabilities."""

    def __init__(self, path: str | Path, tokenizer: Any, kind: str, max_len: int, pad_id: int = 0):
        # (not `path`: the Trainer records a dataset's path as a token file that `lmlab train --resume` opens)
        self.kind = kind
        rows = read_examples(path, kind)
        lines = [f"{path}:{r['line']}" for r in rows]
        self.tensors: dict[str, torch.Tensor] = {}
        self.n = len(rows)
        if kind == "pairs":
            sides = {"chosen": [render(tokenizer, r["prompt"], r["chosen"]) for r in rows],
                     "rejected": [render(tokenizer, r["prompt"], r["rejected"]) for r in rows]}
        else:
            done = [render(tokenizer, r["prompt"], r["completion"]) for r in rows]
            previous = rows[-1:] + rows[:-1]
            sides = {"completion": done,
                     "kl": [render(tokenizer, r["prompt"], q["completion"]) for r, q in zip(rows, previous)]}
            self.tensors["label"] = torch.tensor([r["label"] for r in rows])
        cut_rows = [False] * self.n
        for side, seqs in sides.items():
            ids, mask, cuts = _pack(seqs, max_len, lines, pad_id)
            self.tensors[side], self.tensors[side + "_mask"] = ids, mask
            if side != "kl":  # the examples cut, on either side (KTO's mismatched KL pairs are no examples)
                cut_rows = [a or b for a, b in zip(cut_rows, cuts)]
        self.truncated = sum(cut_rows)
        self.train_tokens = self.n * max_len  # the Trainer's tokens per row: --epochs counts passes over the rows

    @property
    def sides(self) -> tuple[str, str]:
        return ("chosen", "rejected") if self.kind == "pairs" else ("completion", "kl")

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
        idx = torch.randint(self.n, (batch_size,), generator=generator)
        return {k: v[idx] for k, v in self.tensors.items()}

    def fingerprint(self) -> str:
        h = hashlib.sha256(RENDER.encode())
        for k in sorted(self.tensors):
            t = self.tensors[k]
            h.update(f"{k}{tuple(t.shape)}{t.dtype}".encode())
            h.update(t.contiguous().numpy().tobytes())
        return h.hexdigest()

    def attach_reference(self, model: torch.nn.Module, cache_dir: str | Path | None, batch_size: int = 16
                         ) -> bool:
        """Give each row its reference per-token log-probabilities ("ref_" + side, (N, L-1)), read from
        cache_dir when a file for this model and data is there, else computed (dropout off) and written there
        (also over a file that is damaged or holds other shapes). -> whether the cache was used."""
        key = hashlib.sha256((weights_hash(model) + self.fingerprint()).encode()).hexdigest()[:32]
        file = Path(cache_dir) / f"{key}.safetensors" if cache_dir is not None else None
        if file is not None and file.is_file():
            try:
                found = load_file(file)
                cached = {k: tuple(v.shape) for k, v in found.items()}
            except (SafetensorError, OSError):
                cached = None  # cut short or overwritten: computed again below, and the file written anew
            want = {"ref_" + side: (self.n, self.tensors[side].shape[1] - 1) for side in self.sides}
            if cached == want:
                self.tensors.update(found)
                return True
        refs = {}
        for side in self.sides:
            ids, mask = self.tensors[side], self.tensors[side + "_mask"]
            refs["ref_" + side] = torch.cat([token_logps(model, ids[i:i + batch_size], mask[i:i + batch_size],
                                                         grad=False) for i in range(0, self.n, batch_size)])
        if file is not None:
            file.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(file) as tmp:
                save_file(refs, str(tmp), metadata={"render": RENDER})
        self.tensors.update(refs)
        return False


def weights_hash(model: torch.nn.Module) -> str:
    h = hashlib.sha256(json.dumps(model.config.to_dict() if hasattr(model.config, "to_dict") else
                                  str(model.config), sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmlab" / "reference"


# ---- log-probabilities ----------------------------------------------------------------------------

def no_dropout(model: torch.nn.Module) -> torch.nn.Module:
    """Dropout off in every module, in train mode too (TRL's disable_dropout): the policy's log-probabilities
    during training then match the reference's, so the implicit reward starts at 0 (up to float rounding: the
    reference was scored in other batches)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):
            m.dropout = 0.0  # attention's dropout_p
    return model


def token_logps(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, *, grad: bool = True
                ) -> torch.Tensor:
    """log p(ids[:, t] | ids[:, :t]) at every scored position t >= 1, 0 elsewhere: (B, L-1). grad=False: in
    eval mode (dropout off) and without a graph, for the reference."""
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    if not grad:
        was = model.training
        model.eval()
        with torch.no_grad():
            out = token_logps(model, ids, mask)
        model.train(was)
        return out.float().cpu()
    logits = model(ids[:, :-1]).logits.float()
    # cross_entropy fuses log_softmax and the gather: no (B, T, vocab) log-prob tensor kept for backward
    nll = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(ids.shape[0], -1)
    return -nll * mask[:, 1:]


# ---- the losses ------------------------------------------------------------------------------------

@dataclass
class PreferenceConfig:
    loss: str = "dpo"
    beta: float | None = None   # default per loss (DEFAULT_BETA); ORPO's lambda
    gamma: float = 1.0          # SimPO's target reward margin (Meng et al. 2024 use gamma/beta ~ 0.5)
    desirable_weight: float = 1.0    # KTO's lambda_D
    undesirable_weight: float = 1.0  # KTO's lambda_U
    # weight of an added NLL term on the chosen completions (DPO + NLL: Pang et al. 2024, "Iterative Reasoning
    # Preference Optimization", RPO; TRL's DPOTrainer loss_type=["sigmoid", "sft"]): the per-token mean over the
    # batch's chosen tokens, as TRL's "sft" term. Plain DPO can lower the chosen text's likelihood too
    sft_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ValueError(f"unknown loss {self.loss!r}; one of {', '.join(LOSSES)}")
        if self.beta is None:
            self.beta = DEFAULT_BETA[self.loss]
        for name in ("beta", "gamma", "sft_weight", "desirable_weight", "undesirable_weight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy's scalars are numbers too
                raise ValueError(f"{name} must be a number, not {value!r}")
        for name in ("desirable_weight", "undesirable_weight"):  # a negative one turns KTO's objective around
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive finite number, got {getattr(self, name)}")
        if not 0 < self.beta < math.inf:
            raise ValueError(f"beta must be a positive finite number, got {self.beta}")
        if not 0 <= self.sft_weight < math.inf:
            raise ValueError(f"sft_weight must be a finite number, 0 or more, got {self.sft_weight}")
        if not math.isfinite(self.gamma):
            raise ValueError(f"gamma must be a finite number, got {self.gamma}")
        if self.gamma != 1.0 and self.loss != "simpo":  # read by SimPO alone: ignored without a word otherwise
            raise ValueError(f"gamma is SimPO's target margin, not used by the {self.loss} loss; leave it out")
        if self.sft_weight and self.loss in ("orpo", "kto"):
            raise ValueError(f"sft_weight is for dpo, ipo and simpo, not {self.loss} "
                             "(ORPO has its own NLL term; KTO has no chosen side)")

    @property
    def kind(self) -> str:
        return "kto" if self.loss == "kto" else "pairs"


def pair_loss(cfg: PreferenceConfig, c: torch.Tensor, r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
              n_c: torch.Tensor, n_r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair losses and (chosen, rejected) rewards from summed completion log-probs c, r (policy) and ref_c,
    ref_r (reference) over n_c, n_r completion tokens."""
    b = cfg.beta
    if cfg.loss in ("dpo", "ipo"):
        rc, rr = c - ref_c, r - ref_r
        if cfg.loss == "dpo":  # Rafailov et al. 2023, eq. 7
            return -F.logsigmoid(b * (rc - rr)), b * rc, b * rr
        # Azar et al. 2023, eq. 17, with tau = beta, on per-token mean log-ratios as TRL computes it (its
        # DPOTrainer notes the IPO authors confirmed their results use this length-normalised form)
        return (rc / n_c - rr / n_r - 1 / (2 * b)) ** 2, b * rc, b * rr
    mc, mr = c / n_c, r / n_r
    if cfg.loss == "simpo":  # Meng et al. 2024, eq. 6: length-normalised, no reference, margin gamma
        return -F.logsigmoid(b * mc - b * mr - cfg.gamma), b * mc, b * mr
    # ORPO (Hong et al. 2024, eq. 6-8): odds(y) = P/(1-P) with P the per-token mean probability; the NLL of
    # the chosen completions is added by the objective (it is per token, not per pair)
    log_odds = (mc - log1mexp(mc)) - (mr - log1mexp(mr))
    return -b * F.logsigmoid(log_odds), b * mc, b * mr


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, accurate near 0 too (Mächler 2012, "Accurately Computing log(1 - exp(-|a|))"):
    log(-expm1(x)) above -ln 2, log1p(-exp(x)) below. Each branch sees only inputs of its side, so the one not
    taken has a finite gradient (a torch.where over an infinite one would give NaN)."""
    cut = -math.log(2)
    return torch.where(x > cut, torch.log(-torch.expm1(x.clamp(min=cut))), torch.log1p(-torch.exp(x.clamp(max=cut))))


def kto_loss(cfg: PreferenceConfig, logps: torch.Tensor, ref: torch.Tensor, label: torch.Tensor,
             z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ethayarajh et al. 2024, eq. 7 as TRL's KTOTrainer computes it: per-example losses
    lambda_D (1 - sigma(beta (r - z0))) for desirable and lambda_U (1 - sigma(beta (z0 - r))) for undesirable
    completions, r = log pi/pi_ref; z0 the detached, clamped KL estimate. -> (losses, rewards)."""
    rho = logps - ref
    losses = torch.where(label, cfg.desirable_weight * (1 - torch.sigmoid(cfg.beta * (rho - z0))),
                         cfg.undesirable_weight * (1 - torch.sigmoid(cfg.beta * (z0 - rho))))
    return losses, cfg.beta * rho


def k3(policy: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean per-token KL(policy || reference) over the masked tokens by Schulman's k3 estimator (rl.kl_k3)."""
    return kl_k3(policy, ref)[mask].sum() / mask.sum().clamp_min(1)


class PreferenceObjective(Objective):
    """The Trainer's step for every preference loss. Metrics each step: rewards (chosen, rejected), the summed
    log-probs (logps_chosen, logps_rejected), margin, accuracy (chosen reward above rejected) and kl: the mean
    per-token k3 estimate of KL(policy || reference) on the chosen completions' tokens (KTO: all completions).
    KTO adds kto_z0, its batch KL estimate."""

    def __init__(self, cfg: PreferenceConfig):
        self.cfg = cfg

    def trained_tokens(self, batch: dict[str, torch.Tensor]) -> int:
        if self.cfg.loss == "kto":  # (its KL rows run forward only)
            return batch["completion"].numel()
        c, r = batch["chosen"], batch["rejected"]
        return 2 * c.shape[0] * max(c.shape[1], r.shape[1])  # one forward over both sides (_stack)

    def loss(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if self.cfg.loss == "kto":
            return self._kto(model, batch)
        B = batch["chosen"].shape[0]
        ids, mask = _stack(batch["chosen"], batch["rejected"]), _stack(batch["chosen_mask"], batch["rejected_mask"])
        per_token = token_logps(model, ids, mask)                       # (2B, L-1): one forward for both
        seq, n = per_token.sum(1), mask[:, 1:].sum(1).clamp_min(1)
        ref_c, ref_r = batch["ref_chosen"].sum(1), batch["ref_rejected"].sum(1)
        losses, rw_c, rw_r = pair_loss(self.cfg, seq[:B], seq[B:], ref_c, ref_r, n[:B], n[B:])
        loss = losses.mean()
        weight = 1.0 if self.cfg.loss == "orpo" else self.cfg.sft_weight
        # + the chosen completions' NLL per token over the batch: the paper's L_SFT on the response (TRL's DPO "sft"
        # loss; TRL's ORPOTrainer also counts the prompt's tokens)
        if weight:
            loss = loss - weight * per_token[:B].sum() / n[:B].sum()
        c_tok = per_token[:B, :batch["ref_chosen"].shape[1]].detach()
        return loss, {"rewards_chosen": rw_c.mean().detach(), "rewards_rejected": rw_r.mean().detach(),
                      "logps_chosen": seq[:B].mean().detach(), "logps_rejected": seq[B:].mean().detach(),
                      "margin": (rw_c - rw_r).mean().detach(), "accuracy": (rw_c > rw_r).float().mean(),
                      "kl": k3(c_tok, batch["ref_chosen"], batch["chosen_mask"][:, 1:])}

    def _kto(self, model: torch.nn.Module, batch: dict[str, torch.Tensor]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        per_token = token_logps(model, batch["completion"], batch["completion_mask"])
        with torch.no_grad():  # TRL: the KL pairs' log-probs carry no gradient (z0 is detached)
            kl_logps = token_logps(model, batch["kl"], batch["kl_mask"]).sum(1)
        z0 = (kl_logps - batch["ref_kl"].sum(1)).mean()
        if torch.distributed.is_available() and torch.distributed.is_initialized():  # TRL gathers z0's terms
            torch.distributed.all_reduce(z0)
            z0 = z0 / torch.distributed.get_world_size()
        z0 = z0.clamp_min(0)
        label = batch["label"]
        seq = per_token.sum(1)
        losses, rewards = kto_loss(self.cfg, seq, batch["ref_completion"].sum(1), label, z0)
        good, bad = label.float(), (~label).float()
        mean = lambda x, w: (x * w).sum() / w.sum().clamp_min(1)  # noqa: E731
        return losses.mean(), {
            "rewards_chosen": mean(rewards, good).detach(), "rewards_rejected": mean(rewards, bad).detach(),
            "logps_chosen": mean(seq, good).detach(), "logps_rejected": mean(seq, bad).detach(),
            "margin": (mean(rewards, good) - mean(rewards, bad)).detach(),
            # the reward's sign matches the label: a zero reward (step 1's, the reference's own) is right for neither
            "accuracy": mean(torch.where(label, rewards > 0, rewards < 0).float(), torch.ones_like(good)),
            "kl": k3(per_token.detach(), batch["ref_completion"], batch["completion_mask"][:, 1:]), "kto_z0": z0}

    def evaluate(self, trainer: Any) -> dict[str, float]:
        return {}  # no held-out pairs yet: the step's metrics are the record (books' validation does not apply)


def _stack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Rows of a then b, right-padded to one length (the pairs' sides are packed separately)."""
    L = max(a.shape[1], b.shape[1])
    return torch.cat([F.pad(a, (0, L - a.shape[1])), F.pad(b, (0, L - b.shape[1]))])


def run_preference(out: str | Path, train_config: Any = None, *, model_dir: str | Path | None = None,
                   data: str | Path | None = None, cfg: PreferenceConfig | None = None,
                   cache_dir: str | Path | None = None, resume: bool = False, callbacks: Sequence[Any] = (),
                   say: Any = print, lora: LoRAConfig | None = None) -> Any:
    """Fine-tune the model in model_dir on data with cfg's loss and write the run directory `out` (the
    Trainer's: checkpoints, metrics.jsonl, final/). resume=True continues `out` with its saved settings
    (train_config then holds only the changes, as a dict). `lora`: train adapters on the frozen model instead of
    its weights (tune/lora.py: RUN/adapter in PEFT's layout, RUN/final merged)."""
    from ..models.io import load_pretrained
    from ..train import TrainConfig
    from ..train.recipes import CarrySideFiles, train_with_lora
    from ..train.trainer import read_run_config

    out = run_folder(out)
    if resume:
        saved = read_run_config(out)
        if "preference" not in saved:
            raise ValueError(f"{out} is not a preference run (no 'preference' in its config.json)")
        p = saved["preference"]
        # its own copy of the data (runs before it kept none read the file they started from)
        model_dir, cache_dir = p["model"], p.get("cache_dir")
        data = out / p["copy"] if p.get("copy") else p["data"]
        if p.get("model_sha256") and file_sha256(Path(model_dir) / WEIGHTS) != p["model_sha256"]:
            raise ValueError(f"cannot resume {out}: the weights of {model_dir} differ from those the run started "
                             "from (its reference); start a new run")
        cfg = settings_from(p["config"], PreferenceConfig, {}, out / "config.json")
        lora = LoRAConfig.from_section(p["lora"]) if p.get("lora") else None
        train_config = TrainConfig.from_dict({**saved["train"], **(train_config or {})})
    else:
        refuse_existing_run(out, (*RUN_FILES, DATA_COPY), "lmlab tune dpo")
    if cache_dir is not None and Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise ValueError(f"the reference cache {cache_dir} is a file; name a folder (or leave it out)")
    if model_dir is None or data is None or cfg is None or train_config is None:
        raise ValueError("a new preference run needs a model, data, a loss and a training config")
    model, tok = load_pretrained(model_dir)
    refuse_quantized(model)  # before the adapters go on
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json")
    if lora is not None:  # the adapters go on after the reference log-probabilities and the data's copy
        lora.check(model, tok)
    max_len = train_config.seq_len or model.config.block_size
    check_fits(model.config, train_config, world=dist_env()[1])  # the Trainer's check, before anything is written
    ds = PreferenceData(data, tok, cfg.kind, max_len, pad_id=getattr(tok, "pad_id", 0))
    if ds.truncated:
        say(f"{ds.truncated} examples were longer than {max_len} tokens: their prompts lost their first tokens")
    # With LoRA the reference is the base itself, no second copy of its weights: its log-probabilities are taken
    # here, before the adapters go on (a resumed run's come from its checkpoint later, in the Trainer), so they
    # and their cache entry are those of the plain model. Its dropout goes off first; the adapters' own is kept
    # when asked for (B starts at zero: the implicit reward still starts at 0, up to float rounding).
    cached = ds.attach_reference(no_dropout(model), cache_dir)
    say(f"reference log-probabilities: {'read from' if cached else 'computed and cached in'} {cache_dir}"
        if cache_dir is not None else "reference log-probabilities computed (no cache)")
    if not resume:  # the run's own copy of the data, what a resume reads: the file it started from may change
        out.mkdir(parents=True, exist_ok=True)
        with atomic_path(out / DATA_COPY, new=True) as tmp:  # another run's copy is never replaced
            shutil.copyfile(data, tmp)
    provenance = {"preference": {"model": str(Path(model_dir).resolve()),
                                 "model_sha256": file_sha256(Path(model_dir) / WEIGHTS),
                                 "data": str(Path(data).resolve()) if not resume else p["data"], "copy": DATA_COPY,
                                 "cache_dir": None if cache_dir is None else str(cache_dir),
                                 "config": dict(vars(cfg)), "lora": lora.to_dict() if lora else None}}
    if has_template(model_dir):  # a chat model stays one: final/ keeps the template (the Chat view offers it)
        callbacks = [*callbacks, ChatTemplate()]
    callbacks = [*callbacks, CarrySideFiles(model_dir)]  # its weights checked unchanged on resume (model_sha256)
    return train_with_lora(model.train(), tok, ds, train_config, out, callbacks, lora, resume=resume,
                           provenance=provenance, objective=PreferenceObjective(cfg))
