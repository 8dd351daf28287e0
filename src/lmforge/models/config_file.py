"""Reading a model's ``config.json`` from a run directory, which may be damaged or hostile.

Every value is checked against the type its config dataclass declares before the model is built: a list
``model_type``, ``n_layer: "four"`` or ``n_head: 0`` is a one-line :class:`LMForgeError` naming the file and
the key, never a ``TypeError`` or ``ZeroDivisionError`` from deep inside a constructor. Integers in a model
config are sizes and counts (vocabulary, layers, heads, widths, lengths), so they must be at least 1; floats
must be finite and not negative (dropouts, epsilons, RoPE's base). Finer ranges are the config classes' own
checks (``__post_init__``), whose messages are prefixed with the file.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..utils import read_json


def _kinds(annotation: Any) -> tuple[type, ...]:
    """``int | None`` -> (int, NoneType); ``dict`` -> (dict,)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return tuple(k for a in typing.get_args(annotation) for k in _kinds(a))
    origin = typing.get_origin(annotation)
    return (origin or annotation,)


def check_value(key: str, value: Any, annotation: Any, where: str) -> None:
    kinds = _kinds(annotation)
    if value is None:
        if type(None) in kinds:
            return
        raise LMForgeError(f"{where}: {key} must not be null")
    if isinstance(value, bool):
        ok = bool in kinds
    elif isinstance(value, int):
        ok = int in kinds or float in kinds
        if ok and int in kinds and value < 1:
            raise LMForgeError(f"{where}: {key} must be at least 1, not {value}")
    elif isinstance(value, float):
        ok = float in kinds
        if ok and not (math.isfinite(value) and value >= 0):
            raise LMForgeError(f"{where}: {key} must be a finite number >= 0, not {value}")
    else:
        ok = any(k not in (int, float, bool, type(None)) and isinstance(value, k) for k in kinds)
    if not ok:
        names = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
        raise LMForgeError(f"{where}: {key} must be {names}, not {str(value)[:40]!r} "
                           f"({type(value).__name__}); the file is damaged")


def read_model_config(config_class: type, directory: str | Path) -> Any:
    """``directory/config.json`` as a ``config_class`` instance, every field checked (see the module doc)."""
    path = Path(directory) / "config.json"
    where = str(path)
    d = read_json(path, "model config")
    if not isinstance(d, dict):
        raise LMForgeError(f"{where} must be a JSON object of settings, not {type(d).__name__}")
    hints = typing.get_type_hints(config_class)
    for f in fields(config_class):
        if f.name in d:
            check_value(f.name, d[f.name], hints[f.name], where)
    try:
        return config_class.from_dict(d)
    except LMForgeError as e:
        raise LMForgeError(f"{where}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:  # a combination no check foresaw
        raise LMForgeError(f"{where} does not describe a model lmforge can build ({e})") from None
