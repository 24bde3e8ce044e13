"""Synthetic biographies (Zucchet et al. 2025, §1.2 and App. B): a population, its templates, samplers and a
dataset the project's Trainer draws from (`sample_batch` / `eval_batches`).

    from lmlab.lab.facts.data import BioConfig, Biographies
    bio = Biographies(BioConfig(n_individuals=1000, seed=0))
    x, y = bio.sample_batch(32, bio.seq_len, torch.Generator().manual_seed(0))   # a fresh biography per row

Each of N individuals has a unique three-part name and six attribute values. A biography is six sentences,
one per attribute, each from a template the individual owns for training (20 of 25, a per-individual split;
the other 5 are held out for evaluation), in shuffled order, filled and tokenised piece by piece, so the
position of every value token is known without searching the text.

Value pools are made-up words (no network, no name lists to ship): the model cannot lean on prior knowledge
anyway, since it is trained from scratch. Values are single pseudo-words except birth dates ("month year" at
CPU scale, "day month year" at the paper's scale): the attribute loss sums over a value's tokens either way.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ...configs import knob, validate
from ...tokenizers import Tokenizer

ATTRIBUTES = ("birth_date", "birth_place", "university", "major", "company", "location")

# 25 templates per attribute, written for this lab. Name first and the attribute cue before the value, so a
# model that knows the fact can reach zero loss on it (the paper checks the same by hand, App. B.1).
TEMPLATES: dict[str, tuple[str, ...]] = {
    "birth_date": (
        "{name} was born on {value} .", "{name} was born in {value} .", "{name} came into the world on {value} .",
        "{name} has a birthday on {value} .", "{name} entered life on {value} .",
        "the birth of {name} was on {value} .", "{name} first saw daylight on {value} .",
        "{name} was delivered on {value} .", "{name} arrived on {value} .", "the birthday of {name} is {value} .",
        "{name} , born {value} , is known .", "{name} celebrates a birthday in {value} .",
        "records show {name} was born on {value} .", "{name} was born back on {value} .",
        "{name} got born on {value} .", "{name} was welcomed into life on {value} .",
        "{name} has a birth date of {value} .", "the birth date of {name} is {value} .",
        "{name} started life on {value} .", "{name} was born during {value} .",
        "{name} drew a first breath on {value} .", "{name} is a person born {value} .",
        "{name} began life in {value} .", "{name} was born around {value} .",
        "{name} , whose birth was on {value} , grew up fast .",
    ),
    "birth_place": (
        "{name} was born in {value} .", "{name} comes from {value} .", "{name} is a native of {value} .",
        "{name} spent early years in {value} .", "the birthplace of {name} is {value} .",
        "{name} hails from {value} .", "{name} grew up in {value} .", "{name} was raised in {value} .",
        "{name} has roots in {value} .", "{name} was brought up in {value} .",
        "{name} originally comes from {value} .", "{name} is originally from {value} .",
        "the hometown of {name} is {value} .", "{name} first lived in {value} .",
        "{name} spent childhood in {value} .", "{name} was born and raised in {value} .",
        "{name} has a birthplace of {value} .", "the place of birth of {name} is {value} .",
        "{name} , a child of {value} , moved away .", "{name} calls {value} a hometown .",
        "{name} was a baby in {value} .", "{name} started out in {value} .", "{name} first opened eyes in {value} .",
        "{name} owes a childhood to {value} .", "{name} was born at {value} .",
    ),
    "university": (
        "{name} studied at {value} .", "{name} graduated from {value} .", "{name} attended {value} .",
        "{name} went to college at {value} .", "{name} earned a degree from {value} .",
        "{name} is an alumnus of {value} .", "{name} enrolled at {value} .",
        "{name} received an education at {value} .", "{name} was a student at {value} .",
        "{name} spent college years at {value} .", "{name} completed studies at {value} .",
        "{name} got a diploma from {value} .", "the university of {name} was {value} .",
        "{name} was educated at {value} .", "{name} did a degree at {value} .", "{name} learned a lot at {value} .",
        "{name} took classes at {value} .", "{name} is a graduate of {value} .",
        "{name} finished university at {value} .", "{name} pursued studies at {value} .",
        "{name} trained at {value} .", "{name} studied for years at {value} .",
        "the alma mater of {name} is {value} .", "{name} went to {value} .", "{name} holds a degree from {value} .",
    ),
    "major": (
        "{name} majored in {value} .", "{name} studied {value} .", "{name} specialized in {value} .",
        "{name} focused on {value} .", "{name} earned a degree in {value} .", "{name} chose {value} as a major .",
        "the major of {name} was {value} .", "{name} concentrated on {value} .", "{name} took a degree in {value} .",
        "{name} pursued {value} .", "{name} graduated in {value} .", "{name} did coursework in {value} .",
        "the field of {name} is {value} .", "{name} learned {value} .", "{name} has a background in {value} .",
        "{name} trained in {value} .", "{name} read {value} at university .", "{name} was a student of {value} .",
        "{name} picked {value} as a subject .", "{name} completed a program in {value} .",
        "the subject of {name} was {value} .", "{name} studied the field of {value} .",
        "{name} holds a major in {value} .", "{name} has a diploma in {value} .", "{name} devoted study to {value} .",
    ),
    "company": (
        "{name} works for {value} .", "{name} is employed by {value} .", "{name} works at {value} .",
        "{name} has a job at {value} .", "{name} is on the staff of {value} .", "the employer of {name} is {value} .",
        "{name} earns a living at {value} .", "{name} holds a position at {value} .", "{name} joined {value} .",
        "{name} is a worker at {value} .", "{name} is hired by {value} .", "{name} is part of {value} .",
        "{name} has a career at {value} .", "{name} gets paid by {value} .", "{name} took a job with {value} .",
        "{name} serves at {value} .", "the company of {name} is {value} .", "{name} works full time for {value} .",
        "{name} is an employee of {value} .", "{name} clocks in at {value} .",
        "{name} is on the payroll of {value} .", "{name} was hired at {value} .", "{name} now works with {value} .",
        "{name} is a member of {value} .", "{name} spends workdays at {value} .",
    ),
    "location": (
        "{name} lives in {value} .", "{name} resides in {value} .", "{name} is based in {value} .",
        "{name} currently lives in {value} .", "{name} now lives in {value} .", "{name} has a home in {value} .",
        "{name} settled in {value} .", "the home of {name} is in {value} .", "{name} stays in {value} .",
        "{name} dwells in {value} .", "{name} makes a home in {value} .", "{name} moved to {value} .",
        "{name} is a resident of {value} .", "{name} rents a flat in {value} .", "{name} owns a house in {value} .",
        "{name} spends nights in {value} .", "the address of {name} is in {value} .", "{name} relocated to {value} .",
        "{name} lives today in {value} .", "{name} has lived lately in {value} .", "{name} is living in {value} .",
        "{name} calls {value} home now .", "the current city of {name} is {value} .",
        "{name} now resides in {value} .", "{name} is settled in {value} .",
    ),
}

MONTHS = ("january", "february", "march", "april", "may", "june", "july", "august", "september", "october",
          "november", "december")

# Pool sizes. "cpu": this lab's CPU scale (V = 48, 48, 32, 32, 40, 48; names
# 64/64/128, so a name is still three tokens the model must group). "paper": §1.2 of the paper (first and
# middle names share 900, last 1,000; 800 cities; 200 universities; 100 majors; 500 companies; dates
# 1900-2100 x 12 x 31, impossible dates allowed).
SCALES: dict[str, dict[str, int]] = {
    "cpu": dict(first=64, middle=64, last=128, cities=48, universities=32, majors=32, companies=40,
                date_days=0, date_years=4),
    "paper": dict(first=900, middle=0, last=1000, cities=800, universities=200, majors=100, companies=500,
                  date_days=31, date_years=201),
}
SAMPLINGS = ("uniform", "power_law", "celebrities")
_POOL_SEED = 20250327  # pools are fixed across experiment seeds, so all runs share one tokenizer


def pseudo_words(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """n distinct made-up words of 2-3 syllables, none in `taken` (which grows)."""
    onsets = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st",
              "tr", "gl", "pl", "sh", "th", "ch"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
    codas = ["", "", "n", "r", "l", "s", "m", "x"]
    out: list[str] = []
    while len(out) < n:
        k = int(rng.integers(2, 4))
        w = "".join(onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] for _ in range(k))
        w += codas[rng.integers(len(codas))]
        if w not in taken:
            taken.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Pools:
    first: tuple[str, ...]
    middle: tuple[str, ...]
    last: tuple[str, ...]
    values: dict[str, tuple[str, ...]]  # attribute -> value strings (a date may be several words)

    @classmethod
    def build(cls, scale: str) -> Pools:
        if scale not in SCALES:
            raise ValueError(f"scale ({scale!r}) must be one of {', '.join(SCALES)}")
        s = SCALES[scale]
        rng = np.random.default_rng(_POOL_SEED)
        taken = {w for ts in TEMPLATES.values() for t in ts for w in t.split()} | set(MONTHS)
        first = pseudo_words(s["first"], rng, taken)
        middle = pseudo_words(s["middle"], rng, taken) if s["middle"] else first  # the paper shares one list
        last = pseudo_words(s["last"], rng, taken)
        cities = pseudo_words(s["cities"], rng, taken)
        years = [str(1900 + i * (1 if s["date_days"] else 17)) for i in range(s["date_years"])]
        if s["date_days"]:
            dates = [f"{d} {m} {y}" for y in years for m in MONTHS for d in range(1, s["date_days"] + 1)]
        else:
            dates = [f"{m} {y}" for y in years for m in MONTHS]
        values = {"birth_date": tuple(dates), "birth_place": tuple(cities),
                  "university": tuple(pseudo_words(s["universities"], rng, taken)),
                  "major": tuple(pseudo_words(s["majors"], rng, taken)),
                  "company": tuple(pseudo_words(s["companies"], rng, taken)),
                  "location": tuple(cities)}  # as in the paper: location is not tied to company
        return cls(tuple(first), tuple(middle), tuple(last), values)

    def words(self) -> list[str]:
        """Every word a biography can contain (to train a word tokenizer on)."""
        texts = [t for ts in TEMPLATES.values() for t in ts] + list(self.first + self.middle + self.last)
        texts += [v for vs in self.values.values() for v in vs]
        return texts


def default_tokenizer(pools: Pools) -> Tokenizer:
    """A word-level tokenizer over exactly the lab's vocabulary: one token per name part and per value word,
    so a biography is ~60 tokens and the model's cost goes into learning facts, not spelling."""
    texts = [t.replace("{name}", " ").replace("{value}", " ") for t in pools.words()]
    n_words = len({w for t in texts for w in t.split()})
    return Tokenizer.train(texts, kind="word", vocab_size=n_words + 8)


