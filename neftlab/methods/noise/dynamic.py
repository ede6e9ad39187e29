"""`noise=dynamic`, Dynamic Embedding Noise (the design's seed 000): NEFTune's uniform noise whose alpha is steered
by a statistic of the embedding matrix, the mean over tokens of std(token vector) / L2 norm(token vector). Every
`adjust_interval` steps, below the threshold alpha rises by alpha_step, else it falls, within [alpha_min,
alpha_max]. `DynamicAlpha` is the rule and owns the threshold; the kind applies it after each step."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional

import torch

from ...config.checks import check
from ...core.dist import all_reduce, local_rows
from ...core.measures import Measure
from .embedding import ALPHA, LIVE_ALPHA, DrawnConfig, DrawnNoise
from .kind import Param

log = logging.getLogger(__name__)

# What the rule logs at each adjustment, besides alpha.
STABILITY = Measure("noise/stability", "noise stability", None, "{:.4f}", "noise", column=False, curve=True)
THRESHOLD = Measure("noise/threshold", "noise threshold", None, "{:.4f}", "noise", column=False, curve=True)
DIRECTION = Measure("noise/direction", "noise alpha's direction", None, "{}", "noise", column=False)


@dataclass
class DynamicConfig(DrawnConfig):
    alpha_min: float = 1.0
    alpha_max: float = 10.0
    alpha_step: float = 0.1
    adjust_interval: int = 100
    stability_threshold: Any = 0.1  # a number, or "auto": the statistic's value at the start of training

    def validate(self, key: str) -> None:
        super().validate(key)
        check(self.alpha_min >= 0, f"{key}.alpha_min", self.alpha_min, ">= 0")
        check(self.alpha_min <= self.alpha_max, f"{key}.alpha_min", self.alpha_min,
              f"<= {key}.alpha_max ({self.alpha_max})")
        check(self.alpha_min <= self.alpha <= self.alpha_max, f"{key}.alpha", self.alpha,
              f"within [{key}.alpha_min, {key}.alpha_max] = [{self.alpha_min}, {self.alpha_max}]")
        check(self.alpha_step > 0, f"{key}.alpha_step", self.alpha_step, "> 0")
        check(self.adjust_interval >= 1, f"{key}.adjust_interval", self.adjust_interval, "an integer >= 1")
        t = self.stability_threshold
        check(t == "auto" or (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0),
              f"{key}.stability_threshold", t, 'a number > 0 or "auto"')


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

    def __init__(self, cfg: DynamicConfig):
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
        return after, {STABILITY.key: value, THRESHOLD.key: self.threshold, DIRECTION.key: direction,
                       LIVE_ALPHA.key: after}

    def state_dict(self) -> dict:
        return {"threshold": self.threshold}

    def load_state_dict(self, state: dict) -> None:
        self.threshold = state["threshold"]


class Dynamic(DrawnNoise):
    name = "dynamic"
    Config = DynamicConfig
    # alpha starts anywhere in NEFTune's searched range; alpha_max fixed at its top, so every start is allowed
    space = (ALPHA, Param("alpha_max", choices=(ALPHA.high,)))
    logs = DrawnNoise.logs + (STABILITY, THRESHOLD, DIRECTION)

    def __init__(self, model: torch.nn.Module, cfg: Optional[DynamicConfig] = None, **kwargs):
        super().__init__(model, cfg, **kwargs)
        self.rule = DynamicAlpha(self.cfg)

    def on_step_begin(self, args, state, control, **kwargs):
        """No schedule: the rule moves alpha."""

    def on_train_begin(self, args, state, control, **kwargs):
        local_rows(self.embedding.weight)  # refuses a sharded layout it cannot read before the first step
        if self.rule.threshold is None:
            self.rule.threshold = stability(self.embedding.weight)
            log.info("noise.stability_threshold=auto: %.6f, the statistic at the start of training",
                     self.rule.threshold)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.cfg.adjust_interval == 0:
            self.alpha, event = self.rule.next_alpha(self.alpha, stability(self.embedding.weight))
            self.log_event(state.global_step, event)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "dynamic": self.rule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if state.get("dynamic") is not None:
            self.rule.load_state_dict(state["dynamic"])
