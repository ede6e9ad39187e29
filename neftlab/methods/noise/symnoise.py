"""`noise=symnoise`: SymNoise (arXiv 2312.01523) as its third-party implementations read it (docs/methods.md):
Bernoulli +-1 * alpha / sqrt(L_i * d), each sign with probability 1/2; with `noise.antithetic=true` each batch is
also trained on x - eps."""

from typing import Optional

import torch

from .embedding import DrawnNoise


class SymNoise(DrawnNoise):
    name = "symnoise"

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        signs = torch.randint(0, 2, shape, generator=generator, device=device)
        return signs.to(torch.float32) * 2 - 1
