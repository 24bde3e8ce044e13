"""Config dataclasses, one way for all of them: each field declares its type, help text and bounds where it
is defined; one validator checks them; dicts and files are read with unknown keys refused; command-line
flags are generated from the same fields, with the same help.

    @dataclass
    class TrainConfig:
        lr: float = knob(3e-4, "peak learning rate", gt=0)
        schedule: str = knob("cosine", "decay after warm-up", choices=SCHEDULES)

        def __post_init__(self) -> None:
            validate(self)            # types and bounds of every field; then the checks across fields

    TrainConfig.from_dict(...)   ->  from_dict(TrainConfig, data)     (unknown keys are one error naming them)
    add_arguments(parser, TrainConfig)  ->  --lr FLOAT, --schedule {cosine,...}, with the help above
    read_config_file("run.yaml")        ->  a mapping, for `--config FILE` (JSON, or YAML with PyYAML)

Also here: the one grammar of seed lists that every lab and command takes (`parse_seeds`).
"""

from __future__ import annotations

import argparse
import dataclasses
import dis
import errno
import functools
import json
import math
import types
import typing
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

_BOUNDS = (("ge", ">=", lambda v, b: v >= b), ("gt", ">", lambda v, b: v > b),
           ("le", "<=", lambda v, b: v <= b), ("lt", "<", lambda v, b: v < b))


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,  # noqa: A002
         ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
         choices: Sequence[Any] | None = None, flag: bool = True) -> Any:
    """A dataclass field with its help text and the bounds `validate` checks (None is always allowed where
    the type says `| None`). flag=False keeps it off the command line (set from code or files only)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": tuple(choices) if choices else None,
            "flag": flag}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(kind: Any) -> str:
    if kind is type(None):
        return "null"
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return " or ".join(_describe(k) for k in typing.get_args(kind))
    if typing.get_origin(kind) in (list, tuple):
        return f"a list of {_describe(typing.get_args(kind)[0])}"
    if typing.get_origin(kind) is typing.Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(kind)))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, str(kind))


def _matches(value: Any, kind: Any) -> bool:
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, k) for k in typing.get_args(kind))
    if origin in (list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(v, typing.get_args(kind)[0]) for v in value)
    if origin is typing.Literal:
        return value in typing.get_args(kind)
    if kind is type(None):
        return value is None
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:  # an integer is a number too (JSON writes 1.0 as 1 in some tools)
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return not isinstance(kind, type) or isinstance(value, kind)


def validate(config: Any) -> None:
    """ValueError naming the first field of a config dataclass whose value has the wrong type, is not a
    finite number, is out of its bounds, or is not among its choices: dicts and JSON arrive untyped, and a
    string compared with a number would fail as a TypeError deep inside."""
    hints = _hints(type(config))
    for f in dataclasses.fields(config):
        value, kind, meta = getattr(config, f.name), hints[f.name], f.metadata
        if not _matches(value, kind):
            raise ValueError(f"{f.name} ({value!r}) must be {_describe(kind)}")
        if value is None or isinstance(value, bool):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{f.name} ({value!r}) must be a finite number")
        for key, sign, ok in _BOUNDS:
            if meta.get(key) is not None and not ok(value, meta[key]):
                raise ValueError(f"{f.name} ({value!r}) must be {sign} {meta[key]}")
        if meta.get("choices") and value not in meta["choices"]:
            raise ValueError(f"{f.name} ({value!r}) must be one of {', '.join(map(str, meta['choices']))}")


def from_dict(cls: type, data: dict[str, Any], aliases: dict[str, str] | None = None) -> Any:
    """`cls(**data)` after refusing keys that are not fields of `cls` (named in one error); `aliases` maps
    other spellings (e.g. the config keys of the AZR Model Trainer app and llm-arch-research) onto field names."""
    if not isinstance(data, dict):
        raise ValueError(f"a {cls.__name__} must be a mapping of its fields, not {type(data).__name__}")
    names, kwargs, source = {f.name for f in dataclasses.fields(cls)}, {}, {}
    unknown = []
    for key, value in data.items():
        name = (aliases or {}).get(key, key)
        if name not in names:
            unknown.append(key)
        elif name in kwargs and kwargs[name] != value:
            raise ValueError(f"{key} ({value!r}) conflicts with {source[name]} ({kwargs[name]!r})")
        else:
            kwargs[name], source[name] = value, key
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(map(str, unknown))}")
    return cls(**kwargs)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A mapping from a JSON file, or a YAML one (.yaml/.yml, with PyYAML installed); ValueError naming the
    file for anything else."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 (byte {exc.start + 1})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ValueError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, ValueError) as exc:
        raise ValueError(f"{path} is not valid {'YAML' if path.suffix.lower() in ('.yaml', '.yml') else 'JSON'}: "
                         f"{str(exc).splitlines()[0]}") from None
    except RecursionError:  # the readers recurse per level: [[[...]]] a thousand deep ran out of stack
        raise ValueError(f"{path} is nested too deeply to be a mapping of settings") from None
    except Exception as exc:  # yaml.YAMLError and its kin
        raise ValueError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of settings, not {type(data).__name__}")
    return data


# ---- command-line flags ---------------------------------------------------------------------------

def _without_none(kind: Any) -> Any:
    """`int | None` -> int; other types as they are."""
    args = [k for k in typing.get_args(kind) if k is not type(None)]
    return args[0] if typing.get_origin(kind) in (typing.Union, types.UnionType) and len(args) == 1 else kind


def _flag_type(kind: Any) -> tuple[Any, str, bool]:
    """(argparse type, metavar, is a list) of a field type."""
    kind = _without_none(kind)
    if typing.get_origin(kind) in (list, tuple):
        inner, _, _ = _flag_type(typing.get_args(kind)[0])
        return inner, inner.__name__.upper(), True
    base = kind if kind in (int, float, str) else str
    return base, base.__name__.upper(), False


def add_arguments(parser: argparse.ArgumentParser | Any, cls: type, *, exclude: Iterable[str] = (),
                  title: str | None = None, defaults: dict[str, Any] | None = None) -> list[str]:
    """One flag per field of `cls` (`--field-name`; booleans as --x/--no-x; lists as comma lists), each with
    the field's help and its default (`defaults`: the command's own, which the command applies itself); every
    flag defaults to None, so `given(args, cls)` is what was set. Choices and bounds are left to `validate`,
    whose one-line message names the field. Returns the field names that became flags."""
    group = parser.add_argument_group(title) if title else parser
    hints, added = _hints(cls), []
    for f in dataclasses.fields(cls):
        if f.name in exclude or not f.metadata.get("flag", True):
            continue
        kind, meta = hints[f.name], f.metadata
        default = f.default if f.default is not dataclasses.MISSING else "none"
        default = (defaults or {}).get(f.name, default)
        text = meta.get("help", "")
        text += "" if "default" in text else f" (default {default})"
        flag = "--" + f.name.replace("_", "-")
        if _without_none(kind) is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            base, metavar, many = _flag_type(kind)
            if many:
                action = group.add_argument(flag, type=lambda s, b=base: [b(v.strip()) for v in s.split(",")
                                                                          if v.strip()],
                                            default=None, metavar=f"{metavar},...", help=text)
                action.list_of = base  # a --config file gives the list itself (its items may hold commas)
            else:
                choices = meta.get("choices")
                group.add_argument(flag, type=base, default=None, help=text,
                                   metavar="{" + ",".join(map(str, choices)) + "}" if choices else metavar)
        added.append(f.name)
    return added


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` that were set on the command line (or by a --config file)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if getattr(args, f.name, None) is not None}


# ---- seeds ----------------------------------------------------------------------------------------

MAX_SEEDS = 10_000


def parse_seeds(text: str | int | Sequence[int]) -> list[int]:
    """The one seed grammar: `0,1,2` (a list), `0-4` (a range, both ends included), `3` (that one seed) or
    a list of ints; distinct and >= 0. A count is written as a range: `0-2` for three seeds."""
    if isinstance(text, int) and not isinstance(text, bool):
        seeds = [text]
    elif isinstance(text, (list, tuple)):
        seeds = list(text)
    else:
        try:
            seeds = []
            for part in str(text).split(","):
                part = part.strip()
                if not part:
                    continue
                first, dash, last = part.partition("-")
                if dash and first and int(last) - int(first) >= MAX_SEEDS:
                    raise ValueError(f"--seeds ({text!r}) names more than {MAX_SEEDS} seeds")
                seeds += list(range(int(first), int(last) + 1)) if dash and first else [int(part)]
        except ValueError:
            raise ValueError(f"--seeds ({text!r}) must look like 0,1,2 (a list), 0-4 (a range) or 3 (one "
                             "seed)") from None
    if not seeds or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**31 for s in seeds) \
            or len(set(seeds)) != len(seeds) or len(seeds) > MAX_SEEDS:
        # below 2^31: the labs derive their runs' seeds from these (1000 + s, 2s + 2, ...), which torch.manual_seed
        # must take (a seed near 2^63 overflowed it half-way through, after the lab had written its folders)
        raise ValueError(f"--seeds ({text!r}) must be distinct integers from 0 to 2^31 - 1, at least one and at "
                         f"most {MAX_SEEDS}")
    return seeds


def settings_from(saved: dict[str, Any], cls: type, overrides: dict[str, Any], where: Path) -> Any:
    """`cls` from a run's saved settings with `overrides` on top; a hand-edited number that is not one, or a
    value its __post_init__ cannot compare, is a ValueError naming the file (not a TypeError)."""
    fields = {f.name for f in dataclasses.fields(cls)}
    settings = {**{k: v for k, v in saved.items() if k in fields}, **overrides}
    number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)  # noqa: E731
    for name, default in dataclasses.asdict(cls()).items():
        if name in settings and number(default) and not number(settings[name]):
            raise ValueError(f"{where}: {name} ({settings[name]!r}) must be a number")
    try:
        return cls(**settings)
    except TypeError as exc:
        raise ValueError(f"{where}: a setting of the wrong type ({exc})") from None


# ---- bad input or a bug ------------------------------------------------------------------------------

_PACKAGE = Path(__file__).resolve().parent
_RAISE = dis.opmap["RAISE_VARARGS"]
_PATH_ERRORS = (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError)
# a name longer than the file system takes (255 bytes a component on most), a read-only file system (a full disk
# and its kin: the CLI's disk_full, which it asks first)
_USER_ERRNOS = {errno.ENAMETOOLONG, errno.EROFS}


def is_user_error(exc: BaseException) -> bool:
    """Bad input rather than a bug: an OSError about a path, or a ValueError that lmlab's own code raised with
    its own message (a `raise` statement in the package: the house convention for input it refuses). A
    ValueError from inside torch, numpy or the standard library, or from an operation that failed in lmlab's
    code (an unpacking, an int() of something never checked), is a bug."""
    if isinstance(exc, _PATH_ERRORS) or (isinstance(exc, OSError) and exc.errno in _USER_ERRNOS):
        return True
    if isinstance(exc, ValueError) and isinstance(getattr(exc, "user_error", None), bool):
        return exc.user_error  # judged in the worker process that raised it (lab.parallel.process_map)
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next  # the frame the exception was raised in
    if not isinstance(exc, ValueError) or tb is None:
        return False
    code = tb.tb_frame.f_code
    return Path(code.co_filename).resolve().is_relative_to(_PACKAGE) and code.co_code[tb.tb_lasti] == _RAISE
