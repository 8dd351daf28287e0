"""Devices and processes: one process on a CPU or GPU, or many under ``torchrun`` (DDP or FSDP2).

Rank roles: every rank computes its share of each global batch and writes its shard of a DCP
checkpoint; rank 0 alone prints, draws the progress bar, writes ``metrics.jsonl``, the loss plot,
the top-level model files and ``state.json``, and renames checkpoints into place. Errors that any
rank meets before training are agreed on (:meth:`Runtime.agree`), so every rank exits with the same
one-line error (printed by rank 0) instead of leaving the others waiting in a collective.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP

from ..errors import LMForgeError
from ..utils import resolve_device, resolve_dtype


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype | None:
    """The autocast precision of ``--dtype`` on ``device``; None = fp32 (no autocast). ``auto``: bf16 on GPUs
    that have it, else fp16; on a CPU, what the measured probe picks (utils.resolve_dtype); fp32 on MPS."""
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        dtype = resolve_dtype("auto", "train", device)
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]


@dataclass
class Runtime:
    """Where this process stands: its rank among ``world`` processes, its device and strategy."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"       # none | ddp | fsdp
    backend: str | None = None   # gloo | nccl when world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, in place (on the device the backend needs)."""
        if self.distributed:
            dist.all_reduce(t)
        return t

    def agree(self, error: str | None) -> None:
        """Collective: raise the same LMForgeError on every rank when any rank met one."""
        if not self.distributed:
            if error:
                raise LMForgeError(error)
            return
        errors: list[Any] = [None] * self.world
        dist.all_gather_object(errors, error)
        first = next(((r, e) for r, e in enumerate(errors) if e), None)
        if first:
            raise LMForgeError(first[1] if first[0] == 0 else f"{first[1]} (on rank {first[0]})")

    @contextlib.contextmanager
    def collectively(self) -> Iterator[None]:
        """Run a block in which any rank may meet bad input; afterwards all ranks agree on it."""
        error = None
        try:
            yield
        except LMForgeError as e:
            error = str(e)
        self.agree(error)

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def setup(device: str, strategy: str, backend: str) -> Runtime:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), pick the device, join the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world == 1:
        strategy = "none"  # one process: nothing to replicate or shard
    elif strategy == "none":
        raise LMForgeError(f"--strategy none cannot run {world} processes; use ddp or fsdp")
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if backend == "nccl" and dev.type != "cuda":
        raise LMForgeError(f"--backend nccl needs CUDA devices, and this process runs on {dev.type}; "
                           "use --backend gloo (the default on CPU)")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        torch.backends.cuda.matmul.allow_tf32 = True  # TF32 tensor cores for fp32 matmuls (Ampere+)
        torch.backends.cudnn.allow_tf32 = True
    rt = Runtime(rank, world, local_rank, dev, strategy, backend if world > 1 else None)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend, device_id=dev if dev.type == "cuda" else None)
    return rt


class LossStep(torch.nn.Module):
    """The module DDP/FSDP wrap and torch.compile compiles: its forward is the model's training loss
    (DDP and FSDP act in ``forward``, and the families' training entry point is ``loss``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any, labels: torch.Tensor, state: Any = None) -> tuple[torch.Tensor, torch.Tensor, Any]:
        return self.model.loss((inputs, labels), state)  # type: ignore[operator]


def wrap(rt: Runtime, model: torch.nn.Module) -> torch.nn.Module:
    """The training module for this strategy: plain, DDP, or FSDP2 (``fully_shard`` per block, then the root)."""
    step = LossStep(model)
    if rt.strategy == "ddp":
        return DDP(step, device_ids=[rt.device.index] if rt.device.type == "cuda" else None)
    if rt.strategy == "fsdp":
        units = model.shard_units()  # type: ignore[operator]
        mesh = init_device_mesh(rt.device.type, (rt.world,))  # on CPU an explicit CPU mesh (gloo)
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(step, mesh=mesh)
    return step


@contextlib.contextmanager
def gradient_sync(rt: Runtime, module: torch.nn.Module, sync: bool) -> Iterator[None]:
    """Accumulate locally and reduce gradients only on the last micro-step of an optimizer step."""
    if rt.strategy == "ddp" and not sync:
        with module.no_sync():  # type: ignore[operator]
            yield
    elif rt.strategy == "fsdp":
        module.set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
    else:
        yield
