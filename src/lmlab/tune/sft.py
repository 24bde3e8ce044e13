"""Supervised fine-tuning: a dataset of rendered examples for the ordinary Trainer (its resume, checkpoints,
metrics and DDP), not a second training loop.

    lmlab tune sft --model lmlab-demo/final --data chats.jsonl --out runs/sft --max-steps 300
    lmlab tune sft --out runs/sft --resume
    lmlab tune sft --model lmlab-demo/final --data chats.jsonl --out runs/sft-lora --lora-rank 8   # RUN/adapter
    lmlab chat runs/sft/final

A conversation trains on its assistant turns only (chat.render's mask); a prompt–completion pair on all of it,
or with `completion_only` on the completion and the <EOS> after it. Targets outside the mask are -100, which
the model's loss skips. An example longer than the context is cut to it (the run says how many were); one
left with nothing to train on is an error naming its line. With `packing`, short examples are laid end to
end in one context instead of one per row with padding; the model's attention has no per-example mask, so a
packed example sees the ones before it (as in TRL's default packing), though it is never trained on
predicting across the seam (an example's first token is never a target).

Run directory: what `lmlab train` writes, plus data.jsonl (a copy of the data, so the run resumes without
the original), chat_template.jinja, and the same template in final/ for conversations.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..eval.scorer import token_logprobs
from ..files import atomic_path
from ..models import Transformer
from ..models.generation import encode_prompt
from ..models.io import load_pretrained
from ..models.quant import refuse_quantized
from ..tokenizers import Tokenizer
from ..train import TrainConfig
from ..train.checkpoint import RUN_FILES, refuse_existing_run, resumed_model, run_folder
from ..train.recipes import INIT_FILES, carried, keep_init_files, train_with_lora
from ..train.trainer import Callback, TrainResult, check_fits, dist_env, read_run_config
from .chat import TEMPLATE_FILE, ChatTemplate, add_chat_tokens, chat_token_ids, has_template, render, write_template
from .data import read_sft
from .lora import LoRAConfig

DATA = "data.jsonl"


@dataclasses.dataclass(frozen=True)
class Example:
    ids: np.ndarray   # (n,) int64
    mask: np.ndarray  # (n,) bool: ids[i] is trained (as the target of position i - 1)
    line: int


def encode_examples(kind: str, rows: Sequence[tuple[int, Any]], tokenizer: Tokenizer, seq_len: int, *,
                    path: str | Path = "data", completion_only: bool = False,
                    remedy: str = "shorten it or use a longer --seq-len") -> tuple[list[Example], int]:
    """Examples cut to the context (seq_len + 1 ids: seq_len inputs and targets) and how many were cut.
    ValueError naming the line of an example left without a trained token (and the `remedy`)."""
    examples, truncated = [], 0
    for line, record in rows:
        if kind == "messages":
            ids, mask = render(record, tokenizer)
        else:
            prompt = encode_prompt(tokenizer, record["prompt"])  # as generate encodes a prompt
            completion = tokenizer.encode(record["completion"]) + [tokenizer.eos_id]
            ids = prompt + completion
            mask = [0] * len(prompt) + [1] * len(completion) if completion_only else [1] * len(ids)
        mask[0] = 0  # nothing before it in the example: packed, it must not learn to follow the previous one
        if len(ids) > seq_len + 1:
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            truncated += 1
        if not any(mask):
            raise ValueError(f"{path}:{line}: no token to train on within the context of {seq_len + 1} tokens "
                             f"(the example is longer); {remedy}")
        examples.append(Example(np.array(ids, dtype=np.int64), np.array(mask, dtype=bool), line))
    return examples, truncated


def split(examples: list[Example], val_fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A held-out share (at least one example when there are two or more), drawn by `seed`."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction ({val_fraction}) must be in [0, 1)")
    n_val = min(len(examples) - 1, max(1, round(val_fraction * len(examples)))) if val_fraction > 0 else 0
    order = np.random.default_rng(seed).permutation(len(examples))
    held = set(order[:n_val].tolist())
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class SFTDataset:
    """What the Trainer samples: rows of (inputs, targets) with -100 where nothing is trained. All randomness
    comes from the Trainer's generator, whose state each checkpoint holds, so a resumed run draws the same
    rows as an uninterrupted one."""

    def __init__(self, train: list[Example], val: list[Example], tokenizer: Tokenizer, seq_len: int, *,
                 packing: bool = False):
        if not train:
            raise ValueError("no training examples")
        self.train, self.val, self.packing, self.pad = train, val, packing, tokenizer.pad_id
        # what an epoch is to the Trainer (steps = train_tokens / (rows x seq_len)): one row per example
        # unpacked, padding included; packed, the examples' own tokens
        self.train_tokens = sum(len(e.ids) for e in train) if packing else len(train) * seq_len
        # bits per byte of the trained text: its UTF-8 bytes over its tokens
        held = val or train
        n_tokens = sum(int(e.mask.sum()) for e in held)
        # an <UNK> counts one byte, the least the text it stands for takes (the ids no longer hold it): decode
        # writes it as the five letters "<UNK>", and left out it counted none (a held-out part of <UNK>s: bpb NaN)
        n_bytes = sum(len(tokenizer.decode(masked := e.ids[e.mask].tolist()).encode("utf-8"))
                      - 4 * masked.count(tokenizer.unk_id) for e in held)
        self._bytes_per_token = n_bytes / n_tokens

    def bytes_per_token(self) -> float:
        return self._bytes_per_token

    def _rows(self, rows: list[tuple[np.ndarray, np.ndarray]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = np.full((len(rows), seq_len), self.pad, dtype=np.int64)
        y = np.full((len(rows), seq_len), -100, dtype=np.int64)
        for r, (ids, mask) in enumerate(rows):
            ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
            x[r, :len(ids) - 1] = ids[:-1]
            y[r, :len(ids) - 1] = np.where(mask[1:], ids[1:], -100)
        return torch.from_numpy(x), torch.from_numpy(y)

    def sample_batch(self, batch_size: int, seq_len: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Examples drawn uniformly with replacement: one per row, or with packing as many as fill the row (the
        last one cut at its end)."""
        if not self.packing:
            pick = torch.randint(len(self.train), (batch_size,), generator=generator).tolist()
            return self._rows([(self.train[i].ids, self.train[i].mask) for i in pick], seq_len)
        rows = []
        for _ in range(batch_size):
            parts, filled = [], 0
            while filled < seq_len + 1:
                e = self.train[int(torch.randint(len(self.train), (1,), generator=generator))]
                parts.append(e)
                filled += len(e.ids)
            rows.append((np.concatenate([e.ids for e in parts]), np.concatenate([e.mask for e in parts])))
        return self._rows(rows, seq_len)

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None,
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The held-out examples, one per row, in a fixed order (spread over all of them with max_batches)."""
        chosen = self.val
        if max_batches is not None and len(chosen) > max_batches * batch_size:
            idx = np.linspace(0, len(chosen) - 1, max_batches * batch_size).round().astype(np.int64)
            chosen = [chosen[i] for i in idx]
        for i in range(0, len(chosen), batch_size):
            yield self._rows([(e.ids, e.mask) for e in chosen[i:i + batch_size]], seq_len)


def build_dataset(data: str | Path, tokenizer: Tokenizer, seq_len: int, *, completion_only: bool,
                  val_fraction: float, seed: int, packing: bool, kind: str | None = None,
                  read: tuple[str, list[tuple[int, Any]]] | None = None) -> tuple[SFTDataset, dict[str, Any]]:
    """`read`: read_sft(data) when the caller has it already."""
    found, rows = read or read_sft(data)
    if kind is not None and found != kind:
        raise ValueError(f"{data} no longer holds {kind} examples")
    if completion_only and found == "messages":
        raise ValueError("--completion-only is for prompt–completion data; conversations train on the "
                         "assistant turns")
    examples, truncated = encode_examples(found, rows, tokenizer, seq_len, path=data, completion_only=completion_only)
    train_ex, val_ex = split(examples, val_fraction, seed)
    info = {"kind": found, "examples": len(train_ex), "val_examples": len(val_ex), "truncated": truncated,
            "supervised_tokens": int(sum(e.mask.sum() for e in train_ex))}
    return SFTDataset(train_ex, val_ex, tokenizer, seq_len, packing=packing), info


def _describe(info: dict[str, Any], seq_len: int) -> str:
    kind = "conversations" if info["kind"] == "messages" else "prompt–completion pairs"
    return (f"{info['examples']} {kind} for training, {info['val_examples']} held out; {info['truncated']} cut "
            f"to the context of {seq_len + 1} tokens; {info['supervised_tokens']:,} trained tokens")


def hardest_tokens(model: Transformer, ds: SFTDataset, seq_len: int, k: int, exclude: Sequence[int] = (),
                   max_logits: int = 2**25) -> list[int]:
    """The k token ids with the largest summed loss under `model` over the training split's trained tokens (ties:
    the lower id), `exclude` left out: the rows worth training beside LoRA's adapters. Fine-tuning that teaches a
    fixed wording (a reply's opening) is held back most by the frozen embedding and head rows of its tokens; the
    summed loss finds them from the training data and the starting model alone (docs/LOG.md, issue 16). Scored
    by eval's token_logprobs, in batches of at most `max_logits` logits."""
    V = model.config.vocab_size
    total = np.zeros(V)
    rows = [e.ids[:seq_len + 1].tolist() for e in ds.train]
    scored = token_logprobs(model, rows, batch_size=max(1, max_logits // (seq_len * V)))
    for e, (logp, _) in zip(ds.train, scored):
        keep = e.mask[1:len(logp) + 1]
        np.add.at(total, e.ids[1:len(logp) + 1][keep], -logp[keep])
    total[list(exclude)] = 0.0
    order = sorted(range(V), key=lambda i: (-float(total[i]), i))
    return [i for i in order[:k] if total[i] > 0]


def run_sft(model_dir: str | Path, data: str | Path, out_dir: str | Path, config: TrainConfig, *,
            packing: bool = False, completion_only: bool = False, val_fraction: float = 0.1,
            callbacks: Sequence[Callback] = (), echo: Any = print, lora: LoRAConfig | None = None,
            lora_hard_tokens: int = 0) -> TrainResult:
    """Fine-tune the model in `model_dir` on `data` (conversations or prompt–completion JSONL) into `out_dir`.
    Conversations add the chat tokens to the tokenizer when it lacks them. `lora`: train adapters on the frozen
    model instead of its weights (tune/lora.py: RUN/adapter in PEFT's layout, RUN/final merged); chat tokens
    added here keep their initial rows (the mean), as PEFT leaves embeddings alone without modules_to_save.
    `lora_hard_tokens` K: LoRA also trains the embedding (and untied head) rows of the K tokens the starting
    model finds hardest on the training split (hardest_tokens), recorded in the run as `lora.tokens`.
    Bad data fails before anything is written."""
    out = run_folder(out_dir)
    refuse_existing_run(out, (*RUN_FILES, "tokenizer.json", DATA, TEMPLATE_FILE, INIT_FILES), "lmlab tune sft")
    model, tok = load_pretrained(model_dir)
    refuse_quantized(model)  # before the chat tokens or adapters go on, and before anything is written
    if tok is None:
        raise ValueError(f"{model_dir} has no tokenizer.json (lmlab tune sft needs lmlab's own tokenizer)")
    read = read_sft(data)
    kind = read[0]
    added = 0
    if kind == "messages":
        model, tok, added = add_chat_tokens(model, tok)
    seq_len = config.seq_len or model.config.block_size
    check_fits(model.config, config, world=dist_env()[1])  # the Trainer's own check, before anything is written
    ds, info = build_dataset(data, tok, seq_len, completion_only=completion_only, val_fraction=val_fraction,
                             seed=config.seed, packing=packing, read=read)
    if lora_hard_tokens and lora is None:
        raise ValueError("--lora-hard-tokens needs --lora-rank")
    if lora_hard_tokens < 0:
        raise ValueError(f"--lora-hard-tokens ({lora_hard_tokens}) must be >= 0")
    if lora is not None and lora_hard_tokens:
        chat = chat_token_ids(tok).values() if kind == "messages" else ()  # added at the mean row: not "hard"
        hard = hardest_tokens(model, ds, seq_len, lora_hard_tokens, exclude={*lora.row_ids(tok)[0], *chat})
        lora = dataclasses.replace(lora, tokens=(*lora.tokens, *hard))
        echo(f"LoRA also trains the rows of the {len(hard)} tokens hardest for the model on the training split: "
             + " ".join(repr(tok.decode([i])) for i in hard))
    if lora is not None:  # here, so that a target the model lacks fails before anything is written
        lora.attach(model, config.seed, tok)
    if added:
        echo(f"added {added} chat tokens to the tokenizer ({len(tok)} tokens now)")
    echo(_describe(info, seq_len))
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / DATA, new=True) as tmp:  # a run started into this folder meanwhile keeps its copy
        shutil.copyfile(data, tmp)
    chat = kind == "messages" or has_template(model_dir)  # prompt-completion from a chat model stays one
    if chat:
        write_template(out)
    if dist_env()[0] == 0:  # its generation defaults and hf_tokenizer/ (while the vocabulary is unchanged)
        keep_init_files(model_dir, out)
    provenance = {"sft": {**info, "base": str(Path(model_dir).resolve()), "source": str(Path(data).resolve()),
                          "data": DATA, "packing": packing, "completion_only": completion_only,
                          "val_fraction": val_fraction, "added_tokens": added}}
    if lora is not None:
        provenance["lora"] = lora.to_dict()
    # the template first: a run on conversations exports lmlab's chat format, not the starting model's
    cbs = [*callbacks, *([ChatTemplate()] if chat else []), *carried(out, model_dir)]
    return train_with_lora(model.train(), tok, ds, config, out, cbs, lora, provenance=provenance)


def resume_sft(out_dir: str | Path, overrides: dict[str, Any] | None = None, callbacks: Sequence[Callback] = (),
               echo: Any = print) -> TrainResult:
    """Continue an SFT run from its last checkpoint, on its own copy of the data, with its own settings."""
    out = Path(out_dir)
    saved = read_run_config(out)
    sft = saved.get("sft")
    if not isinstance(sft, dict):
        raise ValueError(f"{out} is not an SFT run (its config.json has no sft section)")
    config = TrainConfig.from_dict({**saved["train"], **(overrides or {})})
    tok = Tokenizer.load(out / "tokenizer.json")
    model = resumed_model(out, saved["model"])
    seq_len = config.seq_len or model.config.block_size
    ds, info = build_dataset(out / sft["data"], tok, seq_len, completion_only=sft["completion_only"],
                             val_fraction=sft["val_fraction"], seed=config.seed, packing=sft["packing"],
                             kind=sft["kind"])
    echo(_describe(info, seq_len))
    cbs = [*callbacks, ChatTemplate()] if (out / TEMPLATE_FILE).is_file() else list(callbacks)
    cbs += carried(out, sft["base"])  # a run from before init_files/ has none: nothing to carry
    provenance = {k: v for k, v in saved.items() if k not in ("train", "model")}
    lora = LoRAConfig.from_section(saved["lora"]) if saved.get("lora") else None
    return train_with_lora(model, tok, ds, config, out, cbs, lora, resume=True, provenance=provenance)
