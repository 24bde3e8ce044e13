"""Model merging: several model directories of one architecture and one tokenizer -> one model directory.

    merged = merge_tensors([a, b], "slerp", t=0.5)                       # one tensor
    merge_dirs(["a", "b"], "out", "ties", base="parent", density=0.5)    # whole models, as `lmlab merge`

The methods are those of mergekit (https://github.com/arcee-ai/mergekit), each in fp32 over every tensor of the
state dict (a tied embedding/head merged once):
- linear: the weighted mean of the parents (weights normalised to sum 1, as mergekit's default).
- slerp: spherical linear interpolation of two parents at t (Shoemake 1985, "Animating rotation with quaternion
  curves", https://doi.org/10.1145/325165.325242, as mergekit applies it per tensor: the angle between the
  flattened tensors, falling back to linear interpolation when they are nearly parallel).
- task-arithmetic: base + lambda * sum_i w_i (theta_i - base) (Ilharco et al. 2023, "Editing models with task
  arithmetic", https://arxiv.org/abs/2212.04089).
- ties: trim each task vector to its round(density x size) largest entries by magnitude (mergekit truncates
  instead: at most one entry fewer per tensor), elect each entry's sign by the summed
  (weighted) mass, take the disjoint mean of the weighted entries agreeing with it, sum(w_i d_i) / sum(w_i) over
  them, times lambda (Yadav et al. 2023, "TIES-Merging", https://arxiv.org/abs/2306.01708); a weight sum of 0 divides
  by 1, as mergekit does, so a negative weight gives mergekit's numbers.
- dare: drop each delta entry with p = 1 - density, rescale the kept ones by 1/density, then add them as task
  arithmetic does (Yu et al. 2024, "Language models are Super Mario", https://arxiv.org/abs/2311.03099;
  mergekit's dare_linear).
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

import torch

from ..files import atomic_write_text, staged_dir

METHODS = ("linear", "slerp", "task-arithmetic", "ties", "dare")
NEEDS_BASE = ("task-arithmetic", "ties", "dare")
MERGE = "merge.json"


def slerp(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-8) -> torch.Tensor:
    """mergekit's slerp: the angle from the normalised tensors, the weights applied to the originals, so t = 0
    and t = 1 give the parents exactly (sin(x)/sin(x) = 1, sin(0) = 0)."""
    na, nb = a / max(a.norm().item(), eps), b / max(b.norm().item(), eps)
    dot = float((na.double() * nb.double()).sum().clamp(-1, 1))
    if abs(dot) > 0.9995:  # nearly parallel: the angle is ill-conditioned, lerp is the limit
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    s0, s1 = math.sin(theta - theta * t) / math.sin(theta), math.sin(theta * t) / math.sin(theta)
    return s0 * a + s1 * b


def ties_delta(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Trim, elect, disjoint merge (TIES): the merged task vector before lambda."""
    trimmed = []
    for d in deltas:
        k = int(round(density * d.numel()))
        if k >= d.numel():
            trimmed.append(d)
            continue
        keep = torch.zeros(d.numel(), dtype=torch.bool)
        if k > 0:
            keep[d.abs().flatten().topk(k).indices] = True
        trimmed.append(d * keep.view_as(d))
    w = torch.tensor(weights, dtype=torch.float32).view(-1, *[1] * deltas[0].dim())
    stacked = torch.stack(trimmed) * w
    sign = torch.where(stacked.sum(0) >= 0, 1.0, -1.0)   # the elected sign: the sign of the summed mass
    agree = stacked.sign() == sign                        # zeros (trimmed) agree with nothing
    total = (w * agree).sum(0)
    # mergekit's divisor: the agreeing weights' sum, 1 where it is 0 (no entry agrees, or a negative weight cancels
    # a positive one). Zeroing every entry whose sum was not positive wiped out the ones a negative weight elected.
    return (stacked * agree).sum(0) / torch.where(total == 0, torch.ones_like(total), total)