@dataclass
class BioConfig:
    """The population and how biographies are sampled from it."""

    n_individuals: int = knob(1000, "individuals seen in training", gt=0)
    n_unseen: int = knob(256, "individuals never sampled in training: the hallucination probe", ge=0)
    scale: str = knob("cpu", "value pools: cpu or paper (see SCALES)", choices=tuple(SCALES))
    n_templates: int = knob(25, "sentence templates per attribute (at most the 25 written)", gt=0, le=25)
    n_train_templates: int = knob(20, "templates per individual and attribute seen in training; the rest are "
                                  "held out", gt=0)
    shuffle: bool = knob(True, "shuffle sentence order (False: the fixed-order ablation, Fig. A)")
    sampling: str = knob("uniform", "how individuals are drawn", choices=SAMPLINGS)
    alpha: float = knob(0.0, "power law: individual i (0-based) drawn with probability ∝ (i+1)^-alpha", ge=0, le=4)
    n_celebrities: int = knob(0, "celebrities: the first n_celebrities are drawn ...", ge=0)
    celebrity_weight: float = knob(1.0, "... this many times more often", gt=0)
    warmup_individuals: int = knob(0, "warm-up curriculum: uniform on the first k individuals ...", ge=0)
    warmup_steps: int = knob(0, "... for this many batches, then the sampling above on everyone", ge=0)
    first_individual: int = knob(0, "offset into the population (fine-tuning on new individuals)", ge=0)
    replay_individuals: int = knob(0, "fine-tuning with replay: the first k seen individuals (the old ones) ...",
                                   ge=0)
    replay_weight: float = knob(1.0, "... are drawn with this weight each, the others with 1 (0: no replay)", ge=0)
    n_eval: int = knob(256, "individuals in each evaluation set", gt=0)
    seed: int = knob(0, "population (names, values, template splits) and evaluation sets")

    def __post_init__(self) -> None:
        validate(self)
        if self.n_train_templates > self.n_templates:
            raise ValueError(f"n_train_templates ({self.n_train_templates}) must be <= n_templates "
                             f"({self.n_templates})")
        if self.replay_individuals >= self.n_individuals and self.replay_individuals:
            raise ValueError("replay_individuals must be < n_individuals (someone must be new)")
        if self.n_celebrities > self.n_individuals or self.warmup_individuals > self.n_individuals:
            raise ValueError("n_celebrities and warmup_individuals must be <= n_individuals")
        if bool(self.warmup_individuals) != bool(self.warmup_steps):
            raise ValueError("give both warmup_individuals and warmup_steps, or neither")
        names = {"cpu": 64 * 64 * 128, "paper": 900 * 900 * 1000}[self.scale]
        total = self.first_individual + self.n_individuals + self.n_unseen
        if total > names // 4:  # rejection sampling of unique names stays fast below a quarter of the space
            raise ValueError(f"{total} individuals need more unique names than scale {self.scale!r} offers; "
                             f"use scale='paper'")


