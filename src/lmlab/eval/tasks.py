"""Tasks: a small YAML file naming a JSONL file of items, local only (nothing is downloaded).

    name: fables-mc                 # shown in results
    kind: multiple_choice           # multiple_choice | lm | generate
    data: fables-mc.jsonl           # relative to the YAML file, inside its folder (no links followed)
    description: ""                 # text before everything (optional)
    fewshot: 0                      # solved examples before each item, drawn from the other items
    target_delimiter: " "           # between a context and its choice / continuation / reference
    fewshot_delimiter: "\\n\\n"       # between examples
    seed: 0                         # which few-shot examples
    generation: {max_new_tokens: 32, do_sample: false}   # generate only: GenerationConfig fields

One JSON object per line: multiple_choice {"context", "choices": [...], "answer": index}; lm {"context",
"continuation"}; generate {"prompt", "references": [...]}. docs/EVAL.md has the details.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..configs import from_dict, read_config_file
from ..data.jsonl import read_jsonl
from ..models import GenerationConfig, Transformer
from .scorer import score_choices, score_generation, score_greedy

SHIPPED = Path(__file__).parent / "tasks"
FIELDS = {"multiple_choice": {"context": str, "choices": list, "answer": int},
          "lm": {"context": str, "continuation": str},
          "generate": {"prompt": str, "references": list}}
METRICS = {"multiple_choice": ("acc", "acc_norm"), "lm": ("exact",), "generate": ("chrf", "rougeL")}
KEYS = {"name", "kind", "data", "description", "fewshot", "target_delimiter", "fewshot_delimiter", "seed",
        "generation"}
# A task's answers are short (lm-eval's default max_gen_toks is 256); 10**11 was taken and ran for hours
MAX_NEW_TOKENS = 4096


@dataclass
class Task:
    name: str
    kind: str
    items: list[dict[str, Any]]
    description: str = ""
    fewshot: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    seed: int = 0
    generation: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=32, do_sample=False))


def shipped_tasks() -> list[str]:
    return sorted(p.stem for p in SHIPPED.glob("*.yaml"))


def load_task(spec: str | Path) -> Task:
    """A shipped task by name or a YAML file; ValueError naming the file (and line) for anything wrong."""
    path = Path(spec)
    if not path.suffix and (SHIPPED / f"{spec}.yaml").is_file():
        path = SHIPPED / f"{spec}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown task {str(spec)!r}: not a file, nor a shipped task ({', '.join(shipped_tasks())})")
    meta = read_config_file(path)
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: a task file is a mapping (name, kind, data, ...)")
    unknown = sorted(set(meta) - KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(sorted(KEYS))})")
    for key in ("name", "kind", "data"):
        if not isinstance(meta.get(key), str) or not meta[key]:
            raise ValueError(f"{path}: {key!r} must be a non-empty string")
    if meta["kind"] not in FIELDS:
        raise ValueError(f"{path}: kind must be one of {', '.join(FIELDS)}, not {meta['kind']!r}")
    for key in ("fewshot", "seed"):
        value = meta.get(key, 0)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{path}: {key} must be an integer >= 0")
    fewshot = meta.get("fewshot", 0)
    for key in ("description", "target_delimiter", "fewshot_delimiter"):
        if key in meta and not isinstance(meta[key], str):
            raise ValueError(f"{path}: {key!r} must be a string")
    try:
        gen = from_dict(GenerationConfig, {"max_new_tokens": 32, "do_sample": False, **(meta.get("generation") or {})})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{path}: generation: {exc}") from None
    if gen.max_new_tokens > MAX_NEW_TOKENS:
        raise ValueError(f"{path}: generation: max_new_tokens ({gen.max_new_tokens}) must be <= {MAX_NEW_TOKENS}")
    items = read_items(data_path(path, meta["data"]), meta["kind"])
    if fewshot >= len(items):
        raise ValueError(f"{path}: fewshot ({fewshot}) must be below the number of items ({len(items)})")
    return Task(meta["name"], meta["kind"], items, meta.get("description", ""), fewshot,
                meta.get("target_delimiter", " "), meta.get("fewshot_delimiter", "\n\n"), meta.get("seed", 0), gen)


def data_path(path: Path, data: str) -> Path:
    """The data file a task names: relative to its YAML file and inside that folder, with no symbolic link on the
    way (the workspace's rule): the server lists and reads the workspace's tasks, and `data: /elsewhere/x.jsonl`
    or a linked x.jsonl read files outside it."""
    rel = Path(data)
    if rel.anchor or ".." in rel.parts:
        raise ValueError(f"{path}: data ({data!r}) must be a path relative to the task's folder, inside it")
    out = path.parent
    for part in rel.parts:
        out = out / part
        if out.is_symlink():
            raise ValueError(f"{path}: data ({data!r}) goes through a symbolic link, {out}; links are not followed: "
                             "put the file itself beside the task")
    return out


def read_items(path: Path, kind: str) -> list[dict[str, Any]]:
    """The JSONL items of a task, each checked: `FILE:LINE: reason` for the first bad one."""
    if not path.is_file():
        raise ValueError(f"task data not found: {path}")
    return [item for _, item in read_jsonl(path, lambda item: _checked(item, kind))]


def _checked(item: Any, kind: str) -> dict[str, Any]:
    problem = _check(item, kind)
    if problem:
        raise ValueError(problem)
    return item


def _check(item: Any, kind: str) -> str | None:
    if not isinstance(item, dict):
        return "each line must be a JSON object"
    for key, typ in FIELDS[kind].items():
        if key not in item:
            return f"missing {key!r} (a {kind} item has {', '.join(FIELDS[kind])})"
        if not isinstance(item[key], typ) or isinstance(item[key], bool):
            return f"{key!r} must be a {typ.__name__}"
    listed = item.get("choices", item.get("references"))
    if listed is not None and (not listed or not all(isinstance(c, str) and c for c in listed)):
        name = "choices" if kind == "multiple_choice" else "references"
        return f"{name} must be a non-empty list of non-empty strings"
    if kind == "lm" and not item["continuation"]:  # nothing to score would count as right
        return "continuation must be a non-empty string"
    if kind == "multiple_choice" and not 0 <= item["answer"] < len(item["choices"]):
        return f"answer {item['answer']} is not an index of the {len(item['choices'])} choices"
    return None


def prompts(task: Task) -> list[dict[str, Any]]:
    """Items with their full prompt: description, `fewshot` solved examples from the other items (the same
    for every run: seeded by the task's seed and the item's index), then the item."""
    key = "prompt" if task.kind == "generate" else "context"
    out = []
    for i, item in enumerate(task.items):
        others = [j for j in range(len(task.items)) if j != i]
        shots = random.Random(task.seed * 1_000_003 + i).sample(others, task.fewshot) if task.fewshot else []
        parts = [solved_text(task, task.items[j]) for j in shots]
        prefix = task.description + task.fewshot_delimiter.join(parts) + (task.fewshot_delimiter if parts else "")
        out.append({**item, key: prefix + item[key]})
    return out


def solved_text(task: Task, item: dict[str, Any]) -> str:
    """An item with its answer, as a few-shot example shows it (and as a model that memorised it saw it)."""
    d = task.target_delimiter
    if task.kind == "multiple_choice":
        return item["context"] + d + item["choices"][item["answer"]]
    if task.kind == "lm":
        return item["context"] + d + item["continuation"]
    return item["prompt"] + d + item["references"][0]


def run_task(model: Transformer, tokenizer: Any, task: Task, *, batch_size: int = 16) -> dict[str, Any]:
    """Score `model` on `task`: {"task", "kind", "n", "metrics": {name: mean}, "items": [per-item scores]}."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:  # 0: a range() error
        raise ValueError("--batch-size must be >= 1")
    items = prompts(task)
    extra: dict[str, Any] = {}
    if task.kind == "multiple_choice":
        scored = score_choices(model, tokenizer, items, delimiter=task.target_delimiter, batch_size=batch_size)
    elif task.kind == "lm":
        scored = score_greedy(model, tokenizer, items, delimiter=task.target_delimiter, batch_size=batch_size)
    else:
        scored, extra = score_generation(model, tokenizer, items, task.generation, batch_size=batch_size)
    metrics = {m: sum(s[m] for s in scored) / len(scored) for m in METRICS[task.kind]}
    for k in ("bleu", "chrf", "rouge1", "rouge2", "rougeL"):
        if k in extra:
            metrics[f"corpus_{k}"] = extra[k]
    out = {"task": task.name, "kind": task.kind, "n": len(scored), "metrics": metrics, "items": scored}
    if "signatures" in extra:
        out["signatures"] = extra["signatures"]
    return out
