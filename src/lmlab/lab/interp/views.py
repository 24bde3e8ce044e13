"""The three views of a model on a prompt as plain data (lists and numbers): the logit lens, every head's
attention, activation patching. `lmlab lab interp` (report.py) draws them into report.html; the web app's model
page (server/routers/interp.py) sends them as JSON. Token ids in, so each caller encodes as it needs."""

from __future__ import annotations

from typing import Any

import torch

from .hooks import (
    activation_patching,
    attention_patterns,
    lens_table,
    logit_lens,
    restored_fraction,
    run_with_residuals,
)


def check_view(view: str, corrupt: str | None, target: str | None, foil: str | None, dash: str = "--") -> None:
    """Which inputs a view takes (the CLI's flags, dash "--"; the API's fields, dash "")."""
    if (view == "patch") != (corrupt is not None):
        raise ValueError(f"{dash}corrupt is needed by patch and only by patch")
    if foil is not None and view != "patch":
        raise ValueError(f"{dash}foil is for patch only")
    if target is not None and view == "attention":
        raise ValueError(f"{dash}target is for lens and patch")


def encode(model: Any, tok: Any, text: str, flag: str = "--prompt", bos: bool = False) -> list[int]:
    """The prompt's ids; `bos` puts <BOS> first (models trained on texts that start with it, such as the
    post-training tasks' models)."""
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"{flag} is empty: give some text")
    ids = [tok.bos_id, *ids] if bos or getattr(tok, "adds_bos", False) else ids  # and the tokenizer's own <BOS>
    if len(ids) > model.config.block_size:
        raise ValueError(f"{flag} is {len(ids)} tokens, more than the model's context ({model.config.block_size})")
    return ids


def token_id(tok: Any, text: str, flag: str) -> int:
    """The first token of `text` (a target such as " Paris" may be one token or several; the first decides)."""
    ids = tok.encode(text)
    if not ids:
        raise ValueError(f"{flag} {text!r} encodes to no tokens")
    if ids[0] == tok.unk_id:  # a char or word tokenizer's unseen character or word
        raise ValueError(f"{flag} {text!r} starts with a character the tokenizer does not know (it reads as <UNK>)")
    return ids[0]


def label(tok: Any, i: int) -> str:
    """Token i as a heatmap's tick, a table's cell and results.json show it: its text (escaped), or, for a byte-level
    token that ends inside a UTF-8 character (alone it decodes to U+FFFD, so every such token read the same "�"),
    its whole characters with the rest as bytes, " <0xD0>"; <id i> where its bytes cannot be told."""
    text = tok.decode([i])
    if "\ufffd" not in text:
        return repr(text)[1:-1] or f"<{i}>"
    raw = tok.token_bytes(i)
    if raw is None or raw.decode("utf-8", "replace") != text:  # not this token's bytes (or a real U+FFFD)
        return f"<id {i}>"
    out = ""
    while raw:
        try:
            return out + repr(raw.decode("utf-8"))[1:-1]
        except UnicodeDecodeError as exc:
            out += repr(raw[:exc.start].decode("utf-8"))[1:-1] + "".join(f"<0x{b:02X}>" for b in raw[exc.start:exc.end])
            raw = raw[exc.end:]
    return out


def stream_labels(n_layer: int) -> list[str]:
    return ["embeddings", *(f"block {i}" for i in range(n_layer))]


def lens_view(model: Any, tok: Any, ids: list[int], target: int | None = None, k: int = 5) -> dict[str, Any]:
    """The logit lens of every residual stream at every position: the top-k tokens of each, and the target's
    (default: the model's own top token after the prompt) probability and rank (0 = top)."""
    lens = logit_lens(model, ids)                                             # (L + 1, T, V)
    with torch.no_grad():
        own = model(torch.tensor([ids])).logits[0]
    tid = int(own[-1].argmax()) if target is None else target
    table = lens_table(lens, tid, min(k, lens.shape[-1]))  # all tokens where the vocabulary is smaller than k
    return {"tokens": [label(tok, i) for i in ids], "streams": stream_labels(model.config.n_layer),
            "target": {"id": tid, "text": label(tok, tid), "prob": table["target_prob"],
                       "rank": table["target_rank"]},
            "top": [[[{"token": label(tok, i), "id": i, "prob": p} for i, p in zip(ids_, ps)]
                     for ids_, ps in zip(layer_ids, layer_ps)]
                    for layer_ids, layer_ps in zip(table["top_ids"], table["top_probs"])],
            "max_abs_diff_last_stream": float((lens[-1] - own).abs().max())}


def attention_view(model: Any, tok: Any, ids: list[int]) -> dict[str, Any]:
    """Every head's attention probabilities (layer, head, query position, key position) and two checks: rows
    sum to 1, no weight on a later token."""
    probs = attention_patterns(model, ids)                                    # (L, H, T, T)
    return {"tokens": [label(tok, i) for i in ids], "attention": probs,
            "max_row_sum_error": float((probs.sum(-1) - 1).abs().max()),
            "max_future_weight": float(probs.triu(1).abs().max())}


def patch_view(model: Any, tok: Any, clean: list[int], corrupt: list[int], target: int | None = None,
               foil: int | None = None, flags: tuple[str, ...] = ("--prompt", "--corrupt", "--target", "--foil"),
               ) -> dict[str, Any]:
    """Activation patching from the clean prompt into the corrupted one: the (stream, position) map of the
    restored fraction of logit(target) - logit(foil) (target: the clean run's top token unless given), and the
    self-checks: patching every position at the embeddings restores 1, patching nothing 0."""
    if len(clean) != len(corrupt):
        raise ValueError(f"{flags[0]} and {flags[1]} must have the same number of tokens ({len(clean)} vs "
                         f"{len(corrupt)})")
    logits, _ = run_with_residuals(model, clean)
    tid = int(logits[0, -1].argmax()) if target is None else target
    if foil == tid:
        raise ValueError(f"{flags[3]} must be a different token from {flags[2]}")
    res = activation_patching(model, clean, corrupt, tid, foil)
    T = len(clean)
    every = {0: torch.ones(1, T, dtype=torch.bool)}
    none = {0: torch.zeros(1, T, dtype=torch.bool)}
    tokens = [label(tok, a) if a == b else f"{label(tok, a)}/{label(tok, b)}" for a, b in zip(clean, corrupt)]
    return {"tokens": tokens,
            "streams": stream_labels(model.config.n_layer),
            "target": {"id": tid, "text": label(tok, tid)},
            "foil": {"id": res["foil"], "text": label(tok, res["foil"])},
            "logit_diff_clean": res["d_clean"], "logit_diff_corrupt": res["d_corrupt"], "restored": res["restored"],
            "restored_all_positions_stream0": restored_fraction(model, clean, corrupt, tid, res["foil"], every),
            "restored_nothing": restored_fraction(model, clean, corrupt, tid, res["foil"], none)}
