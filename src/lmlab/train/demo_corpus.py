"""The demo's book, written by code: short Russian folk-tale-like stories (and a few English ones) from a
small grammar. Nothing is downloaded; the same seed gives the same book.

The grammar has enough structure for a small model to learn in minutes — agreement of names with verbs,
recurring characters, dialogue in «quotes», a beginning and an end — so "before vs after" is visible.
"""

from __future__ import annotations

import random

# (nominative, accusative, gender) — gender picks the past-tense verb ending
_HEROES_RU = [("дед", "деда", "m"), ("баба", "бабу", "f"), ("внучка", "внучку", "f"), ("кот", "кота", "m"),
              ("лиса", "лису", "f"), ("волк", "волка", "m"), ("медведь", "медведя", "m"), ("заяц", "зайца", "m"),
              ("мышка", "мышку", "f"), ("петух", "петуха", "m"), ("царевна", "царевну", "f"),
              ("Иван", "Ивана", "m"), ("Марья", "Марью", "f"), ("ёжик", "ёжика", "m"), ("сова", "сову", "f")]
_PLACES_RU = ["в тёмном лесу", "у синего моря", "в старой избушке", "на краю деревни", "за высокой горой",
              "у быстрой реки", "в царском тереме", "на лесной поляне", "в маленьком домике", "у старого колодца"]
_GOING_RU = ["в лес", "к реке", "на базар", "в деревню", "к морю", "в поле", "к соседям", "на гору"]
_FINDS_RU = ["золотое яичко", "волшебное колечко", "старый сундук", "говорящую рыбку", "красную ягоду",
             "серебряный ключ", "тёплую шапку", "мешок муки", "большую репку", "синее пёрышко"]
_VERBS_RU = {  # stem -> (masculine, feminine)
    "пошёл": ("пошёл", "пошла"), "нашёл": ("нашёл", "нашла"), "сказал": ("сказал", "сказала"),
    "жил": ("жил", "жила"), "обрадовался": ("обрадовался", "обрадовалась"), "вернулся": ("вернулся", "вернулась"),
    "испугался": ("испугался", "испугалась"), "встретил": ("встретил", "встретила"),
    "заплакал": ("заплакал", "заплакала"), "побежал": ("побежал", "побежала"),
    "рассказал": ("рассказал", "рассказала"),
}
_SAYINGS_RU = ["Не бойся, я тебе помогу", "Куда ты идёшь", "Отдай мне свою находку", "Пойдём со мной",
               "Спасибо тебе, добрый друг", "Не ешь меня, я тебе песенку спою", "Вот так чудо",
               "Утро вечера мудренее"]
_ENDINGS_RU = ["И стали они жить-поживать да добра наживать.", "Тут и сказке конец, а кто слушал — молодец.",
               "С тех пор они больше никогда не ссорились.", "Вот и вся сказка."]

_HEROES_EN = ["the old man", "the old woman", "the little girl", "the grey wolf", "the red fox", "the brave boy",
              "the clever cat", "the kind bear"]
_PLACES_EN = ["in a dark forest", "by the blue sea", "in a small house", "near a quiet river", "on a green hill"]
_FINDS_EN = ["a golden egg", "a magic ring", "an old box", "a silver key", "a talking fish", "a red apple"]


def _v(verb: str, gender: str) -> str:
    return _VERBS_RU[verb][gender == "f"]


def _story_ru(rng: random.Random) -> str:
    hero, other = rng.sample(_HEROES_RU, 2)
    name, name_acc, g = hero
    o_name, o_acc, og = other
    place, going, find = rng.choice(_PLACES_RU), rng.choice(_GOING_RU), rng.choice(_FINDS_RU)
    lines = [
        f"Жили-были {name} да {o_name}. " if rng.random() < 0.5 else f"{_v('жил', g).capitalize()} {name} {place}. ",
        f"Однажды {name} {_v('пошёл', g)} {going} и {_v('нашёл', g)} {find}. ",
        f"{name.capitalize()} {_v('обрадовался', g)}. ",
        f"По дороге {name} {_v('встретил', g)} {o_acc}. ",
        f"«{rng.choice(_SAYINGS_RU)}!» — {_v('сказал', og)} {o_name}. ",
    ]
    if rng.random() < 0.5:
        lines.append(f"{name.capitalize()} {_v('испугался', g)} и {_v('побежал', g)} домой. ")
    else:
        lines.append(f"«{rng.choice(_SAYINGS_RU)}», — {_v('сказал', g)} {name}, и они пошли вместе. ")
    lines.append(f"Вечером {name} {_v('вернулся', g)} домой и всё {_v('рассказал', g)}. ")
    lines.append(rng.choice(_ENDINGS_RU))
    return "".join(lines)


def _story_en(rng: random.Random) -> str:
    hero, other = rng.sample(_HEROES_EN, 2)
    place, find = rng.choice(_PLACES_EN), rng.choice(_FINDS_EN)
    return (f"Once upon a time {hero} lived {place}. One day {hero} found {find}. "
            f"On the way home {hero} met {other}. \"What a wonder!\" said {other}. "
            f"In the evening {hero} came home and told everyone. And that is the end of the story.")


def demo_corpus(n_stories: int = 1500, seed: int = 0) -> str:
    """A book of `n_stories` short tales, mostly Russian (one in five is English), separated by blank lines."""
    rng = random.Random(seed)
    stories = [_story_en(rng) if rng.random() < 0.2 else _story_ru(rng) for _ in range(n_stories)]
    return "\n\n".join(stories) + "\n"
