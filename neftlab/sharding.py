"""The rows a process holds of a weight that FSDP2 (or any DTensor layout) shards, and the collectives that
turn per-shard sums into whole-matrix answers, so statistics and thresholds are the same on every rank as in
one process. Without torch.distributed everything here is the identity."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist


def local_rows(weight: torch.Tensor) -> tuple[torch.Tensor, Optional[Any]]:
    """(the rows this process holds, the process group over which the rest is spread, or None).

    A DTensor sharded by rows (FSDP2's layout) gives its local shard; any other DTensor layout is
    gathered whole; a plain tensor is all there is.
    """
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(weight, DTensor):
        return weight.detach(), None
    if tuple(weight.placements) == (Shard(0),):
        return weight.to_local().detach(), weight.device_mesh.get_group()
    return weight.detach().full_tensor(), None


def all_sum(values: list[float], group) -> list[float]:
    if group is None:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()


def all_gather(value: Any, group) -> list[Any]:
    """Every rank's `value`, in rank order (small objects: counts, per-row norms)."""
    if group is None:
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)
