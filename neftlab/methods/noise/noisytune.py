"""`noise=noisytune`, NoisyTune (Wu et al., ACL 2022): the pretrained weights perturbed once, before fine-tuning;
no noise during it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config.checks import check
from ...config.noise import NoiseConfig
from ...core.measures import Measure
from .kind import NoiseKind, Param


@dataclass
class NoisyTuneConfig(NoiseConfig):
    intensity: float = 0.15  # NoisyTune's lambda: W += U(-lambda/2, lambda/2) * std(W), the paper's 0.15

    def validate(self, key: str) -> None:
        check(self.intensity > 0, f"{key}.intensity", self.intensity, "> 0")


@torch.no_grad()
def noisytune(model: torch.nn.Module, intensity: float, seed: int) -> int:
    """NoisyTune (Wu et al., ACL 2022): each parameter tensor W of the pretrained model gets, once before
    fine-tuning, U(-intensity/2, intensity/2) * std(W), as the authors' code does it (every named parameter,
    biases and norms too; a constant one, std 0, stays as it is). Tied weights are one parameter and get noise
    once; LoRA's adapters (`lora_` parameters) are left as PEFT initialised them, the frozen base is perturbed.
    Drawn on the CPU from `seed`, so every rank perturbs alike. Returns the number of tensors perturbed."""
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for name, weight in model.named_parameters():
        if "lora_" in name or weight.numel() < 2:
            continue
        std = weight.float().std()
        if std == 0:
            continue
        draw = torch.rand(weight.shape, generator=generator, dtype=torch.float32) - 0.5
        weight.add_((draw.to(weight.device) * (intensity * std)).to(weight.dtype))
        count += 1
    return count


class NoisyTune(NoiseKind):
    name = "noisytune"
    Config = NoisyTuneConfig
    space = (Param("intensity", 0.05, 0.5),)  # around the paper's 0.15
    logs = (Measure("noise/noisytune_tensors", "tensors NoisyTune perturbed", None, "{:.0f}", "noise", column=False),)

    def prepare(self, model: torch.nn.Module, seed: int) -> None:
        self.log_event(0, {self.logs[0].key: noisytune(model, self.cfg.intensity, seed)})
