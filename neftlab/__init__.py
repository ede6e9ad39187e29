"""neftlab: config-driven noisy-embedding fine-tuning (NEFTune and variants) with Hydra and the HF Trainer."""

__version__ = "0.1.0"
