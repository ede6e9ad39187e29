"""How many parameters a model has, and how many are non-zero (pruning's reduction), sharded or not."""

from __future__ import annotations

import torch

from ..core import measures
from ..core.dist import all_sum, local_rows


def parameter_counts(model: torch.nn.Module) -> dict:
    """Total and non-zero parameters, counting a tied (shared) tensor once; sharded ones summed over ranks."""
    seen, total, nonzero, sharded, group = set(), 0, 0, 0, None
    for p in model.parameters():
        local, p_group = local_rows(p, copy_ok=True)  # an end-of-run count must not fail on any layout
        if local.data_ptr() in seen:
            continue
        seen.add(local.data_ptr())
        total += p.numel()
        if p_group is None:
            nonzero += int(torch.count_nonzero(local))
        else:
            sharded += int(torch.count_nonzero(local))
            group = p_group
    nonzero += int(all_sum([sharded], group)[0])
    return {measures.TOTAL_PARAMS.key: total, measures.NONZERO_PARAMS.key: nonzero,
            measures.PARAM_REDUCTION.key: 1 - nonzero / total}
