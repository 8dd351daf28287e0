"""Atomic, reshardable training checkpoints (``torch.distributed.checkpoint``).

A run directory holds the loadable model at its top level (config.json, model.safetensors,
tokenizer.json) and the full training state in ``checkpoint/``::

    checkpoint/.metadata         DCP's index: every tensor's global shape and where its shards lie
    checkpoint/__R_0.distcp      the tensors rank R wrote (weights, AdamW moments, sampler, RNG, carry)
    checkpoint/state.json        step, tokens seen, elapsed time, world size, the training config

Every rank writes its share (FSDP: its shards; DDP: DCP spreads the replicated tensors over the
ranks); the index records global shapes, so a checkpoint saved by N processes loads into M (DCP
reshards on load). A new checkpoint is written whole into ``checkpoint.tmp/``; rank 0 writes
``state.json`` last (its presence marks completeness) and swaps it in by two renames
(``checkpoint`` -> ``checkpoint.old``, ``checkpoint.tmp`` -> ``checkpoint``). A crash at any point
leaves a complete checkpoint in ``checkpoint/`` or ``checkpoint.old/``, which resume finds.

Nothing here runs code from the files: tensors are read with ``torch.load(weights_only=True)``
(DCP's reader), and DCP's pickled index is read with an unpickler that admits only DCP's own
metadata classes. Checkpoints written before DCP (``model.safetensors`` + ``optimizer.pt`` +
``rng.pt``) still resume in one process.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import BytesStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import LMForgeError, first_line
from ..models.weights import load_weights
from ..utils import atomic_write_json, read_json
from .distributed import Runtime

CKPT, TMP, OLD = "checkpoint", "checkpoint.tmp", "checkpoint.old"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


class _MetadataUnpickler(pickle.Unpickler):
    """DCP's index is a pickle; admit only the classes it is made of (no code from a hostile file)."""

    SAFE = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
            ("collections", "OrderedDict"), ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAFE or module == "torch.distributed.checkpoint.metadata":
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                          torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
        path = Path(self.path) / ".metadata"
        try:
            metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
        except FileNotFoundError:
            raise LMForgeError(f"checkpoint {self.path} is incomplete: .metadata is missing") from None
        except pickle.UnpicklingError as e:
            raise LMForgeError(f"{path} holds objects other than DCP's metadata ({e}), which lmforge never "
                               "unpickles (the file may be malicious); restore the checkpoint or start a new run") \
                from None
        except Exception as e:
            raise LMForgeError(f"checkpoint {self.path} has a damaged index ({first_line(e)}); restore it or start a "
                               "new run") from None
        if any(isinstance(md, BytesStorageMetadata) for md in metadata.state_dict_metadata.values()):
            raise LMForgeError(f"checkpoint {self.path} holds pickled objects, which lmforge never loads")
        metadata.storage_meta = metadata.storage_meta or dcp.metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def init_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Create AdamW's moments now (zeros, step 0), so that checkpoints have the same keys from the
    first save on and DCP has tensors to load into. (DCP's own initialiser takes a step with lr 0,
    which leaves ``step`` at 1 and would skew the first real step's bias correction.)"""
    if optimizer.state:
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        g["lr"] = 0.0
        for p in g["params"]:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
    optimizer.step()
    for g, lr in zip(optimizer.param_groups, lrs):
        g["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    for st in optimizer.state.values():
        if "step" in st and isinstance(st["step"], torch.Tensor):
            st["step"].zero_()
        elif "step" in st:
            st["step"] = 0


def _optimizer_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state tensors by parameter name (AdamW's moments and step counts). Its
    hyperparameters are not saved: they come from the run's config (DCP would pickle them)."""
    return {"state": get_optimizer_state_dict(model, optimizer)["state"]}


def save_checkpoint(run_dir: Path, rt: Runtime, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any], state: dict[str, Any]) -> None:
    """Collective: every rank calls it. ``extra`` holds further tensors (sampler, RNG, carried state),
    the same on every rank; ``state`` (JSON) is written by rank 0."""
    run_dir = Path(run_dir)
    tmp, cur, old = run_dir / TMP, run_dir / CKPT, run_dir / OLD
    if rt.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    rt.barrier()
    sd = {"model": get_model_state_dict(model), "optim": _optimizer_tensors(model, optimizer), **extra}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(sd, storage_writer=dcp.FileSystemWriter(tmp, sync_files=True))
    if rt.is_main:
        atomic_write_json(tmp / "state.json", state)  # written last: its presence marks completeness
        _fsync_dir(tmp)
        if cur.exists():
            shutil.rmtree(old, ignore_errors=True)
            cur.rename(old)
        tmp.rename(cur)
        _fsync_dir(run_dir)
        shutil.rmtree(old, ignore_errors=True)
    rt.barrier()


def find_checkpoint(run_dir: Path) -> Path | None:
    for name in (CKPT, OLD):
        d = Path(run_dir) / name
        if (d / "state.json").exists():
            return d
    return None


STATE_FIELDS = {"step": int, "tokens_seen": int, "train_time": (int, float), "config": dict}


def read_state(ckpt: Path) -> dict[str, Any]:
    """``state.json``, checked: a damaged one (``{}``, a wrong type) is a one-line error, not a KeyError."""
    path = Path(ckpt) / "state.json"
    state = read_json(path, "checkpoint state")
    if not isinstance(state, dict):
        raise LMForgeError(f"{path} is damaged: expected a JSON object; restore it or start a new run")
    for key, kind in STATE_FIELDS.items():
        v = state.get(key)
        if isinstance(v, bool) or not isinstance(v, kind) or (kind is int and v < 0):
            raise LMForgeError(f"{path} is damaged: {key!r} is {'missing' if v is None else repr(v)[:40]}; "
                               "restore it or start a new run")
    return state


def _torch_load(path: Path) -> Any:
    """Tensors and plain containers only (``weights_only``): a pickle that would build any other object
    (run code) is refused with one line. PyTorch's multi-line explanation and its warning about the
    pickle protocol are not shown."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:GLOBAL|global:?)\s+([\w.]+)", str(e))
        what = f" ({found.group(1)})" if found else ""
        raise LMForgeError(f"{path} holds objects other than tensors{what}, which lmforge never unpickles (the file "
                           "may be malicious); restore the checkpoint or start a new run") from None


def load_checkpoint(ckpt: Path, rt: Runtime, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restore weights and optimizer state in place (resharded to this run's world size); fill ``extra``
    (a template of tensors of the right shapes) and return ``(state, extra)``."""
    state = read_state(ckpt)
    if (ckpt / "rng.pt").exists():
        return state, _load_legacy(ckpt, rt, model, optimizer)
    optim = get_optimizer_state_dict(model, optimizer)
    sd = {"model": get_model_state_dict(model), "optim": {"state": optim["state"]}, **extra}
    SafeReader(ckpt).read_metadata()  # a damaged or hostile index: its own one-line error, before DCP wraps it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, storage_reader=SafeReader(ckpt))
    except LMForgeError:
        raise
    except (Exception, CheckpointException) as e:  # DCP's exception (a BaseException) wraps every rank's
        first = next(iter(getattr(e, "failures", {}).values()), e)
        first = first[0] if isinstance(first, tuple) else first  # (exception, traceback)
        msg = (str(first).strip().splitlines() or [type(first).__name__])[0].split(". ")[0][:160]
        raise LMForgeError(f"checkpoint {ckpt} is truncated or corrupted, or from another model ({msg}); "
                           "restore it or start a new run") from None
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, optimizer, {"state": sd["optim"]["state"], "param_groups": optim["param_groups"]})
    return state, {k: sd[k] for k in extra}


def _load_legacy(ckpt: Path, rt: Runtime, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A checkpoint from before DCP: weights in safetensors, optimizer and RNG in weights-only torch files."""
    if rt.world > 1 or rt.strategy != "none":
        raise LMForgeError(f"checkpoint {ckpt} predates distributed checkpoints; resume it once in one process "
                           "(it is then saved in the new format)")
    load_weights(model, ckpt / "model.safetensors")
    try:
        optimizer.load_state_dict(_torch_load(ckpt / "optimizer.pt"))
        rng = _torch_load(ckpt / "rng.pt")
    except FileNotFoundError as e:
        raise LMForgeError(f"checkpoint {ckpt} is incomplete: {Path(e.filename).name} is missing") from None
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, TypeError, IndexError) as e:
        raise LMForgeError(f"checkpoint {ckpt} is truncated or corrupted ({first_line(e)})") from None
    if not isinstance(rng, dict) or not isinstance(rng.get("torch"), torch.Tensor) or \
            not isinstance(rng.get("sampler"), dict):
        raise LMForgeError(f"checkpoint {ckpt} is damaged: rng.pt does not hold lmforge's RNG states")
    return {"legacy_rng": rng}
