"""A designed micro-dataset against a scale baseline (`lmlab lab data design`): does a small dataset built with
the data tools teach a model the target better than a random sample of the same size, or than a larger one?

Lee et al. 2022 ("Deduplicating Training Data Makes Language Models Better", https://arxiv.org/abs/2107.06499)
and the FineWeb filters (Penedo et al. 2024, "The FineWeb Datasets", https://arxiv.org/abs/2406.17557) are the
published cases of curation beating raw scale; this lab runs that comparison on the user's own sources.

    lmlab lab data design --quick --out runs/design            # the built-in pool, 3 seeds, minutes
    lmlab lab data design books/ --target val.txt --out runs/design2

The pool is every paragraph of the sources. The designed set is the pool after
1. near-duplicate removal (MinHash + LSH over 5-word shingles, lmlab data dedup --level paragraph --keep one), then
2. dropping the paragraphs that lab/split.py's documented rules label noise (too short, mostly symbols,
   repetitive, mostly short lines).
Its tokens are the budget B. Three arms then train the same model for the same steps from the same
initialisation, per seed: the designed set; a random sample of the pool's paragraphs with B tokens ("same
budget"); a random sample with `larger` x B tokens ("larger"; the whole pool at most). Each is scored by its
mean token loss on the target text, and with `tasks` also on eval tasks (lmlab.eval: a shipped task's name or a
task YAML; the task's first metric, e.g. multiple choice's acc). The verdict: the designed set beats the
same-budget sample on at least 2/3 of the seeds, and is at least as good as the larger sample on at least 2/3 of
them; on each task, it scores at least as well as the same-budget sample on at least 2/3 of the seeds.

The built-in pool (offline, deterministic): folk tales of the demo grammar, a tenth of them copied 20 times
each with one word changed (duplicate spam, as scraped corpora hold it), arithmetic lines and sensor logs
(off-target, as in lab data mix), and lines of symbol junk; the target is held-out tales. Curation removes the
copies and the noise the split rules name (the junk lines, and most sums by their share of symbols) but, knowing
nothing of the target, keeps the logs.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
import time
from pathlib import Path
from typing import Any

from ..configs import knob, validate
from ..data import find_documents, prepare_texts, read_document
from ..data.dedup import DedupConfig, dedup_texts
from ..eval.tasks import METRICS, load_task, run_task
from ..models import ModelConfig
from ..models.io import load_pretrained
from ..tokenizers import Tokenizer
from ..train.demo_corpus import demo_corpus
from .facts.report import write_report
from .mix import _log, _run, _sums, save_target, set_up
from .parallel import process_map
from .split import heuristic_scores, label, passages


@dataclasses.dataclass
class DesignLabConfig:
    steps: int = 300
    layers: int = 2
    embd: int = 64
    block_size: int = 64
    batch_size: int = 16
    vocab_size: int = knob(384, "the BPE tokenizer's vocabulary (4 specials + 256 bytes at least)", ge=260)
    lr: float = knob(3e-3, "learning rate of every model", gt=0)
    larger: float = 4.0         # the scale baseline's tokens, as a multiple of the designed set's
    stories: int = 240          # built-in pool: tales (and as many held out for the target, a fifth of them)
    copies: int = knob(20, "built-in pool: near copies of each of the first tenth of the tales (spam)", ge=0)
    tasks: tuple[str, ...] = ()  # eval tasks every arm's model is also scored on (names or YAML paths)

    def __post_init__(self) -> None:
        # before validate, whose "must be a finite number" would say less; nan and inf fail here too
        if isinstance(self.larger, (int, float)) and not 1 < self.larger < math.inf:
            raise ValueError(f"larger ({self.larger}) must be a finite number above 1: it is the scale baseline's "
                             "multiple")
        validate(self)  # types and finite numbers ("3" was a TypeError below, nan passed), the bounds above
        for name in ("steps", "layers", "embd", "block_size", "batch_size", "stories"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        object.__setattr__(self, "tasks", tuple(self.tasks))

    @classmethod
    def quick(cls) -> DesignLabConfig:
        return cls(steps=120, embd=48, block_size=32, vocab_size=300, stories=120)


def builtin_pool(folder: Path, cfg: DesignLabConfig) -> tuple[list[Path], Path]:
    """pool/*.txt (tales, copies, sums, logs, junk; paragraphs separated by blank lines) and target.txt."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    tales = passages(demo_corpus(n_stories=cfg.stories, seed=0))
    copies = []
    for t in tales[: max(1, len(tales) // 10)]:
        for _ in range(cfg.copies):
            words = t.split(" ")
            i = rng.randrange(len(words))
            copies.append(" ".join(words[:i] + [rng.choice(["вдруг", "тихо", "опять", "снова"])] + words[i + 1:]))
    texts = {"tales": tales, "copies": copies,
             "sums": [" ".join(_sums(rng) for _ in range(8)) for _ in range(len(tales) // 2)],
             "logs": ["\n".join(_log(rng) for _ in range(4)) for _ in range(len(tales) // 2)],
             "junk": ["".join(rng.choice("#$%&*+=<>|~^") for _ in range(rng.randint(40, 120)))
                      for _ in range(len(tales) // 2)]}
    paths = []
    for name, paragraphs in texts.items():
        (folder / f"{name}.txt").write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
        paths.append(folder / f"{name}.txt")
    target = folder.parent / "target.txt"
    target.write_text(demo_corpus(n_stories=max(1, cfg.stories // 5), seed=1), encoding="utf-8")
    return paths, target


def design(paragraphs: list[str]) -> tuple[list[int], dict[str, int]]:
    """The designed set's paragraph indices (near-duplicates removed, then the split rules' noise) and what each
    step removed."""
    res = dedup_texts(paragraphs, DedupConfig(level="doc", keep="one"))
    kept = [i for i, k in enumerate(res.keep) if k]
    rules = {i: label(heuristic_scores(paragraphs[i]))[1] for i in kept}
    designed = [i for i in kept if not rules[i].startswith("noise")]
    removed = {"duplicates": len(paragraphs) - len(kept)}
    for i in kept:
        if rules[i].startswith("noise"):
            removed[rules[i]] = removed.get(rules[i], 0) + 1
    return designed, removed


def sample(lengths: list[int], budget: int, seed: int) -> list[int]:
    """Paragraph indices in a seeded random order until `budget` tokens are reached (all of them at most)."""
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    out, total = [], 0
    for i in order:
        if total >= budget:
            break
        out.append(i)
        total += lengths[i]
    return sorted(out)


def run_design_lab(out: str | Path, sources: list[str | Path] | None, target: str | Path | None, seeds: list[int],
                   cfg: DesignLabConfig, workers: int | None = None, command: str = "") -> dict[str, Any]:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    if not seeds:
        raise ValueError("give at least one seed")
    if bool(sources) != (target is not None):
        raise ValueError("give both SOURCES and --target, or neither (the built-in pool and target)")
    t0 = time.perf_counter()
    tasks = [load_task(spec) for spec in cfg.tasks]  # an unknown task fails before anything trains
    with set_up(out):  # a refusal leaves --out as it was, so the same command can run again
        if sources:
            paths = find_documents(sources)
            if not paths:
                raise ValueError("the sources hold no documents")
            target_text = "\n\n".join(read_document(p) for p in find_documents([target]))
        else:
            paths, target_path = builtin_pool(out / "pool", cfg)
            target_text = target_path.read_text(encoding="utf-8")
        pool = [p for path in paths for p in passages(read_document(path))]
        if len(pool) < 4:
            raise ValueError(f"the sources give {len(pool)} paragraphs; the lab needs at least 4")
        tok = Tokenizer.train(pool, kind="bpe", vocab_size=cfg.vocab_size)
        tok.save(out / "tokenizer.json")
        lengths = [len(ids) for ids in tok.encode_batch(pool)]
        designed, removed = design(pool)
        budget = sum(lengths[i] for i in designed)
        if not designed:
            raise ValueError("curation removed every paragraph: nothing to train the designed set on")
        save_target(out, tok, target_text, cfg.block_size)
    model = ModelConfig.preset("llama-tiny", vocab_size=len(tok), block_size=cfg.block_size, n_layer=cfg.layers,
                               n_embd=cfg.embd, n_head=max(1, cfg.embd // 16)).to_dict()
    arms: dict[tuple[str, int], list[int]] = {}
    for s in seeds:
        arms["designed", s] = designed
        arms["same budget", s] = sample(lengths, budget, 1000 + s)
        arms["larger", s] = sample(lengths, int(cfg.larger * budget), 2000 + s)
    jobs = []
    for (arm, s), chosen in arms.items():
        data = out / "data" / f"{arm.replace(' ', '-')}-{s}"
        prepare_texts([pool[i] for i in chosen], tok, data, names=[f"p{i:05d}" for i in chosen],
                      seq_len=cfg.block_size)
        jobs.append({"data": str(data), "tokenizer": str(out / "tokenizer.json"), "target": str(out / "target.npy"),
                     "source_of": [0] * len(chosen), "names": [arm], "shares": [1.0], "model": model,
                     "steps": cfg.steps, "seed": s, "init_seed": 1000 + s, "batch_size": cfg.batch_size,
                     "lr": cfg.lr, "out": str(out / "runs" / f"{arm.replace(' ', '-')}-{s}")})
    workers = max(1, min(workers or 2, len(jobs)))
    losses = [_run(j) for j in jobs] if workers == 1 else process_map(_run, jobs, workers)
    loss = dict(zip(arms, losses))
    scores = {}  # (task, arm, seed) -> the task's first metric for that arm's model
    for (arm, s), job in zip(arms, jobs) if tasks else ():
        model = load_pretrained(Path(job["out"]) / "final")[0]
        for task in tasks:
            scores[task.name, arm, s] = run_task(model, tok, task)["metrics"][METRICS[task.kind][0]]
    per_seed = [{"seed": s, **{arm: loss[arm, s] for arm in ("designed", "same budget", "larger")},
                 "tokens": {arm: sum(lengths[i] for i in arms[arm, s])
                            for arm in ("designed", "same budget", "larger")},
                 "tasks": {t.name: {arm: scores[t.name, arm, s] for arm in ("designed", "same budget", "larger")}
                           for t in tasks}}
                for s in seeds]
    beats = sum(r["designed"] < r["same budget"] for r in per_seed)
    matches = sum(r["designed"] <= r["larger"] for r in per_seed)
    need = 2 / 3
    checks = {"the designed set beats a random sample of the same size on >= 2/3 of the seeds":
              beats / len(seeds) >= need,
              f"the designed set is at least as good as a random sample {cfg.larger:g}x larger on >= 2/3 of the seeds":
              matches / len(seeds) >= need}
    task_means = {}
    for t in tasks:
        metric = METRICS[t.kind][0]
        wins = sum(r["tasks"][t.name]["designed"] >= r["tasks"][t.name]["same budget"] for r in per_seed)
        checks[f"on {t.name} ({metric}), the designed set scores at least as well as the same-size sample on >= "
               "2/3 of the seeds"] = wins / len(seeds) >= need
        task_means[t.name] = {arm: statistics.mean(r["tasks"][t.name][arm] for r in per_seed)
                              for arm in ("designed", "same budget", "larger")}
    mean = {arm: statistics.mean(r[arm] for r in per_seed) for arm in ("designed", "same budget", "larger")}
    measured = (f"target loss designed {mean['designed']:.3f}, same budget {mean['same budget']:.3f}, "
                f"{cfg.larger:g}x larger {mean['larger']:.3f} (means over {len(seeds)} seed(s)); the designed set "
                f"wins against the same budget on {beats} and is at least as good as the larger sample on "
                f"{matches} of {len(seeds)}; {len(designed)} of {len(pool)} paragraphs kept ({budget:,} tokens)"
                + "".join(f"; {name}: designed {m['designed']:.3f}, same budget {m['same budget']:.3f}, larger "
                          f"{m['larger']:.3f}" for name, m in task_means.items()))
    table = [{"seed": r["seed"], "designed": r["designed"], "same budget": r["same budget"], "larger": r["larger"],
              **{f"{name}: {arm}": round(v, 4) for name, by_arm in r["tasks"].items() for arm, v in by_arm.items()}}
             for r in per_seed]
    results = {"config": dataclasses.asdict(cfg), "seeds": seeds, "paragraphs": len(pool), "designed": len(designed),
               "pool_tokens": sum(lengths), "budget_tokens": budget, "removed": removed, "per_seed": per_seed,
               "mean": mean, "task_means": task_means,
               "speed": {"wall_s": time.perf_counter() - t0}}
    write_report(out, "design", "A small dataset designed with the data tools (near-duplicates removed, noise "
                 "dropped) teaches the target better than a random sample of the same size, and as well as a larger "
                 "one (Lee et al. 2022; Penedo et al. 2024).", measured, checks, table, [],
                 results, command or "lmlab lab data design",
                 [("what curation removed", [{"step": k, "paragraphs": v} for k, v in removed.items()])],
                 title="lmlab lab data", claim_label="<b>Claim</b> (designed data against scale)",
                 note=f"Each arm: {cfg.layers} layers, width {cfg.embd}, {cfg.steps} steps of {cfg.batch_size} x "
                      f"{cfg.block_size} tokens from one initialisation per seed; samples draw paragraphs in a seeded "
                      "random order until their token budget. Target loss: mean token NLL over all windows of the "
                      "target text.")
    return results
