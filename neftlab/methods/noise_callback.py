"""The noise during training: alpha is this callback's to move, by a schedule before each step or by the dynamic
rule every `noise.adjust_interval` steps, and to save and restore; it reports alpha and the noise's magnitude at
each log."""

from __future__ import annotations

import logging
import math
from typing import Callable

from transformers import TrainerCallback

from ..config import NoiseConfig
from ..core.dist import local_rows
from .dynamic import DynamicAlpha, stability
from .noise import EMBEDDING_KINDS, Noise

log = logging.getLogger(__name__)


def schedule_factor(schedule: str, step: int, total: int, warmup_ratio: float = 0.1) -> float:
    """alpha's share at optimizer step `step` of `total`: constant 1; linear 1 - t; cosine (1 + cos(pi t)) / 2, with
    t = step / total (the steps done before this one), both reaching 0 at the end of training; warmup
    t / warmup_ratio up to 1, then 1."""
    t = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "warmup":
        return min(1.0, t / warmup_ratio)
    return 1.0


class NoiseCallback(TrainerCallback):
    """Sets a schedule's alpha before each step and, for dynamic noise, adjusts alpha every adjust_interval steps;
    reports alpha and magnitude at each log. Its state (alpha, the dynamic threshold) goes into checkpoints."""

    state_key = "noise_control"

    def __init__(self, noise: Noise, cfg: NoiseConfig, log_event: Callable[[int, dict], None]):
        self.noise, self.log_event, self.cfg = noise, log_event, cfg
        self.dynamic = DynamicAlpha(cfg) if cfg.kind == "dynamic" else None

    def metrics(self) -> dict:
        if self.noise.kind not in EMBEDDING_KINDS:
            return {}
        out = {"noise/alpha": self.noise.alpha}
        magnitude = self.noise.mean_magnitude  # the magnitude's one host sync, at logging
        if magnitude is not None:
            out["noise/mean_magnitude"] = magnitude
            out["noise/padded_to_real_ratio"] = self.noise.padded_ratio
        return out

    def state_dict(self) -> dict:
        return {"alpha": self.noise.alpha, "dynamic": self.dynamic.state_dict() if self.dynamic else None}

    def load_state_dict(self, state: dict) -> None:
        self.noise.alpha = state["alpha"]
        if self.dynamic is not None and state.get("dynamic") is not None:
            self.dynamic.load_state_dict(state["dynamic"])

    def on_train_begin(self, args, state, control, **kwargs):
        if self.dynamic is None:
            return
        local_rows(self.noise.embedding.weight)  # refuses a sharded layout it cannot read before the first step
        if self.dynamic.threshold is None:
            self.dynamic.threshold = stability(self.noise.embedding.weight)
            log.info("noise.stability_threshold=auto: %.6f, the statistic at the start of training",
                     self.dynamic.threshold)

    def on_step_begin(self, args, state, control, **kwargs):
        """A schedule's alpha for the step about to run, from the step alone: a resumed run continues it exactly."""
        if self.cfg.schedule != "constant":
            self.noise.alpha = self.cfg.alpha * schedule_factor(self.cfg.schedule, state.global_step, state.max_steps,
                                                                self.cfg.warmup_ratio)

    def on_step_end(self, args, state, control, **kwargs):
        if self.dynamic is not None and state.global_step % self.cfg.adjust_interval == 0:
            self.noise.alpha, event = self.dynamic.next_alpha(self.noise.alpha, stability(self.noise.embedding.weight))
            self.log_event(state.global_step, event)
