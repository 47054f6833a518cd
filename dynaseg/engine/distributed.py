"""torch.distributed helpers: process-group setup from torchrun's environment, reductions."""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

__all__ = ["init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process",
           "reduce_mean", "all_gather_objects", "barrier", "cleanup"]


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def init_distributed(device: str) -> torch.device:
    """Join the process group torchrun describes (WORLD_SIZE > 1) and return this rank's device.

    ``device`` is "auto", "cpu", "cuda" or "cuda:N"; under torchrun each rank takes cuda:LOCAL_RANK.
    The backend is NCCL on CUDA and gloo on CPU.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device} requested but CUDA is not available")
    if device == "cuda":
        device = f"cuda:{local_rank if world_size > 1 else 0}"
    if world_size > 1 and not is_distributed():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(backend=backend, timeout=timedelta(minutes=30))
    return torch.device(device)


def reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of a tensor over all ranks (identity in a single process)."""
    if not is_distributed():
        return value
    value = value.detach().clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value / get_world_size()


def all_gather_objects(obj):
    """List of ``obj`` from every rank (a one-element list in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    if is_distributed():
        dist.destroy_process_group()
