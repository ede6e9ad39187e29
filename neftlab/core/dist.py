"""Devices and collectives: the rows a process holds of a weight that FSDP2 shards, and the collectives that turn
per-shard sums into whole-matrix answers, so statistics and thresholds are the same on every rank as in one process
(which process this is: `rank`). Every collective in neftlab goes through here, on the device its
backend needs. Without torch.distributed everything here is the identity."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from .errors import ConfigError


class UnsupportedLayoutError(ConfigError):
    """A weight sharded in a layout neftlab cannot read in place; raised when training begins."""


def local_rows(weight: torch.Tensor, copy_ok: bool = False) -> tuple[torch.Tensor, Optional[Any]]:
    """(the rows this process holds, the process group over which the rest is spread, or None).

    A DTensor sharded by rows (FSDP2's layout) gives its local shard; a plain tensor is all there is. Any other
    DTensor layout is refused, since pruning a gathered copy would prune nothing; callers that only read it
    (counting) pass `copy_ok` and get the whole tensor gathered.
    """
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(weight, DTensor):
        return weight.detach(), None
    if tuple(weight.placements) != (Shard(0),):
        if copy_ok:
            return weight.detach().full_tensor(), None
        raise UnsupportedLayoutError(
            f"a weight of shape {tuple(weight.shape)} is sharded with DTensor placements "
            f"{tuple(weight.placements)}: neftlab supports FSDP2's row sharding (Shard(dim=0),) only "
            f"(trainer=fsdp over one mesh dimension), e.g. no hybrid sharding (HSDP) or tensor parallelism")
    return weight.to_local().detach(), weight.device_mesh.get_group()


def collective_device(group) -> torch.device:
    """The device a tensor must be on to enter a collective of `group`: NCCL reduces CUDA tensors only (on this
    rank's current device, which the Trainer sets), gloo CPU ones. A group with both (accelerate starts
    `cuda:nccl,cpu:gloo` for FULL_STATE_DICT or CPU offload) takes CUDA tensors on NCCL."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """`tensor` reduced over `group`, on the device it came from, wherever that is: it is reduced on
    `collective_device(group)`. Use the result (`tensor` itself is overwritten only when already there).
    `group` None: the identity; `torch.distributed.group.WORLD`: all ranks."""
    if group is None:
        return tensor
    moved = tensor.to(collective_device(group))
    dist.all_reduce(moved, op=op, group=group)
    return moved.to(tensor.device)


def all_sum(values: list[float], group) -> list[float]:
    if group is None:
        return values
    return all_reduce(torch.tensor(values, dtype=torch.float64, device=collective_device(group)), group).tolist()


def all_gather(value: Any, group) -> list[Any]:
    """Every rank's `value`, in rank order (small objects: counts, per-row norms). Tensors in it must be on the
    CPU: under NCCL the pickled bytes travel on the current CUDA device, but a pickled CUDA tensor would be
    unpickled onto the sender's device."""
    if group is None:
        return [value]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, value, group=group)
    return out


def reshard(model: torch.nn.Module) -> None:
    """Drop the unsharded copies FSDP2 keeps after a forward (a unit with reshard_after_forward=False, as accelerate
    wraps the embedding and output layer): an edit of the shards then reaches the next forward. Nothing without
    FSDP2."""
    from torch.distributed.fsdp import FSDPModule
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def agree_on_first(value: Any, group) -> Any:
    """The first rank's non-None `value` among all ranks of `group` (or `value` alone without one): what one rank
    found (a NaN in its shard) every rank then acts on alike."""
    return next((v for v in all_gather(value, group) if v is not None), None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a timer read before it times the launch, not the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def group_rank(group) -> int:
    return 0 if group is None else dist.get_rank(group)


def all_max(values: list[float], distributed: bool) -> list[float]:
    """Element-wise max over all ranks: a flag (a signal, a NaN loss) that one rank raised reaches every rank."""
    if not distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    return all_reduce(t, dist.group.WORLD, op=dist.ReduceOp.MAX).tolist()


def barrier() -> None:
    dist.barrier()
