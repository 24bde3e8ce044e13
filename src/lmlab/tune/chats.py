"""A synthetic chat set whose reply format a rule checks: the shipped data of `lmlab tune sft`'s demo, tests
and benchmark.

    python -m lmlab.tune.chats --out src/lmlab/tune/data/chats.jsonl     # regenerates the shipped file

Questions in English or Russian (arithmetic, spelling, counting letters, repeating a word), some with a system
turn, some with two rounds. Every reply is one line: "Answer: X." to an English question, "Ответ: X." to a
Russian one (`format_ok`), X being the right answer (`answer_ok` checks that too).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from ..files import atomic_write_text

SHIPPED = Path(__file__).parent / "data" / "chats.jsonl"
PREFIX = {"en": "Answer: ", "ru": "Ответ: "}
_WORDS = {"en": ["fox", "wolf", "bear", "hare", "owl", "cat", "dog", "mouse", "river", "forest", "bread", "milk",
                 "apple", "house", "star", "moon", "tale", "king", "bird", "frog"],
          "ru": ["лиса", "волк", "медведь", "заяц", "сова", "кот", "пёс", "мышь", "река", "лес", "хлеб", "молоко",
                 "яблоко", "дом", "звезда", "луна", "сказка", "царь", "птица", "лягушка"]}
_SYSTEM = {"en": ["Answer briefly.", "You are a helpful assistant.", ""],
           "ru": ["Отвечай кратко.", "Ты полезный помощник.", ""]}
_TASKS = {
    "en": [("What is {a} plus {b}?", lambda a, b, w: str(a + b)),
           ("How many letters are in the word {w}?", lambda a, b, w: str(len(w))),
           ("Repeat the word {w}.", lambda a, b, w: w),
           ("Spell the word {w}.", lambda a, b, w: "-".join(w)),
           ("What is {a} minus {b}?", lambda a, b, w: str(a - b))],
    "ru": [("Сколько будет {a} плюс {b}?", lambda a, b, w: str(a + b)),
           ("Сколько букв в слове {w}?", lambda a, b, w: str(len(w))),
           ("Повтори слово {w}.", lambda a, b, w: w),
           ("Произнеси по буквам слово {w}.", lambda a, b, w: "-".join(w)),
           ("Сколько будет {a} минус {b}?", lambda a, b, w: str(a - b))],
}


def _round(rng: random.Random, lang: str) -> tuple[str, str]:
    a = rng.randint(0, 20)
    b, w = rng.randint(0, a), rng.choice(_WORDS[lang])
    question, answer = rng.choice(_TASKS[lang])
    return question.format(a=a, b=b, w=w), f"{PREFIX[lang]}{answer(a, b, w)}."


def make_chats(n: int, seed: int = 0) -> list[dict]:
    """n conversations: half English, half Russian; a third with a system turn, a quarter with two rounds."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        lang = "en" if i % 2 == 0 else "ru"
        messages = []
        if rng.random() < 1 / 3:
            messages.append({"role": "system", "content": rng.choice(_SYSTEM[lang])})
        for _ in range(2 if rng.random() < 0.25 else 1):
            question, answer = _round(rng, lang)
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        out.append({"messages": messages})
    return out


def language(text: str) -> str:
    return "ru" if re.search("[а-яё]", text.lower()) else "en"


def format_ok(question: str, reply: str) -> bool:
    """The rule: one line, the question's language's prefix, something after it, a full stop at the end."""
    prefix = PREFIX[language(question)]
    return ("\n" not in reply and reply.startswith(prefix) and reply.endswith(".")
            and len(reply) > len(prefix) + 1 and not reply[len(prefix)].isspace())


def answer_ok(question: str, reply: str) -> bool:
    """Right in content too: the reply the generator would have given."""
    for lang in PREFIX:
        for template, answer in _TASKS[lang]:
            pattern = re.escape(template).replace(r"\{a\}", r"(?P<a>\d+)").replace(r"\{b\}", r"(?P<b>\d+)")
            m = re.fullmatch(pattern.replace(r"\{w\}", r"(?P<w>\w+)"), question)
            if m:
                g = m.groupdict()
                want = answer(int(g.get("a") or 0), int(g.get("b") or 0), g.get("w") or "")
                return reply == f"{PREFIX[lang]}{want}."
    return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(SHIPPED), help="the JSONL file to write")
    p.add_argument("-n", type=int, default=2000, help="conversations (2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    chats = make_chats(args.n, args.seed)
    atomic_write_text(args.out, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chats))


if __name__ == "__main__":
    main()
