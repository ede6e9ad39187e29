"""What a config's `noise` and `pruning` groups ask for, built in one place: the noise hook on the embeddings, the
callbacks that steer it and prune, what the Trainer needs to be built with (the passes of FreeLB and of antithetic
noise), and which of them hold state a checkpoint must keep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..config import NoiseConfig, PruningConfig
from .freelb import FreeLB
from .noise import Noise
from .noise_callback import NoiseCallback
from .noisytune import noisytune
from .pruner import PruningCallback


@dataclass
class Methods:
    hook: Noise
    noise_callback: NoiseCallback
    pruner: Optional[PruningCallback]

    @property
    def callbacks(self) -> list:
        return [self.noise_callback] + ([self.pruner] if self.pruner is not None else [])

    @property
    def stateful(self) -> list:
        """The components that save and restore their own state in a checkpoint (`state_dict`)."""
        return [self.hook, *self.callbacks]

    @property
    def trainer_kwargs(self) -> dict:
        """What PassesTrainer is built with: the hook when it drives passes (FreeLB's, even at K = 1: its
        perturbation is reset after each batch; antithetic noise's two)."""
        return {"passes": self.hook if isinstance(self.hook, FreeLB) or self.hook.passes > 1 else None}


def hook_for(model: torch.nn.Module, cfg: NoiseConfig, seed: int) -> Noise:
    """The hook the `noise` group asks for, with its own random stream from `seed` (FreeLB's delta_0 is NEFTune's
    noise at alpha = adv_init_mag)."""
    if cfg.kind == "freelb":
        return FreeLB(model, alpha=cfg.adv_init_mag, seed=seed, length_mode=cfg.length_mode,
                      adv_steps=cfg.adv_steps, adv_lr=cfg.adv_lr, adv_max_norm=cfg.adv_max_norm)
    return Noise(model, cfg.kind, alpha=cfg.alpha, length_mode=cfg.length_mode, std=cfg.std, seed=seed,
                 tokens=cfg.tokens, antithetic=cfg.antithetic)


def build(model: torch.nn.Module, noise: NoiseConfig, pruning: PruningConfig, seed: int, rank: int, fresh: bool,
          log_event: Callable[[int, dict], None]) -> Methods:
    """The methods of a run. `fresh`: a run that starts from its pretrained weights (not a resumed one, whose
    checkpoint holds NoisyTune's perturbed weights already). Each rank draws its own noise; NoisyTune's
    perturbation is the same on every rank."""
    if noise.kind == "noisytune" and fresh:
        log_event(0, {"noise/noisytune_tensors": noisytune(model, noise.intensity, seed)})
    hook = hook_for(model, noise, seed=seed + 1_000_003 * rank)
    pruner = PruningCallback(model, pruning, log_event) if pruning.method != "off" else None
    return Methods(hook, NoiseCallback(hook, noise, log_event), pruner)
