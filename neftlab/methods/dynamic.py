"""Dynamic Embedding Noise: alpha steered by a statistic of the embedding matrix, mean over tokens of
std(token vector) / L2 norm(token vector). Below the threshold alpha rises by alpha_step, else it falls, within
[alpha_min, alpha_max]. `DynamicAlpha` is the rule and owns the threshold; `NoiseCallback` applies it."""

from __future__ import annotations

from typing import Optional

import torch

from ..config import NoiseConfig
from ..core.dist import all_reduce, local_rows


@torch.no_grad()
def stability(weight: torch.Tensor, chunk_rows: int = 8192) -> float:
    """mean over tokens of std(token vector) / L2 norm(token vector), the design's statistic.

    All-zero rows (pruned tokens) have no direction and are left out. Computed in row chunks so a
    7B-size embedding needs no matrix-sized temporary; over a row-sharded (FSDP2) weight each rank sums
    its rows and the sums are all-reduced, so every rank gets the whole matrix's value.
    """
    rows_here, group = local_rows(weight)
    sums = torch.zeros(2, dtype=torch.float64, device=rows_here.device)  # (total, count), read once at the end
    for rows in rows_here.split(chunk_rows):
        rows = rows.float()
        norm = torch.linalg.vector_norm(rows, dim=1)
        keep = norm > 0
        ratio = (rows.std(dim=1) / norm).where(keep, 0)  # not ratio[keep]: boolean indexing syncs with the host
        sums += torch.stack([ratio.sum().double(), keep.sum().double()])
    total, count = all_reduce(sums, group).tolist()
    return total / count if count else float("nan")


class DynamicAlpha:
    """The Dynamic Embedding Noise rule. `threshold` is its state: given, or with "auto" the statistic at the start
    of training."""

    state_key = "dynamic_alpha"

    def __init__(self, cfg: NoiseConfig):
        self.cfg = cfg
        self.threshold: Optional[float] = None if cfg.stability_threshold == "auto" else float(cfg.stability_threshold)

    def next_alpha(self, alpha: float, value: float) -> tuple[float, dict]:
        """(the alpha after this adjustment, the event that says why)."""
        if self.threshold is None:  # "auto": the statistic at the start of training is the reference
            self.threshold = value
        if value < self.threshold:
            after = min(self.cfg.alpha_max, alpha + self.cfg.alpha_step)
        else:
            after = max(self.cfg.alpha_min, alpha - self.cfg.alpha_step)
        direction = (after > alpha) - (after < alpha)
        return after, {"noise/stability": value, "noise/threshold": self.threshold, "noise/direction": direction,
                       "noise/alpha": after}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"]
