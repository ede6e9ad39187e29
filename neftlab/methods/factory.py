"""What a config's `noise` and `pruning` groups ask for, built in one place: the noise kind (its hooks on the model
and its callback), the pruning callback, what the Trainer needs to be built with (the kind, for its passes
and its loss), and which of them hold state a checkpoint must keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import PruningConfig
from ..config.noise import NoiseConfig, kind_class
from .noise import NoiseKind
from .noise.kind import rank_seed
from .pruner import PruningCallback


@dataclass
class Methods:
    noise: NoiseKind
    pruner: Optional[PruningCallback]

    @property
    def callbacks(self) -> list:
        return [self.noise] + ([self.pruner] if self.pruner is not None else [])

    @property
    def stateful(self) -> list:
        """The components that save and restore their own state in a checkpoint (`state_dict`)."""
        return self.callbacks

    @property
    def trainer_kwargs(self) -> dict:
        """What PassesTrainer is built with: the kind, which computes each training loss and drives its passes."""
        return {"noise": self.noise}


def build(model: torch.nn.Module, noise: NoiseConfig, pruning: PruningConfig, seed: int, rank: int, fresh: bool,
          log_event: Callable[[int, dict], None]) -> Methods:
    """The methods of a run. Each rank draws its own noise (its own stream, from `seed` and `rank`). `fresh`: a run
    that starts from its pretrained weights (not a resumed one, whose checkpoint holds NoisyTune's perturbed
    weights already), which the kind prepares with the run's seed, the same on every rank."""
    kind = kind_class(noise)(model, noise, seed=rank_seed(seed, rank), log_event=log_event)
    if fresh:
        kind.prepare(model, seed)
    pruner = PruningCallback(model, pruning, log_event) if pruning.kind != "off" else None
    return Methods(kind, pruner)
