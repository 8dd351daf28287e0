"""Options declared once: a dataclass field carries its help, its constraints and its command-line flag.

    @dataclass
    class TrainConfig(Options):
        lr: float = option(2e-3, gt=0, help="peak learning rate (AdamW)")
        schedule: Literal["cosine", "linear", "constant"] = option("cosine", help="learning-rate schedule")

* the type comes from the annotation (``int``, ``float``, ``str``, ``bool``, ``Literal[...]`` = choices,
  ``X | None`` = optional, ``dict``, ``list[str]``);
* ``ge``/``gt``/``le``/``lt`` bound numbers; floats must be finite unless ``finite=False``;
* ``__post_init__`` (from :class:`Options`) runs one generic validator, so ``TrainConfig(lr=float("nan"))``,
  a YAML file with ``lr: .nan`` and ``lmforge train --lr nan`` all fail with the same one-line
  :class:`LMForgeError` ("lr (--lr) must be a finite number, got nan");
* :func:`add_options` turns the fields into argparse flags (help, default, allowed values in ``--help``);
  the flags hand strings to the validator, which converts them, so the command line and YAML share its words.

A new field with ``option(...)`` is therefore a documented, validated flag of every command built from
its dataclass, with no other edit.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from .errors import LMForgeError

_MISSING: Any = dataclasses.MISSING
INT64_MAX = 2**63 - 1  # torch/numpy seeds and counts are 64-bit


def option(default: Any = _MISSING, *, help: str, default_factory: Any = _MISSING,  # noqa: A002
           ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
           finite: bool = True, flag: str | None = None, cli: bool = True, metavar: str | None = None,
           default_text: str | None = None, parse: Any = None) -> Any:
    """A dataclass field with its help and constraints. ``cli=False`` keeps it off the command line
    (still validated); ``default_text`` replaces the shown default (e.g. "from the preset"); ``parse``
    converts a string first (e.g. durations such as 5m)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "finite": finite, "flag": flag, "cli": cli,
            "metavar": metavar, "default_text": default_text, "parse": parse}
    return dataclasses.field(default=default, default_factory=default_factory, metadata={"option": meta})


def flag_of(f: dataclasses.Field) -> str:
    return "--" + (f.metadata.get("option", {}).get("flag") or f.name.replace("_", "-"))


def label(f: dataclasses.Field) -> str:
    """How an error names the option, for Python, YAML and CLI users alike: ``lr (--lr)``."""
    on_cli = f.metadata.get("option", {}).get("cli", False)
    return f"{f.name} ({flag_of(f)})" if on_cli else f.name


def hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_union(t: Any) -> bool:
    return get_origin(t) in (Union, types.UnionType)


def choices_of(t: Any) -> tuple | None:
    if _is_union(t):
        t = next((a for a in get_args(t) if a is not type(None)), t)
    return get_args(t) if get_origin(t) is Literal else None


def _plain(x: Any) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _convert(f: dataclasses.Field, t: Any, v: Any) -> Any:
    """``v`` as type ``t`` (strings from the command line or YAML are parsed), or a one-line error."""
    if _is_union(t):
        args = [a for a in get_args(t) if a is not type(None)]
        if v is None or (isinstance(v, str) and v.lower() in ("none", "null")):
            return None
        t = args[0] if len(args) == 1 else t
    if v is None:
        raise LMForgeError(f"{label(f)} must be given (got None)")
    origin = get_origin(t)
    if origin is Literal:
        allowed = get_args(t)
        if v not in allowed:
            raise LMForgeError(f"{label(f)} must be one of {', '.join(map(str, allowed))} (got {v!r})")
        return v
    if t is bool:
        if isinstance(v, str) and v.lower() in ("true", "false", "yes", "no", "1", "0"):
            return v.lower() in ("true", "yes", "1")
        if not isinstance(v, bool):
            raise LMForgeError(f"{label(f)} must be true or false (got {v!r})")
        return v
    if t is int:
        if isinstance(v, str):
            try:
                v = int(v.strip().replace("_", ""))
            except ValueError:
                raise LMForgeError(f"{label(f)} must be an integer (got {v!r})") from None
        if isinstance(v, bool) or not isinstance(v, int):
            raise LMForgeError(f"{label(f)} must be an integer (got {v!r})")
        return v
    if t is float:
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                raise LMForgeError(f"{label(f)} must be a number (got {v!r})") from None
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise LMForgeError(f"{label(f)} must be a number (got {v!r})")
        return float(v)
    if t is str:
        if not isinstance(v, str):
            raise LMForgeError(f"{label(f)} must be text (got {v!r})")
        return v
    if t is dict or origin is dict:
        if not isinstance(v, dict):
            raise LMForgeError(f"{label(f)} must be a mapping of name: value (got {v!r})")
        return v
    if origin is list:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            raise LMForgeError(f"{label(f)} must be a list of text (got {v!r})")
        return list(v)
    return v


