"""`noise=uniform`: NEFTune (Jain et al. 2023), U(-1, 1) * alpha / sqrt(L_i * d) on each sequence's real tokens."""

from .embedding import DrawnNoise


class Uniform(DrawnNoise):
    name = "uniform"
