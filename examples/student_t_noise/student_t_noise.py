"""A user's noise kind, outside neftlab: Student-t noise at NEFTune's scale, with its own key (`dof`, the degrees of
freedom) and its own search space. Heavier tails than NEFTune's uniform noise, Gaussian in the limit.

t = z / sqrt(chi2_k / k), with z and the k squared normals drawn from the kind's own seeded stream (torch's
distributions take no generator), then scaled by alpha / sqrt(L_i * d) like every drawn kind."""

from dataclasses import dataclass
from typing import Optional

import torch

from neftlab.config.checks import check
from neftlab.methods.noise import ALPHA, DrawnNoise, Param, ScheduledConfig


@dataclass
class StudentTConfig(ScheduledConfig):
    dof: int = 3  # degrees of freedom k: tails like |x|^-(k+1); k > 2 for a finite variance k / (k - 2)

    def validate(self, key: str) -> None:
        super().validate(key)
        check(3 <= self.dof <= 64, f"{key}.dof", self.dof, "an integer in [3, 64]")


class StudentT(DrawnNoise):
    name = "student_t"
    Config = StudentTConfig
    space = (ALPHA, Param("dof", 3, 30, log=True, integer=True))

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        z = torch.randn(shape, generator=generator, device=device)
        chi2 = torch.zeros(shape, device=device)
        for _ in range(self.cfg.dof):
            chi2 += torch.randn(shape, generator=generator, device=device) ** 2
        return z / torch.sqrt(chi2 / self.cfg.dof)