@dataclass
class EvalSet:
    """Fixed evaluation biographies and where their values sit.

    x, y: (M, T) inputs and next-token targets. pos: (M, 6, L) indices into y of each attribute's value
    tokens (L = longest value), valid where mask (M, 6, L) is True; y[pos] are the value's token ids.
    name_pos: (M, 6, K) indices into x of the name tokens of each attribute's sentence (mask name_mask)."""

    name: str
    x: torch.Tensor
    y: torch.Tensor
    pos: torch.Tensor
    mask: torch.Tensor
    name_pos: torch.Tensor
    name_mask: torch.Tensor
    individuals: np.ndarray = field(repr=False)


class Biographies:
    """A population of individuals and the biographies drawn from it (a Trainer dataset)."""

    def __init__(self, config: BioConfig, tokenizer: Tokenizer | None = None, pools: Pools | None = None) -> None:
        self.config = c = config
        self.pools = pools or Pools.build(c.scale)
        self.tokenizer = tokenizer or default_tokenizer(self.pools)
        # Each array from its own stream, row by row: the first k individuals are the same whatever the
        # population's size, so fine-tuning views (old rows, new rows) share one population.
        rng = np.random.default_rng([c.seed, 1])
        total = c.first_individual + c.n_individuals + c.n_unseen
        # Unique three-part names by rejection: draw (first, middle, last) index triples, drop repeats.
        sizes = (len(self.pools.first), len(self.pools.middle), len(self.pools.last))
        seen: set[tuple[int, int, int]] = set()
        names: list[tuple[int, int, int]] = []
        while len(names) < total:
            t = tuple(int(rng.integers(s)) for s in sizes)
            if t not in seen:
                seen.add(t)
                names.append(t)
        self.names = np.array(names, dtype=np.int64)                                       # (total, 3)
        pool_sizes = [len(self.pools.values[a]) for a in ATTRIBUTES]
        self.values = np.stack([np.random.default_rng([c.seed, 10 + j]).integers(v, size=total)
                                for j, v in enumerate(pool_sizes)], axis=1)                  # (total, 6)
        # Per individual and attribute, a random permutation of the templates: the first n_train_templates
        # are its training templates, the rest its held-out ones (a per-individual split, App. B.1).
        keys = np.random.default_rng([c.seed, 20]).random((total, len(ATTRIBUTES), c.n_templates))
        self.template_order = np.argsort(keys, axis=2).astype(np.int16)                    # (total, 6, n_templates)
        # Rows of the arrays above: training draws from `seen`, the hallucination probe from `unseen`.
        self.seen = np.arange(c.first_individual, c.first_individual + c.n_individuals)
        self.unseen = np.arange(c.first_individual + c.n_individuals, total)
        self._encode()
        self.weights = self.sampling_weights()
        self.seq_len = self.max_tokens - 1           # x and y are one shorter than a whole sequence
        self.batches_drawn = 0                       # counts sample_batch calls (the warm-up clock; state_dict)
        self._eval_cache: dict[str, EvalSet] = {}

    # ---- tokenisation (once) -----------------------------------------------------------------------

    def _ids(self, text: str) -> list[int]:
        # Every piece is encoded as " " + piece, so byte-level BPE and char tokenizers see the same word
        # boundaries as in the joined text; with the word tokenizer the two are identical.
        return self.tokenizer.encode(" " + text) if text else []

    def _encode(self) -> None:
        self.first_ids = [self._ids(w) for w in self.pools.first]
        self.middle_ids = [self._ids(w) for w in self.pools.middle]
        self.last_ids = [self._ids(w) for w in self.pools.last]
        self.value_ids = {a: [self._ids(v) for v in self.pools.values[a]] for a in ATTRIBUTES}
        # template -> (before name, between name and value, after value)
        self.template_ids: dict[str, list[tuple[list[int], list[int], list[int]]]] = {}
        for a in ATTRIBUTES:
            parts = []
            for t in TEMPLATES[a][: self.config.n_templates]:
                pre, rest = t.split("{name}")
                mid, post = rest.split("{value}")
                parts.append((self._ids(pre.strip()), self._ids(mid.strip()), self._ids(post.strip())))
            self.template_ids[a] = parts
        unk = self.tokenizer.unk_id
        for ids in [*self.first_ids, *self.last_ids, *[v for a in ATTRIBUTES for v in self.value_ids[a]]]:
            if unk in ids:
                raise ValueError("the tokenizer maps part of a name or value to <UNK>; train it on Pools.words()")
        name_len = max(map(len, self.first_ids)) + max(map(len, self.middle_ids)) + max(map(len, self.last_ids))
        self.max_tokens = 2 + sum(
            max(len(p) + len(m) + len(q) for p, m, q in self.template_ids[a]) + name_len
            + max(map(len, self.value_ids[a])) for a in ATTRIBUTES)  # BOS + six sentences + EOS
        self.max_value_len = max(len(v) for a in ATTRIBUTES for v in self.value_ids[a])
        self.max_name_len = name_len

    # ---- sampling ----------------------------------------------------------------------------------

    def sampling_weights(self) -> np.ndarray:
        """Probability of each seen individual per draw (after any warm-up)."""
        c = self.config
        w = np.ones(c.n_individuals)
        if c.sampling == "power_law":
            w = np.arange(1, c.n_individuals + 1, dtype=np.float64) ** -c.alpha
        elif c.sampling == "celebrities":
            w[: c.n_celebrities] = c.celebrity_weight
        w[: c.replay_individuals] *= c.replay_weight
        return w / w.sum()

    def value_entropy(self, individuals: np.ndarray | None = None) -> np.ndarray:
        """Per attribute, the entropy (nats) of the empirical value distribution over `individuals` (default:
        the seen population): the loss of a model that knows the marginal but nothing individual."""
        rows = self.values[self.seen if individuals is None else individuals]
        out = []
        for j in range(len(ATTRIBUTES)):
            p = np.bincount(rows[:, j]) / len(rows)
            p = p[p > 0]
            out.append(float(-(p * np.log(p)).sum()))
        return np.array(out)

    def baseline(self) -> float:
        """No-knowledge baseline: mean over attributes of the value entropy (paper §1.3), from the data."""
        return float(self.value_entropy().mean())

    def biography(self, person: int, rng: np.random.Generator, held_out: bool = False
                  ) -> tuple[list[int], list[list[int]], list[list[int]]]:
        """Token ids of one biography (BOS ... EOS) of population row `person`, and per attribute (in
        ATTRIBUTES order) the sequence indices of its value tokens and of its name tokens."""
        c = self.config
        f, m, la = self.names[person]
        name = self.first_ids[f] + self.middle_ids[m] + self.last_ids[la]
        order = rng.permutation(len(ATTRIBUTES)) if c.shuffle else range(len(ATTRIBUTES))
        ids = [self.tokenizer.bos_id]
        value_pos: list[list[int]] = [[] for _ in ATTRIBUTES]
        name_pos: list[list[int]] = [[] for _ in ATTRIBUTES]
        for j in order:
            a = ATTRIBUTES[j]
            choices = self.template_order[person, j]
            pick = choices[c.n_train_templates + rng.integers(c.n_templates - c.n_train_templates)] if held_out \
                else choices[rng.integers(c.n_train_templates)]
            pre, mid, post = self.template_ids[a][pick]
            value = self.value_ids[a][self.values[person, j]]
            ids += pre
            name_pos[j] = list(range(len(ids), len(ids) + len(name)))
            ids += name + mid
            value_pos[j] = list(range(len(ids), len(ids) + len(value)))
            ids += value + post
        ids.append(self.tokenizer.eos_id)
        return ids, value_pos, name_pos

    def _draw(self, batch_size: int, rng: np.random.Generator) -> np.ndarray:
        c = self.config
        if c.warmup_steps and self.batches_drawn < c.warmup_steps:
            rows = rng.integers(c.warmup_individuals, size=batch_size)
        else:
            rows = rng.choice(c.n_individuals, size=batch_size, p=self.weights)
        return self.seen[rows]

    def _pack(self, seqs: Sequence[list[int]], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        buf = np.zeros((len(seqs), seq_len + 1), dtype=np.int64)  # PAD = 0, ignored by the loss
        for i, s in enumerate(seqs):
            buf[i, : len(s)] = s
        t = torch.from_numpy(buf)
        return t[:, :-1], t[:, 1:]

    def sample_batch(self, batch_size: int, seq_len: int, generator: torch.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
        """A fresh biography per row (never a repeated one). All randomness comes from `generator`, whose
        state the Trainer checkpoints; the warm-up clock is this dataset's own state (`state_dict`, saved into
        every checkpoint by `runner.DataState`), so a resumed run sees the same data only once it is restored."""
        if seq_len < self.seq_len:
            raise ValueError(f"seq_len ({seq_len}) is shorter than the longest biography ({self.seq_len} tokens)")
        rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
        people = self._draw(batch_size, rng)
        self.batches_drawn += 1
        return self._pack([self.biography(int(p), rng)[0] for p in people], seq_len)

    def state_dict(self) -> dict[str, int]:
        """What a resumed run needs beyond the Trainer's generator: the number of batches drawn so far."""
        return {"batches_drawn": self.batches_drawn}

    def load_state_dict(self, state: dict[str, int]) -> None:
        n = state.get("batches_drawn")
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"batches_drawn ({n!r}) must be an integer >= 0")
        self.batches_drawn = n

    # ---- evaluation --------------------------------------------------------------------------------

    def eval_set(self, name: str) -> EvalSet:
        """'seen_eval' (seen individuals, held-out templates: knowledge), 'seen_train' (the same individuals,
        training templates: memorisation) or 'unseen' (individuals never trained on: hallucination)."""
        if name in self._eval_cache:
            return self._eval_cache[name]
        c = self.config
        if name not in ("seen_eval", "seen_train", "unseen"):
            raise ValueError(f"eval set ({name!r}) must be seen_eval, seen_train or unseen")
        pick = np.random.default_rng([c.seed, 2])
        if name == "unseen":
            if not len(self.unseen):
                raise ValueError("no unseen individuals (n_unseen = 0)")
            people = self.unseen[: c.n_eval]
        else:
            rows = pick.choice(c.n_individuals, size=min(c.n_eval, c.n_individuals), replace=False)
            people = self.seen[np.sort(rows)]
        rng = np.random.default_rng([c.seed, 3, ("seen_eval", "seen_train", "unseen").index(name)])
        seqs, vpos, npos = [], [], []
        for p in people:
            ids, v, n = self.biography(int(p), rng, held_out=name != "seen_train")
            seqs.append(ids)
            vpos.append(v)
            npos.append(n)
        x, y = self._pack(seqs, self.seq_len)
        M, A = len(people), len(ATTRIBUTES)
        pos = torch.zeros(M, A, self.max_value_len, dtype=torch.long)
        mask = torch.zeros(M, A, self.max_value_len, dtype=torch.bool)
        name_pos = torch.zeros(M, A, self.max_name_len, dtype=torch.long)
        name_mask = torch.zeros(M, A, self.max_name_len, dtype=torch.bool)
        for i in range(M):
            for j in range(A):
                # the value token at sequence index p is the target y[p - 1]
                pos[i, j, : len(vpos[i][j])] = torch.tensor(vpos[i][j]) - 1
                mask[i, j, : len(vpos[i][j])] = True
                name_pos[i, j, : len(npos[i][j])] = torch.tensor(npos[i][j])
                name_mask[i, j, : len(npos[i][j])] = True
        out = EvalSet(name, x, y, pos, mask, name_pos, name_mask, people)
        self._eval_cache[name] = out
        return out

    def eval_batches(self, batch_size: int, seq_len: int, max_batches: int | None = None
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The Trainer's own val_loss: all tokens of the seen individuals' held-out-template biographies."""
        es = self.eval_set("seen_eval")
        pad = seq_len - es.x.shape[1]
        for k, i in enumerate(range(0, len(es.x), batch_size)):
            if max_batches is not None and k >= max_batches:
                return
            x, y = es.x[i:i + batch_size], es.y[i:i + batch_size]
            yield (torch.nn.functional.pad(x, (0, pad)), torch.nn.functional.pad(y, (0, pad))) if pad else (x, y)

    def bytes_per_token(self) -> float:
        return 0.0  # bits per byte means nothing for synthetic text; the Trainer then reports nan

    def describe(self) -> dict[str, object]:
        c = self.config
        return {"n_individuals": c.n_individuals, "n_unseen": c.n_unseen, "scale": c.scale,
                "pool_sizes": {a: len(self.pools.values[a]) for a in ATTRIBUTES}, "seq_len": self.seq_len,
                "vocab_size": self.tokenizer.vocab_size, "baseline_nats": self.baseline(),
                "top_individual_share": float(self.weights.max())}
