"""`noise=laplace`: heavy-tailed noise at NEFTune's scale, Laplace(0, 1) * alpha / sqrt(L_i * d) on each sequence's
real tokens (variance 2 alpha^2 / (L_i d), against uniform's alpha^2 / (3 L_i d)); drawn by the inverse CDF from one
uniform draw, so it follows the kind's own random stream."""

from typing import Optional

import torch

from .embedding import DrawnNoise


class Laplace(DrawnNoise):
    name = "laplace"

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        u = torch.empty(shape, dtype=torch.float32, device=device).uniform_(-0.5, 0.5, generator=generator)
        return -torch.sign(u) * torch.log1p(-2 * u.abs())
