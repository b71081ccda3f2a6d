"""Which process this is among a data-parallel run's, and whether every process succeeded.

The bottom of the distributed helpers: the checkpoint writer (rank 0 writes, every rank learns whether it
failed) and :mod:`capaboost.distributed` both stand on it. Without an initialised process group every
function answers as the only process.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def rank_and_world(group: Optional[Any] = None) -> tuple[int, int]:
    """(rank, world size) in ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def collective_device(group: Optional[Any] = None) -> torch.device:
    """Where a tensor must live for a collective on ``group``: the current GPU under NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ok(ok: bool, group: Optional[Any] = None) -> bool:
    """True iff ``ok`` on every rank (also serves as the barrier after a rank-0 write)."""
    if rank_and_world(group)[1] == 1:
        return ok
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag.item()) == 0
