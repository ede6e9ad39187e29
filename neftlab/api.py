"""neftlab's noise in a training script of one's own (docs/trl.md): `noise_for` gives a built Hugging Face
`Trainer` or TRL `SFTTrainer` a noise kind, the same class the runner builds, with its per-sequence scale
alpha / sqrt(L_i * d) under padding, left padding and padding-free packing. It imports nothing of Hydra, W&B or the
runner, so a script pays only for the noise::

    import neftlab
    trainer = SFTTrainer(model=..., args=SFTConfig(packing=True, ...), train_dataset=...)
    neftlab.noise_for(trainer, "uniform", alpha=5.0)
    trainer.train()
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .core.files import atomic_write, load_torch
from .methods.noise import NoiseError, NoiseKind, attach
from .methods.noise.kind import rank_seed

log = logging.getLogger(__name__)


def noise_for(trainer: Any, kind: Union[str, type] = "uniform", seed: Optional[int] = None, **keys) -> NoiseKind:
    """Attach noise of `kind` (a name of neftlab's kinds, or a kind class of one's own) to `trainer`'s model, with
    the kind's config keys as keyword arguments, checked as a run's are, and add the kind to the trainer's
    callbacks (a schedule and the dynamic rule move alpha through them). Each data-parallel rank draws its own
    stream, from `seed` (default: the trainer's `args.seed`) as the runner's ranks do, kept in the trainer's
    checkpoints (`NoiseCheckpoint`). Noise acts in training mode only; `.remove()` on the returned kind detaches
    it.

    Refused in one line: the trainer's own `neftune_noise_alpha` set too (the noise would be applied twice), and
    the kinds that need neftlab's runner: more than one pass per batch (FreeLB, antithetic noise: the runner's
    PassesTrainer drives them), a loss of their own (NoiseFiT's three passes, a consistency term's clean pass:
    `own_loss`) or a change to the weights before training (NoisyTune)."""
    args = trainer.args
    alpha = getattr(trainer, "neftune_noise_alpha", None)
    alpha = getattr(args, "neftune_noise_alpha", None) if alpha is None else alpha
    if alpha is not None:
        raise NoiseError(f"neftune_noise_alpha={alpha} is set in the trainer's args and neftlab's noise would be "
                         "applied on top of it: unset neftune_noise_alpha (noise 'uniform' with alpha is NEFTune, "
                         "scaled per sequence)")
    noise = attach(trainer.model, kind, seed=rank_seed(args.seed if seed is None else seed, args.process_index),
                   **keys)
    why = runner_only(noise)
    if why is not None:
        noise.remove()
        raise NoiseError(f"noise kind {noise.name} {why}, which a Trainer of your own does not do: train it with "
                         f"neftlab's runner (python -m neftlab noise={noise.name})")
    trainer.add_callback(noise)
    trainer.add_callback(NoiseCheckpoint(noise))
    return noise


def runner_only(noise: NoiseKind) -> Optional[str]:
    """Why `noise` needs neftlab's runner, or None where a Trainer's one pass per batch and its callbacks do."""
    if getattr(noise.cfg, "antithetic", False):
        return "with antithetic=True trains each batch twice, on x + eps then on x - eps, driven by PassesTrainer"
    if noise.driven:
        return (f"needs each batch's passes ({noise.passes}) driven and reset by neftlab.methods.passes."
                "PassesTrainer")
    if noise.own_loss:
        return "computes its own training loss (more forwards and terms than the Trainer's), through PassesTrainer"
    if type(noise).prepare is not NoiseKind.prepare:
        return "changes the pretrained weights once before training (prepare), and never on a resume"
    return None


class NoiseCheckpoint(TrainerCallback):
    """The noise's own state (its stream's position, its alpha) in each of the trainer's checkpoints, a file per
    rank as the Trainer's random states are, read back when training resumes from a checkpoint of
    `args.output_dir` (`resume_from_checkpoint=True`, or a path there): the resumed run draws the noise the
    uninterrupted one would have. Resumed from elsewhere, the stream starts again from its seed, with a warning."""

    def __init__(self, noise: NoiseKind):
        self.noise = noise

    @staticmethod
    def path(args, state) -> Path:
        return Path(os.path.abspath(args.output_dir), f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}",
                    f"neftlab_noise_rank{args.process_index}.pt")

    def on_save(self, args, state, control, **kwargs):
        atomic_write(self.path(args, state), lambda tmp: torch.save(self.noise.state_dict(), tmp),
                     root=Path(os.path.abspath(args.output_dir)))

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step == 0:
            return
        path = self.path(args, state)
        if path.is_file():
            self.noise.load_state_dict(load_torch(path, root=path.parent))
        else:
            log.warning("resumed at step %d with no %s: the noise's stream starts again from its seed",
                        state.global_step, path)
