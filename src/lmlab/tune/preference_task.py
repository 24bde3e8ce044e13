"""A synthetic preference task whose preference a rule checks: copy the prompt's words as a comma list that ends
with a full stop (preferred) rather than as bare words (rejected). English and Russian.

    python -m lmlab.tune.preference_task src/lmlab/tune/tasks   # rewrites the shipped files

pairs.jsonl ({prompt, chosen, rejected}: the preference data), sft.jsonl ({prompt, completion}: both styles
equally often, the format a model learns before preference tuning, so it follows the rule about half the time)
and test.jsonl (held-out prompts: none of them among the training prompts). follows_rule(prompt, completion) is
the checker.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

EN = ("cat dog sun moon tree fish bird house river stone apple bread milk snow rain wind road ship star book "
      "door lamp cup hat box king song cloud field hill").split()
RU = ("кот пёс дом лес мост сад снег дождь ветер река камень хлеб молоко луна звезда книга дверь лампа чашка "
      "шапка поле холм море гора птица рыба окно стол город").split()


def prompt_of(words: list[str], russian: bool) -> str:
    return ("слова: " if russian else "words: ") + " ".join(words) + " ->"


def preferred(words: list[str]) -> str:
    return " " + ", ".join(words) + "."


def rejected(words: list[str]) -> str:
    return " " + " ".join(words)


def words_of(prompt: str) -> list[str]:
    return prompt.split(":", 1)[1].removesuffix("->").split()


def follows_rule(prompt: str, completion: str) -> bool:
    """The prompt's words, in order, as a comma list ending with a full stop."""
    return completion.strip() == preferred(words_of(prompt)).strip()


def make(n: int, seed: int, exclude: set[str] = frozenset()) -> list[tuple[list[str], bool]]:
    """n prompts' (words, russian), drawn with `seed`; none whose prompt is in `exclude` (the held-out prompts
    leave out the training ones: drawn apart, 24 of 200 were among them)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        russian = rng.random() < 0.5
        words = rng.sample(RU if russian else EN, rng.randint(2, 4))
        if prompt_of(words, russian) not in exclude:
            out.append((words, russian))
    return out


def write(folder: str | Path, n_train: int = 2000, n_test: int = 200) -> None:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = make(n_train, seed=0)
    test = make(n_test, seed=1, exclude={prompt_of(w, ru) for w, ru in train})

    def dump(name: str, rows: list[dict]) -> None:
        (folder / name).write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

    dump("pairs.jsonl", [{"prompt": prompt_of(w, ru), "chosen": preferred(w), "rejected": rejected(w)}
                         for w, ru in train])
    dump("sft.jsonl", [{"prompt": prompt_of(w, ru), "completion": (preferred if i % 2 else rejected)(w)}
                       for i, (w, ru) in enumerate(train)])
    dump("test.jsonl", [{"prompt": prompt_of(w, ru)} for w, ru in test])


def shipped() -> Path:
    return Path(__file__).parent / "tasks"


if __name__ == "__main__":
    write(sys.argv[1] if len(sys.argv) > 1 else shipped())
