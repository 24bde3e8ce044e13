"""The chat format: role tokens, one renderer, and the same format as a Jinja template for other libraries.

    <|system|>Answer briefly.<|end|><|user|>What is 2 plus 3?<|end|><|assistant|>Answer: 5.<|end|>

Each turn is its role token, its text (encoded on its own) and <|end|>; no text between them, so encoding the
rendered string with the four tokens matched (transformers' apply_chat_template, llama.cpp) gives exactly
the ids of `render`. The mask is 1 on an assistant turn's text and its <|end|> (the model learns what to say
and when to stop), 0 on role tokens and on every other turn. `TEMPLATE` says the same in Jinja, with the
assistant part inside `{% generation %}` so that transformers' `return_assistant_tokens_mask=True` gives the
same mask (a template without those markers gives an all-zero mask, and a run that trains on it learns
nothing: the common failure this format rules out). A model directory records the format as
`chat_template.jinja` (transformers' own file name); `lmlab export hf` puts it in tokenizer_config.json and
`lmlab export gguf` in `tokenizer.chat_template`.

The role tokens are special tokens: lmlab never produces them from text, so a message cannot forge a turn.
Other libraries match them in text (they parse the rendered template string), so text that spells a role
token renders differently there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken
from tokenizers import Tokenizer as HFTokenizer

from ..files import atomic_write_text
from ..models import GenerationConfig, Transformer
from ..models.generation import StopText, iter_tokens
from ..models.io import load_pretrained
from ..tokenizers import Tokenizer
from ..tokenizers.chat_format import (  # noqa: F401 (the format's names, used from here too)
    CHAT_TOKENS,
    END,
    MARKERS,
    TEMPLATE,
    TEMPLATE_FILE,
    chat_token_ids,
    has_template,
)
from ..train.trainer import Callback
from .data import ROLES


def with_chat_tokens(tokenizer: Tokenizer) -> tuple[Tokenizer, list[str]]:
    """The tokenizer with the chat tokens it lacks added as special tokens (itself when it has them all), and
    the ones added: what fine-tuning on conversations makes of it (add_chat_tokens), for a preview without the
    model."""
    missing = [t for t in CHAT_TOKENS if tokenizer.token_to_id(t) is None]
    if not missing:
        return tokenizer, []
    hf = HFTokenizer.from_str(tokenizer.hf.to_str())
    hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    return Tokenizer(hf), missing


def add_chat_tokens(model: Transformer, tokenizer: Tokenizer) -> tuple[Transformer, Tokenizer, int]:
    """The model and tokenizer with the chat tokens (those missing), and how many were added. The embedding
    (and an untied head) grows to the new vocabulary; the new rows start at the mean of the rows of the
    tokenizer's existing tokens. Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language
    Models" (https://nlp.stanford.edu/~johnhew/vocab-expansion.html): a new output row at the mean gives the
    new token the mean logit, so the model's distribution over its old tokens hardly moves (the KL to the old
    model is at most log(1 + k/n) for k new of n tokens), where a random or zero row can outrank real tokens
    and make early fine-tuning steps spend themselves undoing it; on the input side the mean is a point
    inside the region the layers were trained on."""
    new_tok, missing = with_chat_tokens(tokenizer)
    if not missing:
        return model, tokenizer, 0
    old_n, cfg = len(tokenizer), model.config
    if len(new_tok) > cfg.vocab_size:
        grown = Transformer(dataclasses.replace(cfg, vocab_size=len(new_tok))).to(model.tok_emb.weight.device)
        state = model.state_dict()
        for key in ("tok_emb.weight", "lm_head.weight"):
            rows = state[key]
            state[key] = torch.cat([rows, rows.new_zeros(len(new_tok) - cfg.vocab_size, rows.shape[1])])
        grown.load_state_dict(state)
        model = grown.train(model.training)  # a loaded model arrives in eval mode: so does its grown copy
    new_ids = [new_tok.token_to_id(t) for t in missing]
    with torch.no_grad():
        heads = [model.tok_emb.weight] + ([] if cfg.tie_embeddings else [model.lm_head.weight])
        for w in heads:
            w[new_ids] = w[:old_n].mean(0)
    return model, new_tok, len(missing)


def render(messages: Sequence[dict[str, str]], tokenizer: Tokenizer, *,
           add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """(ids, mask) of a conversation: mask 1 on assistant text and its <|end|>. With add_generation_prompt the
    ids end with <|assistant|>, the prompt for the model's next turn."""
    marker = chat_token_ids(tokenizer)
    ids: list[int] = []
    mask: list[int] = []
    for m, text in zip(messages, tokenizer.encode_batch([m["content"] for m in messages])):
        trained = int(m["role"] == "assistant")
        ids += [marker[m["role"]], *text, marker["end"]]
        mask += [0] + [trained] * (len(text) + 1)
    if add_generation_prompt:
        ids.append(marker["assistant"])
        mask.append(0)
    return ids, mask