def check(f: dataclasses.Field, t: Any, v: Any) -> Any:
    """Convert and check one value against its field's declaration; returns the converted value."""
    meta = f.metadata.get("option")
    if meta is not None and meta["parse"] is not None and isinstance(v, str):
        try:
            v = meta["parse"](v)
        except LMForgeError as e:
            raise LMForgeError(f"{label(f)}: {e}") from None
    v = _convert(f, t, v)
    if meta is None or v is None or isinstance(v, bool) or not isinstance(v, (int, float)):
        return v
    if isinstance(v, float) and meta["finite"] and not math.isfinite(v):
        raise LMForgeError(f"{label(f)} must be a finite number (got {v})")
    rules = [(meta["ge"], ">=", v >= meta["ge"] if meta["ge"] is not None else True),
             (meta["gt"], ">", v > meta["gt"] if meta["gt"] is not None else True),
             (meta["le"], "<=", v <= meta["le"] if meta["le"] is not None else True),
             (meta["lt"], "<", v < meta["lt"] if meta["lt"] is not None else True)]
    if not all(ok for _, _, ok in rules):
        bound = " and ".join(f"{op} {_plain(b)}" for b, op, _ in rules if b is not None)
        raise LMForgeError(f"{label(f)} must be {bound} (got {_plain(v)})")
    return v


def validate(obj: Any) -> None:
    """Check (and convert in place) every field of a dataclass instance against its declaration."""
    th = hints(type(obj))
    for f in dataclasses.fields(obj):
        setattr(obj, f.name, check(f, th[f.name], getattr(obj, f.name)))


class Options:
    """Base of lmforge's config dataclasses: validation on construction, dict round trips."""

    def __post_init__(self) -> None:
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls, d: Any, strict: bool = True, what: str = "option") -> Any:
        """Build from a mapping. ``strict`` refuses unknown keys (user configs); files written by other
        versions or tools are read with ``strict=False`` (unknown keys ignored)."""
        if not isinstance(d, dict):
            raise LMForgeError(f"{cls.__name__} needs a mapping of {what}: value, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = set(d) - names
        if unknown and strict:
            raise LMForgeError(f"unknown {what}(s): {', '.join(sorted(map(str, unknown)))}")
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def check_value(cls, name: str, value: Any) -> Any:
        """Check one would-be field value (e.g. a model option given before the preset is known)."""
        f = next((f for f in dataclasses.fields(cls) if f.name == name), None)  # type: ignore[arg-type]
        if f is None:
            raise LMForgeError(f"unknown option {name!r} for {cls.__name__}")
        return check(f, hints(cls)[name], value)


# --- the command line --------------------------------------------------------------------------------
def _help_text(f: dataclasses.Field, t: Any, default: Any = _MISSING) -> str:
    meta = f.metadata["option"]
    if default is not _MISSING:
        f = dataclasses.field(default=default, metadata=f.metadata)  # the command's own default
    parts = [meta["help"]]
    ch = choices_of(t)
    if ch:
        parts.append(f"one of: {', '.join(map(str, ch))}")
    bounds = [f"{op} {_plain(meta[k])}" for k, op in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
              if meta[k] is not None]
    if bounds:
        parts.append("allowed: " + " and ".join(bounds))
    if meta["default_text"] is not None:
        parts.append(f"default: {meta['default_text']}")
    elif f.default is not _MISSING:
        d = f.default
        parts.append("default: " + ("on" if d is True else "off" if d is False else "none" if d is None else str(d)))
    return "; ".join(parts).replace("%", "%%")


def cli_fields(cls: type, only: tuple[str, ...] | None = None,
               exclude: tuple[str, ...] = ()) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "option" in f.metadata and f.metadata["option"]["cli"]
            and f.name not in exclude and (only is None or f.name in only)]


def add_options(parser: argparse._ActionsContainer, cls: type, only: tuple[str, ...] | None = None,
                exclude: tuple[str, ...] = (), seen: set[str] | None = None,
                defaults: dict[str, Any] | None = None) -> list[str]:
    """One flag per declared field of ``cls``; every flag defaults to None (= not given), values stay
    strings for the validator. Returns the dests added (``seen`` skips names another class added;
    ``defaults`` are a command's own defaults, shown in the help instead of the field's)."""
    defaults = defaults or {}
    th = hints(cls)
    dests = []
    for f in cli_fields(cls, only, exclude):
        if seen is not None and f.name in seen:
            continue
        t = th[f.name]
        meta = f.metadata["option"]
        if t is bool or (_is_union(t) and bool in get_args(t)):
            parser.add_argument(flag_of(f), dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=_help_text(f, t, defaults.get(f.name, _MISSING)))
        else:
            ch = choices_of(t)
            metavar = meta["metavar"] or ("{" + ",".join(map(str, ch)) + "}" if ch else f.name.upper())
            parser.add_argument(flag_of(f), dest=f.name, default=None, metavar=metavar,
                                help=_help_text(f, t, defaults.get(f.name, _MISSING)),
                                action="append" if get_origin(t) is list else "store")
        dests.append(f.name)
        if seen is not None:
            seen.add(f.name)
    return dests


def given(args: argparse.Namespace, names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """The options the user gave on the command line (None = not given)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
