"""`noise=none`: plain fine-tuning, no hook attached at all."""

from .kind import NoiseKind


class NoNoise(NoiseKind):
    name = "none"
