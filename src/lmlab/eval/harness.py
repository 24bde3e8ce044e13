"""The bridge to EleutherAI's lm-evaluation-harness (https://github.com/EleutherAI/lm-evaluation-harness): an
`LM` registered as `lmlab` that scores with lmlab.eval's scorer, so an lmlab model directory is evaluated
directly (no transformers round trip) and gives the numbers `lmlab eval` gives.

    pip install 'lmlab[eval]'
    python -m lmlab.eval.harness --model lmlab --model_args path=runs/demo/final --tasks my_task \\
        --include_path my_tasks/      # lm_eval's own flags; this only registers the model first
    lmlab-lm-eval ...                 # the same, as a command

lm-eval lists its models in a fixed table, so `lm_eval` itself finds `lmlab` only after `import
lmlab.eval.harness` (in Python: lm_eval.simple_evaluate(model="lmlab", ...) after the import).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

try:
    # lm-eval fills its registry with its own models only while the registry is empty: fill it first, or
    # registering `lmlab` would hide `hf` and the others
    import lm_eval.models  # noqa: F401
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as exc:  # the optional extra
    raise ImportError("the lm-evaluation-harness bridge needs lm_eval: pip install 'lmlab[eval]'") from exc

from ..models import GenerationConfig, generate
from ..models.io import load_pretrained
from ..tokenizers.chat_format import CHAT_TOKENS, END, MARKERS, chat_token_ids, has_template
from .scorer import encode_pair, loglikelihood, nll_many


@register_model("lmlab")
class LmlabLM(LM):
    """model_args: path=MODEL_DIR (required), device=cpu|cuda (cpu), batch_size=N (16)."""

    def __init__(self, path: str | None = None, device: str = "cpu", batch_size: int | str = 16, **_: Any) -> None:
        super().__init__()
        if not path:
            raise ValueError("--model_args needs path=MODEL_DIR")
        if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cpu"  # lm_eval's command line asks for cuda unless told otherwise
        self.model, self.tokenizer = load_pretrained(path, device=device)
        if self.tokenizer is None:
            raise ValueError(f"{path} has no tokenizer.json")
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 16  # "auto" -> the default
        self.path = Path(path)
        self.chat: ChatText | None = None  # set by apply_chat_template: lm-eval's --apply_chat_template

    @property
    def tokenizer_name(self) -> str:
        """What lm-eval fingerprints its request cache with, beside the chat template."""
        return str(self.path.resolve())

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """lm-eval's few-shot conversation as the model's chat format, in text: each turn is its role token, its
        text and <|end|> (tune/chat.py), then <|assistant|> for the reply; without add_generation_prompt the last
        (assistant) turn stays open, as transformers' continue_final_message leaves it."""
        if self.chat is None:
            if not has_template(self.path):
                raise ValueError(f"{self.path} has no lmlab chat template (chat_template.jinja): leave out "
                                 "--apply_chat_template, or fine-tune it on conversations first (lmlab tune sft)")
            chat_token_ids(self.tokenizer)  # its four tokens, or a one-line error
            self.chat = ChatText(self.tokenizer)
        for i, m in enumerate(chat_history, 1):
            if not isinstance(m, dict) or m.get("role") not in MARKERS or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} needs a role ({', '.join(MARKERS)}) and a text, not {m!r:.80}")
        text = "".join(f"{MARKERS[m['role']]}{m['content']}{END}" for m in chat_history)
        if add_generation_prompt:
            return text + MARKERS["assistant"]
        return text.removesuffix(END) if chat_history and chat_history[-1]["role"] == "assistant" else text

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.chat or self.tokenizer, *r.args) for r in requests]
        return loglikelihood(self.model, pairs, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text after one <EOS> (the <BOS> of a tokenizer that puts one before a text), in disjoint windows of
        the model's context: lm-eval's rolling windows."""
        tok = self.tokenizer
        first = tok.bos_id if tok.adds_bos else tok.eos_id
        seqs = [[first, *tok.encode(r.args[0])] for r in requests]
        return [-total for total, _ in nll_many(self.model, seqs, batch_size=self.batch_size)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        # a chat prompt's reply ends at <|end|>, the turn's end, as lmlab chat's does
        tok = self.tokenizer if self.chat is None else self.chat.replying()
        return [generate(self.model, tok, r.args[0], generation_config(r.args[1])) for r in requests]


class ChatText:
    """The tokenizer as a chat-templated prompt needs it: lmlab never reads its role tokens and <|end|> from text
    (a message cannot forge a turn), but lm-eval hands the rendered conversation over as text, so here the four
    are read as their tokens, as transformers and llama.cpp read them in a rendered template. The text between
    them is encoded on its own, so the ids are tune.chat.render's. Everything else is the tokenizer's."""

    def __init__(self, tokenizer: Any, stop_id: int | None = None) -> None:
        self._tok, self._ids = tokenizer, {t: tokenizer.token_to_id(t) for t in CHAT_TOKENS}
        self._split = re.compile("(" + "|".join(map(re.escape, CHAT_TOKENS)) + ")").split
        self.eos_id = tokenizer.eos_id if stop_id is None else stop_id

    def replying(self) -> ChatText:
        """The same, whose end of text is the turn's end: generation stops at <|end|>."""
        return ChatText(self._tok, self._ids[END])

    adds_bos = False  # the chat format's turns start with their role tokens (render adds no <BOS>)

    def encode(self, text: str, *, add_bos: bool = False) -> list[int]:
        ids: list[int] = [self._tok.bos_id] if add_bos else []
        for i, piece in enumerate(self._split(text)):
            ids += [self._ids[piece]] if i % 2 else self._tok.encode(piece) if piece else []
        return ids

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):  # not yet set (a copy being made): no recursion through _tok
            raise AttributeError(name)
        return getattr(self._tok, name)


SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty", "num_beams", "seed")


def generation_config(kwargs: dict[str, Any]) -> GenerationConfig:
    """A task's generation_kwargs as lm-eval's hf model reads them: `until` (stop strings), `max_gen_toks`
    (256), `do_sample` (False: greedy, whatever the temperature, as transformers' generate), and the sampling
    settings; one this model does not know is an error that names it (the hf model passes it on to transformers,
    which refuses it too)."""
    kwargs = dict(kwargs)
    until = kwargs.pop("until", None) or []
    max_new = int(kwargs.pop("max_gen_toks", 256))
    do_sample = bool(kwargs.pop("do_sample", False))
    unknown = sorted(set(kwargs) - set(SAMPLING_KEYS))
    if unknown:
        raise ValueError(f"generation_kwargs {', '.join(unknown)} are not known to lmlab (it takes until, "
                         f"max_gen_toks, do_sample, {', '.join(SAMPLING_KEYS)})")
    if not do_sample:  # greedy: the sampling settings do not apply
        kwargs = {k: v for k, v in kwargs.items() if k in ("num_beams", "repetition_penalty")}
    return GenerationConfig(max_new_tokens=max_new, do_sample=do_sample, **kwargs,
                            stop_strings=[until] if isinstance(until, str) else list(until))


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
