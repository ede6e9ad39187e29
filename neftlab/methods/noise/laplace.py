"""`noise=laplace`: heavy-tailed noise at NEFTune's scale, Laplace(0, 1) * alpha / sqrt(L_i * d) on each sequence's
real tokens (variance 2 alpha^2 / (L_i d), against uniform's alpha^2 / (3 L_i d)); drawn by the inverse CDF from one
uniform draw, so it follows the kind's own random stream."""

from typing import Optional

import torch

from .embedding import DrawnNoise


def inverse_cdf(u: torch.Tensor) -> torch.Tensor:
    """Laplace(0, 1) from u uniform on [-0.5, 0.5). `uniform_` returns -0.5 itself about once in 2^24 draws, where
    the inverse is infinite (a run of 30 steps at batch 4 met it in 2 seeds of 5, and its loss went non-finite):
    |2u| is kept at most 1 - eps, so the tail ends at -log(eps), about 15.9 in float32, as
    `torch.distributions.Laplace` ends it. Every other draw is unchanged."""
    return -torch.sign(u) * torch.log1p(-(2 * u.abs()).clamp(max=1 - torch.finfo(u.dtype).eps))


class Laplace(DrawnNoise):
    name = "laplace"

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        u = torch.empty(shape, dtype=torch.float32, device=device).uniform_(-0.5, 0.5, generator=generator)
        return inverse_cdf(u)
