"""Reading a model's ``config.json`` from a run directory, which may be damaged or hostile.

The values are checked by the config dataclass's own declarations (``lmforge.options``: types, bounds and
choices), so a list ``model_type``, ``n_layer: "four"`` or ``n_head: 0`` is a one-line :class:`LMForgeError`
prefixed with the file, never a ``TypeError`` or ``ZeroDivisionError`` from deep inside a constructor.
Unknown keys are ignored (files written by other versions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import LMForgeError
from ..utils import read_json


def read_model_config(config_class: Any, directory: str | Path) -> Any:
    """``directory/config.json`` as a ``config_class`` instance, every field checked."""
    path = Path(directory) / "config.json"
    d = read_json(path, "model config")
    if not isinstance(d, dict):
        raise LMForgeError(f"{path} must be a JSON object of settings, not {type(d).__name__}")
    try:
        return config_class.from_dict(d, strict=False)
    except LMForgeError as e:
        raise LMForgeError(f"{path}: {e}") from None
    except (TypeError, ValueError, ZeroDivisionError, OverflowError) as e:  # a combination no check foresaw
        raise LMForgeError(f"{path} does not describe a model lmforge can build ({e})") from None
