"""A typed list/int program DSL, its pure-Python interpreter, and the AZR-style validator.

A program is a pipeline of primitives applied left to right to one input list: `SORT REV TAKE2`.
Values are lists of 0..8 ints or single ints, every int in [0, MAX_INT]. Types are LIST and INT:

    list -> list   REV SORT TAKE2 DROP1 EVENS CUMSUM
    list -> int    SUM MAX MIN LEN HEAD
    both           ID INC DEC DBL HALF       (elementwise on a list)

so `SUM SORT` is a type error and `SUM INC` is fine. The interpreter is a dispatch over these names;
nothing is ever passed to `exec`/`eval`. It charges one step per element touched and stops at
STEP_CAP; any value outside [0, MAX_INT] or a list longer than MAX_LIST is a runtime error, which is
the miniature's stand-in for AZR's timeout and sandbox (Zhao et al. 2025, `python_executor.py`).

Everything is written as whitespace-separated tokens from a fixed vocabulary (`VOCAB`, built in code):

    P: SORT REV I: [ 3 1 4 ] O: [ 4 3 1 ]
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

MAX_INT = 99       # largest int value (one token each: 0..99)
MAX_LIST = 8       # longest list any value may be
MAX_OPS = 6        # longest program the parser accepts (training samples 1-4; held-out goes to 5)
STEP_CAP = 200     # elementary steps per run (one per element an op touches, plus one per op)
INPUT_MAX_VALUE = 9  # inputs the samplers draw (proposers may write any value up to MAX_INT)

LIST, INT = "list", "int"
LIST_OPS = ("REV", "SORT", "TAKE2", "DROP1", "EVENS", "CUMSUM")
REDUCE_OPS = ("SUM", "MAX", "MIN", "LEN", "HEAD")
ELEMENTWISE_OPS = ("ID", "INC", "DEC", "DBL", "HALF")
OPS = LIST_OPS + REDUCE_OPS + ELEMENTWISE_OPS
IDENTITY = ("ID",)

# ---- vocabulary ---------------------------------------------------------------------------------------

SPECIALS = ("<PAD>", "<UNK>", "<BOS>", "<EOS>")  # ids 0-3 as in lmlab.tokenizers
ROLE_TOKENS = ("<PROP_DED>", "<PROP_ABD>", "<PROP_IND>", "<SOLVE_DED>", "<SOLVE_ABD>", "<SOLVE_IND>")
STRUCTURE = ("P:", "I:", "O:", "[", "]", "<REF>")
VOCAB = SPECIALS + ROLE_TOKENS + STRUCTURE + OPS + tuple(str(i) for i in range(MAX_INT + 1))
PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Vocab:
    """Word-level encoding over VOCAB: split on whitespace, one id per token; unknown words -> <UNK>."""

    def __init__(self) -> None:
        self.tokens = VOCAB
        self.index = {t: i for i, t in enumerate(VOCAB)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, UNK_ID) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(self.tokens[i] for i in ids if 0 <= i < len(self.tokens) and i not in (PAD_ID, EOS_ID))


VOCABULARY = Vocab()

# ---- values and programs ---------------------------------------------------------------------------------

class DSLError(Exception):
    """A program that does not parse, type-check or run within the caps."""


def check_program(program: Sequence[str]) -> str:
    """Type-check a program applied to a list; return its output type or raise DSLError."""
    if not 1 <= len(program) <= MAX_OPS:
        raise DSLError(f"a program has 1..{MAX_OPS} ops, got {len(program)}")
    t = LIST
    for op in program:
        if op not in OPS:
            raise DSLError(f"unknown op {op!r}")
        if op in LIST_OPS or op in REDUCE_OPS:
            if t != LIST:
                raise DSLError(f"{op} needs a list but gets an int")
            t = LIST if op in LIST_OPS else INT
    return t


def _check_value(v: int | tuple[int, ...]) -> int | tuple[int, ...]:
    items = (v,) if isinstance(v, int) else v
    if len(items) > MAX_LIST:
        raise DSLError(f"list longer than {MAX_LIST}")
    if any(x < 0 or x > MAX_INT for x in items):
        raise DSLError(f"value outside [0, {MAX_INT}]")
    return v


def _apply(op: str, v: int | tuple[int, ...]) -> int | tuple[int, ...]:
    if op in ELEMENTWISE_OPS:
        f = {"ID": lambda x: x, "INC": lambda x: x + 1, "DEC": lambda x: x - 1, "DBL": lambda x: 2 * x,
             "HALF": lambda x: x // 2}[op]
        return f(v) if isinstance(v, int) else tuple(f(x) for x in v)
    assert isinstance(v, tuple)  # check_program guarantees it
    if op == "REV":
        return v[::-1]
    if op == "SORT":
        return tuple(sorted(v))
    if op == "TAKE2":
        return v[:2]
    if op == "DROP1":
        return v[1:]
    if op == "EVENS":
        return tuple(x for x in v if x % 2 == 0)
    if op == "CUMSUM":
        out, s = [], 0
        for x in v:
            s += x
            out.append(s)
        return tuple(out)
    if op in ("MAX", "MIN", "HEAD") and not v:
        raise DSLError(f"{op} of an empty list")
    return {"SUM": sum, "MAX": max, "MIN": min, "LEN": len, "HEAD": lambda xs: xs[0]}[op](v)


def run(program: Sequence[str], value: int | tuple[int, ...]) -> int | tuple[int, ...]:
    """Run a type-checked program on a list; raise DSLError on a type error or a broken cap."""
    check_program(program)
    if not isinstance(value, tuple):
        raise DSLError("programs take a list")
    v = _check_value(value)
    steps = 0
    for op in program:
        steps += 1 + (len(v) if isinstance(v, tuple) else 1)
        if steps > STEP_CAP:
            raise DSLError(f"more than {STEP_CAP} steps")
        v = _check_value(_apply(op, v))
    return v


# ---- text form ---------------------------------------------------------------------------------------------

def show(value: int | tuple[int, ...]) -> str:
    return str(value) if isinstance(value, int) else " ".join(["[", *map(str, value), "]"])


def show_program(program: Sequence[str]) -> str:
    return " ".join(program)


def show_triple(program: Sequence[str], inp: tuple[int, ...], out: int | tuple[int, ...]) -> str:
    return f"P: {show_program(program)} I: {show(inp)} O: {show(out)}"


def parse_value(words: Sequence[str]) -> int | tuple[int, ...]:
    """`[ 3 1 ]` -> (3, 1); `7` -> 7; anything else raises DSLError."""
    words = list(words)
    if len(words) == 1 and words[0].isdigit():
        return _check_value(int(words[0]))
    if len(words) >= 2 and words[0] == "[" and words[-1] == "]" and all(w.isdigit() for w in words[1:-1]):
        return _check_value(tuple(int(w) for w in words[1:-1]))
    raise DSLError(f"not a value: {' '.join(words)!r}")


def parse_list(words: Sequence[str]) -> tuple[int, ...]:
    v = parse_value(words)
    if not isinstance(v, tuple):
        raise DSLError("expected a list")
    return v


def parse_program(words: Sequence[str]) -> tuple[str, ...]:
    program = tuple(words)
    check_program(program)
    return program


# ---- validation as in AZR ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Triple:
    program: tuple[str, ...]
    input: tuple[int, ...]
    output: int | tuple[int, ...]


def validate(program: Sequence[str], inp: tuple[int, ...]) -> Triple:
    """AZR's executor checks (`PythonExecutor.check_all`): parses and type-checks, runs within the caps,
    and gives the same output on two runs. Raises DSLError with the reason, else returns the triple."""
    program = parse_program(program)
    first = run(program, inp)
    if run(program, inp) != first:  # cannot differ for this interpreter; kept so the check is AZR's
        raise DSLError("non-deterministic")
    return Triple(program, tuple(inp), first)


def parse_proposal(text: str) -> Triple:
    """A deduction/abduction proposal `SORT REV I: [ 3 1 ]` (what follows the prompt's `P:`)."""
    words = text.split()
    if words.count("I:") != 1:
        raise DSLError("a proposal is `OPS I: [ ... ]`")
    cut = words.index("I:")
    return validate(words[:cut], parse_list(words[cut + 1:]))


def parse_inputs(text: str, program: Sequence[str], n: int) -> list[tuple[int, ...]]:
    """An induction proposal `[ 1 2 ] I: [ 5 ] I: ...` (what follows the prompt's first `I:`): exactly n
    distinct lists, each of which the program runs on."""
    chunks = [c.split() for c in text.split("I:")]
    if len(chunks) != n:
        raise DSLError(f"expected {n} inputs, got {len(chunks)}")
    inputs = [parse_list(c) for c in chunks]
    if len(set(inputs)) != n:
        raise DSLError("inputs must be distinct")
    for inp in inputs:
        validate(program, inp)
    return inputs


# ---- random programs (the warm-up corpus, the baseline's task generator and the held-out set) -------------

def random_program(rng: random.Random, length: int) -> tuple[str, ...]:
    """A uniformly chosen well-typed program of `length` ops (a reduce op ends list-typed steps)."""
    ops: list[str] = []
    t = LIST
    for _ in range(length):
        choices = list(ELEMENTWISE_OPS[1:]) if t == INT else list(LIST_OPS + ELEMENTWISE_OPS[1:] + REDUCE_OPS)
        op = rng.choice(choices)
        ops.append(op)
        if op in REDUCE_OPS:
            t = INT
    return tuple(ops)


def random_input(rng: random.Random) -> tuple[int, ...]:
    return tuple(rng.randint(0, INPUT_MAX_VALUE) for _ in range(rng.randint(1, 6)))


def random_triple(rng: random.Random, length: int, tries: int = 100) -> Triple:
    """A valid triple with a program of exactly `length` ops (resampled until it runs)."""
    for _ in range(tries):
        program, inp = random_program(rng, length), random_input(rng)
        try:
            return validate(program, inp)
        except DSLError:
            continue
    raise RuntimeError(f"no valid program of length {length} in {tries} tries")  # pragma: no cover
