"""Magnitude pruning for the `pruning` group (Sparse-NEFT): l1 entries or l2 token rows, kept zero during training.

The threshold is found by a radix select over the bit patterns of |w| (for IEEE floats the
integer order of the sign-cleared bits is the order of |w|), counted in chunks with
`bincount`. Unlike `torch.quantile` it works at any size (quantile refuses more than 2^24
elements) and in bf16/fp16, it needs no matrix-sized temporary besides the boolean mask,
and the number of pruned entries is exact: ties at the threshold go by index.

Bring-your-own-loop use: ``mask = neftlab.methods.pruning.prune_(weight, 0.3, "l1")``, then
``weight.data.mul_(mask)`` after each optimizer step keeps the pruned entries at zero. During training
`pruner.PruningCallback` does both.
"""

from __future__ import annotations

import logging
import math
from typing import Iterator

import torch

from ..config import PruningConfig
from ..core.dist import all_gather, all_reduce, group_rank, local_rows

log = logging.getLogger(__name__)

_CHUNK = 1 << 22
_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _keys(flat: torch.Tensor) -> torch.Tensor:
    """Non-negative integers ordered as |flat| is: the float's bits with the sign bit cleared."""
    bits = flat.element_size() * 8 - 1
    return flat.view(_INT[flat.element_size()]).long() & ((1 << bits) - 1)


def _chunks(shards: list[torch.Tensor]) -> Iterator[torch.Tensor]:
    for w in shards:
        yield from w.reshape(-1).split(_CHUNK)


def _kth_smallest_key(shards: list[torch.Tensor], k: int, group) -> tuple[int, int]:
    """(t, n_below): the k-th smallest key over all weights (k >= 1) and how many keys are < t.

    Each rank counts its shards; the histograms are summed over the group, so all ranks take the same path.
    """
    bits = shards[0].element_size() * 8 - 1
    prefix, known, below = 0, 0, 0
    while known < bits:
        width = min(16, bits - known)
        shift = bits - known - width
        hist = torch.zeros(1 << width, dtype=torch.long, device=shards[0].device)
        for chunk in _chunks(shards):
            keys = _keys(chunk)
            if known:
                keys = keys[(keys >> (shift + width)) == prefix]
            hist += torch.bincount((keys >> shift) & ((1 << width) - 1), minlength=1 << width)
        cum = all_reduce(hist, group).cumsum(0)
        b = int(torch.searchsorted(cum, k - below))
        below += int(cum[b - 1]) if b else 0
        prefix, known = (prefix << width) | b, known + width
    return prefix, below


@torch.no_grad()
def _prune_l1(weights: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    shards, group = zip(*map(local_rows, weights))
    group = group[0]
    k = math.floor(ratio * sum(w.numel() for w in weights))
    masks = [torch.ones(w.shape, dtype=torch.bool, device=w.device) for w in shards]
    if k == 0:
        return masks
    t, below = _kth_smallest_key(list(shards), k, group)
    ties = k - below  # entries equal to the threshold to prune, lowest (global) index first
    for w, mask in zip(shards, masks):
        if group is None:
            mine = ties
        else:  # this tensor's ties on lower ranks come first in global order
            counts = all_gather(sum(int((_keys(c) == t).sum()) for c in _chunks([w])), group)
            rank = group_rank(group)
            mine = min(max(ties - sum(counts[:rank]), 0), counts[rank])
            ties = max(ties - sum(counts), 0)
        for chunk, keep in zip(w.view(-1).split(_CHUNK), mask.view(-1).split(_CHUNK)):
            keys = _keys(chunk)
            torch.gt(keys, t, out=keep)
            at = (keys == t).nonzero().flatten()  # prune the first `mine` of these, keep the rest
            keep[at[mine:]] = True
            pruned = min(mine, at.numel())
            mine -= pruned
            if group is None:
                ties -= pruned
            chunk.masked_fill_(~keep, 0)
    return masks


@torch.no_grad()
def _prune_l2(weights: list[torch.Tensor], ratio: float) -> list[torch.Tensor]:
    shards, group = zip(*map(local_rows, weights))
    group, rank = group[0], group_rank(group[0])
    local_norms = [torch.linalg.vector_norm(w, dim=1, dtype=torch.promote_types(w.dtype, torch.float32)).cpu()
                   for w in shards]  # on the CPU, as all_gather needs, and sorted there
    per_rank = all_gather(local_norms, group)  # [rank][tensor] -> global order: tensor by tensor, rank by rank
    norms = torch.cat([per_rank[r][i] for i in range(len(shards)) for r in range(len(per_rank))])
    k = math.floor(ratio * norms.numel())
    keep = torch.ones(norms.numel(), dtype=torch.bool)
    keep[torch.argsort(norms, stable=True)[:k]] = False  # stable: ties go by row index
    masks, start = [], 0
    for i, w in enumerate(shards):
        offset = start + sum(per_rank[r][i].numel() for r in range(rank))
        rows = keep[offset:offset + w.shape[0]].to(w.device)
        start += sum(per_rank[r][i].numel() for r in range(len(per_rank)))
        w[~rows] = 0
        masks.append(rows[:, None].expand(w.shape))
    return masks


def prune_tensors_(weights: list[torch.Tensor], ratio: float, kind: str = "l1") -> list[torch.Tensor]:
    """Zero the `ratio` smallest of `weights` taken together, in place; returns their masks of kept entries.

    l1: exactly floor(ratio * entries) entries by |w|; l2: exactly floor(ratio * rows) whole rows by L2 norm.
    Row-sharded (FSDP2) weights are pruned against the global threshold; each rank gets the masks of its rows.
    """
    if not 0 <= ratio < 1:
        raise ValueError(f"pruning ratio {ratio} is not a fraction in [0, 1)")
    if kind == "l1":
        if len({w.dtype for w in weights}) > 1:
            raise ValueError("l1 pruning over several tensors needs them in one dtype")
        return _prune_l1(weights, ratio)
    if kind == "l2":
        if any(w.dim() != 2 for w in weights):
            raise ValueError("l2 pruning removes rows and needs 2-D weights")
        return _prune_l2(weights, ratio)
    raise ValueError(f"unknown pruning kind {kind!r}: use l1 or l2")


def prune_(weight: torch.Tensor, ratio: float, kind: str = "l1") -> torch.Tensor:
    """Prune one weight in place (see `prune_tensors_`); returns the boolean mask of kept entries."""
    return prune_tensors_([weight], ratio, kind)[0]


def ratio_at(cfg: PruningConfig, step: int) -> float:
    """The target ratio at `step`: constant, or Zhu & Gupta's cubic ramp from initial_ratio to ratio."""
    if cfg.schedule == "constant":
        return cfg.ratio
    progress = min(step / cfg.ramp_steps, 1.0)
    return cfg.ratio + (cfg.initial_ratio - cfg.ratio) * (1 - progress) ** 3


def targets(model: torch.nn.Module, scope: str) -> list[torch.Tensor]:
    """The weights in scope: the input embedding, or every Linear weight but the output head and LoRA's own."""
    if scope == "embedding":
        return [model.get_input_embeddings().weight]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    seen, out = set(), []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not head and "lora_" not in name:
            if id(module.weight) not in seen:  # a weight shared by two modules, once; not data_ptr(): a DTensor's is 0
                seen.add(id(module.weight))
                out.append(module.weight)
    return out


def output_tied(model: torch.nn.Module) -> bool:
    """Whether the output layer is the input embedding's weight: the same parameter (under FSDP2 too, where every
    DTensor's data_ptr() is 0)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return head is not None and head.weight is model.get_input_embeddings().weight
