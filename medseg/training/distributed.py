"""Distributed data parallel set-up: gloo on CPU, NCCL on GPU, rank 0 logs and saves.

Works under ``torchrun --nproc_per_node=N -m medseg train ...`` (which sets RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and under ``medseg train --nproc N``, which
spawns the processes itself on the loopback interface.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_from_env(device_type: str) -> DistContext:
    """Join the process group described by torchrun's environment (or run alone)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    ctx = DistContext(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=ctx.rank, world_size=world)
    return ctx


def shutdown(ctx: DistContext) -> None:
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_flag(ctx: DistContext, flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (so all stop at the same epoch)."""
    if not ctx.enabled:
        return flag
    t = torch.tensor([1 if flag else 0])
    dist.broadcast(t, src=0)
    return bool(t.item())


def weight_fingerprints(ctx: DistContext, module: torch.nn.Module) -> list[list[float]]:
    """Per-rank fingerprints of the parameters (sum and sum of squares of each, float64).

    Buffers are left out: DDP broadcasts rank 0's batch-norm statistics before every
    forward, so after the last step each rank holds its own; the saved model is rank 0's.
    """
    state = [p.detach() for p in module.parameters()]
    mine = torch.tensor(
        [float(t.double().sum()) for t in state] + [float(t.double().pow(2).sum()) for t in state],
        dtype=torch.float64,
    )
    if not ctx.enabled:
        return [mine.tolist()]
    gathered = [torch.zeros_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    return [g.tolist() for g in gathered]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    # This process's own setting: N processes sharing the cores must not each take them all.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    fn(*args)


def spawn(fn: Callable[..., Any], nproc: int, *args: Any) -> None:
    """Run ``fn(*args)`` in ``nproc`` processes forming one process group on 127.0.0.1."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    torch.multiprocessing.spawn(_worker, args=(nproc, fn, args), nprocs=nproc, join=True)
