"""FreeLB (Zhu et al., ICLR 2020): adversarial perturbations of the input embeddings, `noise=freelb`.

Each training batch starts from NEFTune's noise as the perturbation, delta_0 = U(-1, 1) * adv_init_mag /
sqrt(L_i * d) on real tokens (FreeLB's own initialisation, which NEFTune later adopted), then takes K =
`adv_steps` forward and backward passes: the k-th on the embeddings plus delta_{k-1}, with the loss divided by K,
so that the parameters' gradients are the mean over the K passes (FreeLB's "free" accumulation); between passes
delta climbs the loss, delta_k = delta_{k-1} + adv_lr * g / ||g|| with g its gradient and the norm per example
over its tokens and dimensions, and is scaled back into the ball ||delta|| <= adv_max_norm when that is > 0.
The optimizer then steps once. With K = 1 it is NEFTune's uniform noise at alpha = adv_init_mag.

The passes go through the Trainer's own `training_step` (`passes.PassesTrainer`), so gradient accumulation, mixed
precision, LoRA, DDP (one gradient all-reduce per batch: the first K - 1 passes run under `no_sync`) and the
non-finite guard (a hook on the model's output) act as on any step; the perturbation is a forward hook on the
embedding, and its random stream is the noise's, saved in checkpoints.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ...config.checks import check
from ...core.errors import ConfigError
from .embedding import EmbeddingConfig, EmbeddingNoise
from .kind import Param


@dataclass
class FreeLBConfig(EmbeddingConfig):
    adv_steps: int = 2  # K: forward and backward passes per batch
    adv_lr: float = 0.1  # the ascent's step
    adv_init_mag: float = 5.0  # delta_0's alpha, NEFTune's form
    adv_max_norm: float = 0.0  # the ball delta stays in; 0: none

    def validate(self, key: str) -> None:
        super().validate(key)
        check(self.adv_steps >= 1, f"{key}.adv_steps", self.adv_steps, "an integer >= 1")
        check(self.adv_lr > 0, f"{key}.adv_lr", self.adv_lr, "> 0")
        check(self.adv_init_mag >= 0, f"{key}.adv_init_mag", self.adv_init_mag, ">= 0")
        check(self.adv_max_norm >= 0, f"{key}.adv_max_norm", self.adv_max_norm, ">= 0 (0: no bound)")

    def validate_run(self, cfg) -> None:
        if cfg.data.packing:
            raise ConfigError("noise.kind=freelb normalises its ascent per example, and data.packing=true puts "
                              "several examples in one row: use data.packing=false")


class FreeLB(EmbeddingNoise):
    """The perturbation: drawn at the first pass of a batch, then moved by `ascend()` until `reset()`."""

    name = "freelb"
    Config = FreeLBConfig
    space = (Param("adv_init_mag", 1.0, 20.0, log=True), Param("adv_steps", 1, 3, integer=True),
             Param("adv_lr", 0.01, 0.5, log=True))

    def __init__(self, model: torch.nn.Module, cfg: Optional[FreeLBConfig] = None, **kwargs):
        super().__init__(model, cfg, **kwargs)
        self.adv_steps, self.adv_lr, self.adv_max_norm = self.cfg.adv_steps, self.cfg.adv_lr, self.cfg.adv_max_norm
        self.passes = self.adv_steps
        self.delta: Optional[torch.Tensor] = None

    @property
    def driven(self) -> bool:
        return True  # even at K = 1: its perturbation is reset after each batch

    def start_alpha(self) -> float:
        return self.cfg.adv_init_mag

    def perturb(self, output: torch.Tensor) -> torch.Tensor:
        if self.delta is None:
            self.delta = self.draw(output)
        self.delta.requires_grad_(True)
        return self.delta

    @torch.no_grad()
    def ascend(self) -> None:
        """delta += adv_lr * g / ||g|| per example, then back into the adv_max_norm ball; a leaf again."""
        grad = self.delta.grad
        if grad is None:  # no pass used it (a batch without an embedding forward): nothing to climb
            return
        batch = grad.shape[0]
        norm = torch.linalg.vector_norm(grad.reshape(batch, -1), dim=1).clamp(min=1e-8)
        delta = self.delta + self.adv_lr * grad / norm.view(-1, 1, 1)
        if self.adv_max_norm > 0:
            size = torch.linalg.vector_norm(delta.reshape(batch, -1), dim=1)
            delta = delta * torch.where(size > self.adv_max_norm, self.adv_max_norm / size, 1.0).view(-1, 1, 1)
        self.delta = delta.detach()

    def next_pass(self) -> None:
        self.ascend()

    def reset(self) -> None:
        self.delta = None
