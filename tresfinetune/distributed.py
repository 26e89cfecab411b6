"""Process-group setup for runs launched with torchrun; a plain `tresfinetune train` is a world of one.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; we read them and never spawn processes ourselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from tresfinetune.errors import UserError


@dataclass(frozen=True)
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


_world_started = False


def error_prefix(shared: bool) -> str | None:
    """How a rank labels an error it prints, or None to stay quiet.

    Errors before the process group exists (recipe, paths) and errors marked shared are the same on every rank:
    rank 0 alone prints them. Anything else belongs to one rank and says which.
    """
    if not launched_by_torchrun():
        return ""
    if shared or not _world_started:
        return "" if os.environ["RANK"] == "0" else None
    return f"rank {os.environ['RANK']}: "


def world_from_environment() -> World:
    """This process's place in the run torchrun describes; a world of one otherwise."""
    if not launched_by_torchrun() or int(os.environ["WORLD_SIZE"]) == 1:
        return World()
    return World(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))


def process_device(requested: torch.device, world: World, cuda_devices: int) -> torch.device:
    """The device this process runs on: under torchrun on CUDA, the process of local rank r takes cuda:r."""
    if requested.type != "cuda" or not world.distributed:
        return requested
    if requested.index is not None:
        raise UserError(f"device '{requested}' would put every torchrun process on the same GPU; use device: cuda "
                        "(or auto), and each process takes the GPU of its LOCAL_RANK")
    if world.local_rank >= cuda_devices:
        raise UserError(f"this process has LOCAL_RANK {world.local_rank} but PyTorch sees {cuda_devices} GPU(s) on "
                        f"this machine; start torchrun with --nproc-per-node {cuda_devices} or fewer")
    return torch.device("cuda", world.local_rank)


def init_world(world: World, device: torch.device) -> None:
    """Join the process group of a distributed world (NCCL on CUDA, bound to `device`; gloo on CPU)."""
    if not world.distributed:
        return
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    global _world_started
    _world_started = True


def close_world(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: list[float], world: World, device: torch.device) -> list[float]:
    if not world.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def gather_arrays(array: np.ndarray, world: World) -> np.ndarray:
    """Concatenate each rank's rows in rank order (validation shards are contiguous, so order is kept)."""
    if not world.distributed:
        return array
    parts: list = [None] * world.size
    dist.all_gather_object(parts, array)
    return np.concatenate(parts)


def any_rank_each(flags: list[bool], world: World, device: torch.device) -> list[bool]:
    """For each flag, true on every rank when it is true on at least one (so all ranks stop together); one
    collective for all of them."""
    if not world.distributed:
        return list(flags)
    tensor = torch.tensor([1.0 if flag else 0.0 for flag in flags], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return [bool(value) for value in tensor.tolist()]


def broadcast_object(obj: object, world: World) -> object:
    """Rank 0's value on every rank (e.g. the run folder name, which holds a timestamp)."""
    if not world.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()
