"""neftlab: config-driven noisy-embedding fine-tuning (NEFTune and variants) with Hydra and the HF Trainer.

`neftlab.noise_for(trainer, "uniform", alpha=5.0)` gives a Trainer of one's own neftlab's noise (`neftlab.api`)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "noise_for":  # imported when first used: `import neftlab` alone stays as light as it was
        from .api import noise_for
        return noise_for
    raise AttributeError(f"module 'neftlab' has no attribute {name!r}")