def dare_delta(delta: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor:
    """Drop and rescale (DARE): E[result] = delta."""
    if density >= 1:
        return delta
    keep = torch.rand(delta.shape, generator=generator) < density
    return delta * keep / density


def merge_tensors(tensors: list[torch.Tensor], method: str, *, base: torch.Tensor | None = None,
                  weights: list[float] | None = None, t: float = 0.5, density: float = 1.0, lam: float = 1.0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """One tensor of the merged model from the parents' (fp32)."""
    weights = weights or [1.0] * len(tensors)
    if method == "linear":  # normalised before the sum: weights of 1e308 each overflow no sum
        largest = max(abs(w) for w in weights)
        scaled = [w / largest for w in weights]
        return sum((w / sum(scaled)) * x for w, x in zip(scaled, tensors))
    if method == "slerp":
        return slerp(tensors[0], tensors[1], t)
    deltas = [x - base for x in tensors]
    if method == "ties":
        return base + lam * ties_delta(deltas, weights, density)
    if method == "dare":
        generator = generator or torch.Generator().manual_seed(0)
        deltas = [dare_delta(d, density, generator) for d in deltas]
    return base + lam * sum(w * d for w, d in zip(weights, deltas))


# which method reads which setting (the merge.json key and --flag is "lambda" for lam), and its default
USES = {"t": ("slerp",), "density": ("ties", "dare"), "lam": NEEDS_BASE, "seed": ("dare",)}
DEFAULTS = {"t": 0.5, "density": 1.0, "lam": 1.0, "seed": 0}


def _flag(key: str) -> str:
    return "lambda" if key == "lam" else key


def check_parameters(method: str, n: int, base: Any, weights: list[float] | None, *, t: float | None = None,
                     density: float | None = None, lam: float | None = None, seed: int | None = None
                     ) -> dict[str, Any]:
    """ValueError for settings that do not fit; else every setting (t, density, lam, seed), a default where None.
    A setting given (not None) that `method` does not read is refused: it would be ignored without a word."""
    if method not in METHODS:
        raise ValueError(f"--method {method!r} is not a method; choose one of {', '.join(METHODS)}")
    if method in NEEDS_BASE and base is None:
        raise ValueError(f"--method {method} needs --base BASE (the model the parents were fine-tuned from)")
    if method == "slerp" and n != 2:
        raise ValueError(f"--method slerp merges exactly two models, not {n}")
    if method not in NEEDS_BASE and base is not None:
        raise ValueError(f"--base is used by {', '.join(NEEDS_BASE)} only")
    if n < (1 if method in NEEDS_BASE else 2):
        raise ValueError(f"--method {method} needs at least {1 if method in NEEDS_BASE else 2} models")
    if weights is not None and method == "slerp":  # its one setting is t: weights would be ignored without a word
        raise ValueError("--weights is not used by --method slerp; its setting is --t (0: the first model, 1: the "
                         "second)")
    given = {"t": t, "density": density, "lam": lam, "seed": seed}
    for key, value in given.items():
        if value is not None and method not in USES[key]:
            raise ValueError(f"--{_flag(key)} is used by {', '.join(USES[key])} only, not by --method {method}")
    settings = {key: DEFAULTS[key] if value is None else value for key, value in given.items()}
    number = lambda x: isinstance(x, numbers.Real) and not isinstance(x, bool)  # noqa: E731 (numpy's scalars too)
    for key in ("t", "density", "lam"):
        if not number(settings[key]):
            raise ValueError(f"--{_flag(key)} must be a number, not {settings[key]!r}")
    if weights is not None and (isinstance(weights, (str, bytes)) or not all(number(w) for w in weights)):
        raise ValueError(f"--weights must be a list of numbers, not {weights!r}")
    if weights is not None and len(weights) != n:
        raise ValueError(f"--weights has {len(weights)} numbers for {n} models; give one per model")
    if weights is not None and not all(math.isfinite(w) for w in weights):
        raise ValueError(f"--weights must be finite numbers, not {','.join(map(str, weights))}")
    if not math.isfinite(settings["lam"]):  # nan or inf: a model of NaN, written without complaint
        raise ValueError(f"--lambda must be a finite number, not {settings['lam']}")
    if weights is not None and method == "linear" and sum(weights) == 0:
        raise ValueError("--weights sum to 0; a linear merge divides by their sum")
    if not 0 <= settings["t"] <= 1:
        raise ValueError(f"--t must be between 0 and 1, not {settings['t']}")
    if not 0 < settings["density"] <= 1:
        raise ValueError(f"--density must be in (0, 1], not {settings['density']}")
    seed = settings["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an integer from 0 to 2^63 - 1, not {seed}")
    return settings


def _refuse_folder(path: Path) -> None:
    from .io import CONFIG, WEIGHTS
    from .quant import QUANTIZATION

    if (path / "adapter_config.json").is_file():  # PEFT's adapter layout (tune/lora.py writes it)
        raise ValueError(f"{path} is a LoRA adapter, not a model; merge it into its base first (lmlab lora merge)")
    if (path / QUANTIZATION).is_file():
        raise ValueError(f"{path} is an int8/int4 model; merge the models it was quantized from")
    for name in (CONFIG, WEIGHTS):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a model directory: {name} is missing")


def check_parents(every: list[Path]) -> None:
    """ValueError unless every folder is an fp32 model directory of one architecture and one tokenizer."""
    from .io import CONFIG, HF_TOKENIZER_DIR, TOKENIZER

    for p in every:
        _refuse_folder(p)
    first = every[0]
    for p in every[1:]:
        for name in (TOKENIZER, f"{HF_TOKENIZER_DIR}/{TOKENIZER}"):  # the second: an imported foreign vocabulary
            mine, theirs = (first / name), (p / name)
            if mine.is_file() != theirs.is_file() or (mine.is_file() and mine.read_bytes() != theirs.read_bytes()):
                raise ValueError(f"{first} and {p} have different tokenizers ({name} differs); "
                                 "merging needs one vocabulary")
        a, b = json.loads((first / CONFIG).read_text()), json.loads((p / CONFIG).read_text())
        if a != b:
            diff = [f"{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            raise ValueError(f"{first} and {p} have different architectures ({CONFIG}: {', '.join(diff[:3])})")


def require_finite(tensors: dict[str, torch.Tensor], what: str, why: str) -> None:
    """ValueError naming the first tensor of `tensors` with an inf or a NaN: a merge that overflows fp32 must not
    write a model of NaN without a word (finite settings can overflow: weights 1e308, lambda 1e39)."""
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise ValueError(f"{what} gives non-finite weights ({len(bad)} tensors, the first {bad[0]}): {why}; "
                         "nothing was written")


def merge_dirs(parents: list[str | Path], out: str | Path, method: str, *, base: str | Path | None = None,
               weights: list[float] | None = None, t: float | None = None, density: float | None = None,
               lam: float | None = None, seed: int | None = None) -> Path:
    """Merge model directories into a new one (refused if `out` has anything in it; written beside it and renamed).
    The tokenizer (or hf_tokenizer/), generation defaults and chat template are copied from the first parent;
    merge.json records how it was made. The settings the method does not read stay None (DEFAULTS where it reads
    them: t 0.5, density 1, lam 1, seed 0)."""
    from .io import copy_side_files, load_pretrained, save_pretrained
    from .quant import refuse_quantized

    if isinstance(parents, (str, bytes, Path)):  # one path: its characters are no list of models
        raise ValueError(f"parents must be a list of model directories, not the single path {str(parents)!r}")
    out, paths = Path(out), [Path(p) for p in parents]
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"{out} exists and is not empty; choose a new folder for the merged model")
    settings = check_parameters(method, len(paths), base, weights, t=t, density=density, lam=lam, seed=seed)
    t, density, lam, seed = (settings[k] for k in ("t", "density", "lam", "seed"))
    every = paths + ([Path(base)] if base is not None else [])
    check_parents(every)
    first = every[0]
    loaded = [load_pretrained(p) for p in every]
    for model, _ in loaded:
        refuse_quantized(model)
    model, tok = loaded[0]
    states = [m.state_dict() for m, _ in loaded]
    base_state = states[-1] if base is not None else None
    generator = torch.Generator().manual_seed(seed)
    merged: dict[str, torch.Tensor] = {}
    done: dict[int, torch.Tensor] = {}  # data_ptr -> merged: a tied embedding/head is one tensor, merged once
    for key, value in states[0].items():
        if not value.is_floating_point():
            merged[key] = value
            continue
        if value.data_ptr() not in done:
            done[value.data_ptr()] = merge_tensors(
                [s[key].float() for s in states[:len(paths)]], method,
                base=base_state[key].float() if base_state is not None else None,
                weights=weights, t=t, density=density, lam=lam, generator=generator)
        merged[key] = done[value.data_ptr()]
    require_finite(merged, "the merge", "the --weights or --lambda are too large for fp32" + (
        f", or --density {density} so small that DARE's rescale 1/density overflows it" if method == "dare" else ""))
    model.load_state_dict(merged)
    record = {"method": method, "parents": [str(p.resolve()) for p in paths],
              "base": str(Path(base).resolve()) if base is not None else None,
              "weights": weights, **{_flag(k): v if method in USES[k] else None for k, v in settings.items()}}
    with staged_dir(out, replace=False) as tmp:
        save_pretrained(tmp, model.float(), tok)
        atomic_write_text(tmp / MERGE, json.dumps(record, indent=2) + "\n")
        copy_side_files(first, tmp)  # not training.json: the merge is no run's result; merge.json says what it is
    return out
