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

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *r.args) for r in requests]
        return loglikelihood(self.model, pairs, batch_size=self.batch_size)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Each text after one <EOS> (the <BOS> of a tokenizer that puts one before a text), in disjoint windows of
        the model's context: lm-eval's rolling windows."""
        tok = self.tokenizer
        first = tok.bos_id if tok.adds_bos else tok.eos_id
        seqs = [[first, *tok.encode(r.args[0])] for r in requests]
        return [-total for total, _ in nll_many(self.model, seqs, batch_size=self.batch_size)]

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        return [generate(self.model, self.tokenizer, r.args[0], generation_config(r.args[1])) for r in requests]


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