def write_template(model_dir: str | Path) -> None:
    atomic_write_text(Path(model_dir) / TEMPLATE_FILE, TEMPLATE)


class ChatTemplate(Callback):
    """final/ of a run carries the chat template, so lmlab chat, the Chat view and the exports find it: a run on
    conversations (SFT), or a preference or GRPO run that started from a chat model."""

    def on_final(self, trainer: Any, folder: Path) -> None:
        write_template(folder)


def load_chat_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[Transformer, Tokenizer]:
    """A model directory that speaks lmlab's chat format; a one-line ValueError for one that does not."""
    path = Path(path)
    model, tok = load_pretrained(path, device=device)
    file = path / TEMPLATE_FILE
    if tok is None or not file.is_file():
        raise ValueError(f"{path} has no chat template: fine-tune it on conversations first "
                         f"(lmlab tune sft --model {path} --data CHATS.jsonl --out RUN)")
    if file.read_text(encoding="utf-8") != TEMPLATE:
        raise ValueError(f"{path} has a chat template that is not lmlab's (<|user|>...<|end|>); lmlab chat "
                         "renders only its own")
    chat_token_ids(tok)
    return model, tok


def fit_history(messages: list[dict[str, str]], tokenizer: Tokenizer, room: int) -> list[dict[str, str]]:
    """The conversation without its oldest rounds (a leading system turn stays) until its prompt takes at most
    `room` tokens; ValueError when even the last message alone does not fit."""
    system = messages[:1] if messages and messages[0]["role"] == "system" else []
    turns = messages[len(system):]
    while True:
        kept = system + turns
        if len(render(kept, tokenizer, add_generation_prompt=True)[0]) <= room:
            return kept
        if len(turns) <= 1:
            raise ValueError(f"the message is too long for the model's context ({room} tokens with room "
                             "for a reply)")
        turns = turns[1:]
        while len(turns) > 1 and turns[0]["role"] != "user":  # whole rounds go: no answer without its question
            turns = turns[1:]


def reply(model: Transformer, tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
          config: GenerationConfig) -> Iterator[str]:
    """Stream the assistant's next turn as text; it ends at <|end|> (or <EOS>), before one of the config's stop
    strings, or when the context is full (the config's beams and stop_at_eos do not apply: a reply is sampled)."""
    for i, m in enumerate(messages, 1):  # the library's callers too: a KeyError deep in render() otherwise
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} needs a role ({', '.join(ROLES)}) and a text content, not {m!r:.80}")
    ids, _ = render(messages, tokenizer, add_generation_prompt=True)
    end = chat_token_ids(tokenizer)["end"]
    room = model.config.block_size - len(ids)
    if room < 1:
        raise ValueError("the conversation fills the model's context")
    cfg = dataclasses.replace(config, max_new_tokens=min(config.max_new_tokens, room), stop_at_eos=True,
                              num_beams=1)
    text = StopText(tokenizer, cfg.stop_strings)  # the reply's text, cut before a stop string
    for tokens, _ in iter_tokens(model, [ids], cfg, eos_token_id=end, pad_id=tokenizer.pad_id):
        token = int(tokens[0])
        if token in (end, tokenizer.eos_id):
            break
        if piece := text.push(token):
            yield piece
        if text.stopped:
            return
    if rest := text.flush():
        yield rest


def generate_reply(model: Transformer, tokenizer: Tokenizer, messages: Sequence[dict[str, str]],
                   config: GenerationConfig | None = None, **overrides: Any) -> str:
    return "".join(reply(model, tokenizer, messages, dataclasses.replace(config or GenerationConfig(), **overrides)))
