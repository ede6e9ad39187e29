"""`noise=gaussian`: NEFTune's ablation, N(0, sigma^2) with sigma = alpha / sqrt(L_i * d), or an absolute
`noise.std`."""

from dataclasses import dataclass
from typing import Optional

import torch

from ...config.checks import check
from .embedding import DrawnNoise, ScheduledConfig


@dataclass
class GaussianConfig(ScheduledConfig):
    std: Optional[float] = None  # an absolute std instead of alpha / sqrt(L_i * d)

    def validate(self, key: str) -> None:
        super().validate(key)
        check(self.std is None or self.std > 0, f"{key}.std", self.std, "null or > 0")
        check(self.std is None or self.schedule == "constant", f"{key}.schedule", self.schedule,
              f"constant with an absolute {key}.std (a schedule moves alpha)")


class Gaussian(DrawnNoise):
    name = "gaussian"
    Config = GaussianConfig

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        return torch.randn(shape, generator=generator, dtype=torch.float32, device=device)

    def scale(self, lengths: torch.Tensor, dim: int) -> torch.Tensor:
        return super().scale(lengths, dim) if self.cfg.std is None else torch.full_like(lengths, self.cfg.std)
