"""Noise on the input embeddings, the hooks every embedding kind shares: a pre-hook on the whole model catches the
attention mask, the position ids and the labels; a hook on the input-embedding layer adds the kind's noise to the
real tokens only, in training mode only, scaled per sequence by alpha / sqrt(L_i * d) (NEFTune's formula, with
L_i the sequence's own real length: a row of a padded batch, or in a packed row a run of position ids restarting at
0, or without position ids a span of `cu_seq_lens_q`, the flash-attention boundaries). `.alpha` is live: a
schedule (`DrawnNoise`) or the dynamic rule moves it during training.

A drawn kind only says how its unit noise is drawn (`sample`); FreeLB starts from this noise and climbs the loss.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ...config.checks import check, check_choice
from ...config.noise import NoiseConfig
from ...core.measures import Measure
from .consistency import DIVERGENCE, Consistency, ConsistencyConfig, consistency_space
from .kind import NoiseError, NoiseKind, Param
from .sequences import Sequences

log = logging.getLogger(__name__)

ALPHA = Param("alpha", 1.0, 20.0, log=True)  # NEFTune's alpha as the searches draw it: 1 to 20, log scale
# What an embedding kind logs at each logging step.
LIVE_ALPHA = Measure("noise/alpha", "noise alpha", None, "{:.3f}", "noise", column=False, curve=True)
MAGNITUDE = Measure("noise/mean_magnitude", "noise mean magnitude", None, "{:.4f}", "noise", column=False, curve=True)
PADDED_RATIO = Measure("noise/padded_to_real_ratio", "padded to real tokens", None, "{:.3f}", "noise", column=False)
TWICE = ("this embedding already has noise attached (neftlab's or the Trainer's neftune_noise_alpha); noise is never "
         "applied twice")


@dataclass
class EmbeddingConfig(NoiseConfig):
    # real: L_i = the sequence's non-padding tokens (NEFTune's own code); padded: L = the row's length, padding
    # included (what the Hugging Face Trainer's built-in hook does)
    length_mode: str = "real"

    def validate(self, key: str) -> None:
        check_choice(f"{key}.length_mode", self.length_mode, ("real", "padded"))


@dataclass
class DrawnConfig(ConsistencyConfig, EmbeddingConfig):  # noise.consistency: consistency.py
    alpha: float = 5.0  # NEFTune's alpha: the noise is alpha / sqrt(L_i * d) times the kind's unit noise
    tokens: str = "all"  # all | prompt | response (labels != -100): which tokens get noise; L_i stays the sequence's
    antithetic: bool = False  # each batch trained on x + eps and on x - eps, the same eps (two passes, half the loss)

    def validate(self, key: str) -> None:
        super().validate(key)
        check(self.alpha >= 0, f"{key}.alpha", self.alpha, ">= 0")
        check_choice(f"{key}.tokens", self.tokens, ("all", "prompt", "response"))

    def validate_run(self, cfg) -> None:
        check(self.tokens == "all" or cfg.model.causal, "noise.tokens", self.tokens,
              f"all with model.arch={cfg.model.arch}, which has one label per sequence (it picks tokens by labels)")


SCHEDULES = ("constant", "linear", "cosine", "warmup")


@dataclass
class ScheduledConfig(DrawnConfig):
    # alpha over training: constant | linear (decay to 0) | cosine (decay to 0) | warmup (0 to alpha, then alpha)
    schedule: str = "constant"
    warmup_ratio: float = 0.1  # warmup: the share of the training steps alpha rises over

    def validate(self, key: str) -> None:
        super().validate(key)
        check_choice(f"{key}.schedule", self.schedule, SCHEDULES)
        check(0 < self.warmup_ratio <= 1, f"{key}.warmup_ratio", self.warmup_ratio, "in (0, 1]")


def schedule_factor(schedule: str, step: int, total: int, warmup_ratio: float = 0.1) -> float:
    """alpha's share at optimizer step `step` of `total`: constant 1; linear 1 - t; cosine (1 + cos(pi t)) / 2, with
    t = step / total (the steps done before this one), both reaching 0 at the end of training; warmup
    t / warmup_ratio up to 1, then 1."""
    t = min(max(step / total, 0.0), 1.0) if total > 0 else 0.0
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "warmup":
        return min(1.0, t / warmup_ratio)
    return 1.0


class EmbeddingNoise(Sequences, NoiseKind):
    """The hooks on a model's input embedding; `perturb` is what the embedding output gets in training."""

    Config = EmbeddingConfig
    logs = (LIVE_ALPHA, MAGNITUDE, PADDED_RATIO)

    def __init__(self, model: torch.nn.Module, cfg: Optional[EmbeddingConfig] = None, **kwargs):
        super().__init__(model, cfg, **kwargs)
        self.alpha = float(self.start_alpha())
        self.length_mode = self.cfg.length_mode
        self.tokens = "all"  # a drawn kind may noise the prompt or the response only
        self.embedding = model.get_input_embeddings()
        self._magnitude: Optional[torch.Tensor] = None  # kept on the device: reading it every forward would sync
        self._padded_ratio: Optional[torch.Tensor] = None
        self._silent = False
        attached = getattr(self.embedding, "_neftlab_noise", None)
        if attached is not None or hasattr(self.embedding, "neftune_noise_alpha"):
            raise NoiseError(TWICE)
        self.embedding._neftlab_noise = self
        self._handles = [model.register_forward_pre_hook(self._catch_inputs, with_kwargs=True),
                         self.embedding.register_forward_hook(self._add_noise)]

    def start_alpha(self) -> float:
        return self.cfg.alpha

    def sample(self, shape: torch.Size, generator: Optional[torch.Generator], device) -> torch.Tensor:
        """The kind's unit noise, fp32, of `shape`; scaled by alpha / sqrt(L_i * d) afterwards. NEFTune's U(-1, 1)."""
        return torch.empty(shape, dtype=torch.float32, device=device).uniform_(-1, 1, generator=generator)

    def scale(self, lengths: torch.Tensor, dim: int) -> torch.Tensor:
        """Per token, what its unit noise is multiplied by: alpha / sqrt(L_i * d) of its sequence."""
        return self.alpha / torch.sqrt(lengths * dim)

    @contextlib.contextmanager
    def silenced(self):
        """No noise from this kind in the forwards within (a consistency term's clean pass); nothing drawn."""
        self._silent = True
        try:
            yield
        finally:
            self._silent = False

    def _add_noise(self, module, inputs, output: torch.Tensor) -> Optional[torch.Tensor]:
        if not module.training or self._silent:
            return None
        if hasattr(module, "neftune_noise_alpha"):  # the Trainer's hook attached after this one (its train())
            raise NoiseError(TWICE)
        return (output.float() + self.perturb(output)).to(output.dtype)

    def perturb(self, output: torch.Tensor) -> torch.Tensor:
        """What the embedding output gets in this forward: the drawn noise."""
        return self.draw(output)

    def draw(self, output: torch.Tensor) -> torch.Tensor:
        """This batch's noise for the embedding output `output`, in fp32, zero where no noise goes."""
        batch, length, dim = output.shape
        mask = self._mask if self._mask is not None and tuple(self._mask.shape) == (batch, length) else None
        real = self._real_lengths(mask, (batch, length), output.device)
        # length_mode=padded: the whole row's length, as the Hugging Face hook takes it, also under packing
        lengths = torch.full_like(real, float(length)) if self.length_mode == "padded" else real
        scale = self.scale(lengths, dim)
        self._magnitude = scale.mean().detach()
        self._padded_ratio = torch.sqrt(real / length).mean().detach()  # the padded formula's over the real one's
        # In fp32 whatever the weights' dtype, cast once at the end: in bf16 the noise itself, at L*d of about 2M
        # some 30 bf16 steps of a typical embedding value, would be drawn and scaled in 8 bits.
        noise = self.sample(output.shape, self._generator_on(output.device), output.device) * scale[:, :, None]
        if mask is not None and self.length_mode == "real":  # padded mode noises padding too, as HF's hook does
            noise = noise * mask.to(torch.float32)[:, :, None]
        if self.tokens != "all":
            noise = noise * self._chosen_tokens((batch, length))[:, :, None]
        return noise

    def _chosen_tokens(self, shape: tuple) -> torch.Tensor:
        """1 for the tokens `tokens` names: the response is the tokens with a label (not -100), the prompt the
        rest (padding is masked above); in a packed row the labels mark each sequence's answer alike."""
        labels = self._labels
        if labels is None or tuple(labels.shape) != shape:
            raise NoiseError(f"noise.tokens={self.tokens} needs the batch's token labels in the forward, "
                             f"got {None if labels is None else tuple(labels.shape)} for a batch of {shape}")
        response = labels != -100
        return (response if self.tokens == "response" else ~response).to(torch.float32)

    @property
    def padded_ratio(self) -> Optional[float]:
        """At the last noised forward: the Hugging Face formula's magnitude, alpha/sqrt(row length * d), over the
        per-sequence one, alpha/sqrt(L_i * d), averaged over tokens; 1 for unpadded rows of one sequence, below 1
        for padded or packed rows (about 0.35 for 8 equal sequences in a row)."""
        return None if self._padded_ratio is None else float(self._padded_ratio)

    @property
    def mean_magnitude(self) -> Optional[float]:
        """Batch mean of alpha/sqrt(L_i*d) at the last noised forward (a device-to-host copy: read it to log)."""
        return None if self._magnitude is None else float(self._magnitude)

    def metrics(self) -> dict:
        out = {LIVE_ALPHA.key: self.alpha}
        magnitude = self.mean_magnitude  # the magnitude's one host sync, at logging
        if magnitude is not None:
            out[MAGNITUDE.key] = magnitude
            out[PADDED_RATIO.key] = self.padded_ratio
        return out

    def state_dict(self) -> dict:
        """The noise stream's position (None: the global generator, which the Trainer saves; each rank has its own
        stream and saves it) and the live alpha."""
        return {"rng": self._stream_state(), "alpha": self.alpha}

    def load_state_dict(self, state: dict) -> None:
        self._load_stream_state(state.get("rng"))
        if state.get("alpha") is not None:
            self.alpha = state["alpha"]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._forget_inputs()
        if getattr(self.embedding, "_neftlab_noise", None) is self:
            del self.embedding._neftlab_noise


class DrawnNoise(EmbeddingNoise):
    """Noise drawn afresh per token each batch, at NEFTune's scale, on the tokens `noise.tokens` names; alpha moved
    by `noise.schedule`; with `noise.antithetic` each batch is trained on x + eps and then on x - eps (two passes
    of `passes.PassesTrainer`, each at half the loss), so the first-order terms of the noise cancel in the gradient;
    with `noise.consistency` each loss adds a divergence from a clean pass (`consistency.py`). Subclasses say only
    how the unit noise is drawn (`sample`)."""

    Config = ScheduledConfig
    space = (ALPHA,)
    logs = EmbeddingNoise.logs + (DIVERGENCE,)
    drawn = True

    def __init__(self, model: torch.nn.Module, cfg: Optional[DrawnConfig] = None, **kwargs):
        super().__init__(model, cfg, **kwargs)
        self.tokens = self.cfg.tokens
        self.passes = 2 if self.cfg.antithetic else 1
        self._held: Optional[torch.Tensor] = None  # antithetic: the first pass's noise, mirrored in the second
        self._mirrored = False
        mode = self.cfg.consistency
        self.consistency = None if mode == "none" else Consistency(mode, self.cfg.consistency_weight)

    @classmethod
    def search_space(cls, node: dict) -> tuple:
        return super().search_space(node) + consistency_space(node)

    @property
    def own_loss(self) -> bool:
        return self.consistency is not None  # the consistency term's clean pass

    def loss(self, forward, inputs, reduce):
        if self.consistency is None:
            return super().loss(forward, inputs, reduce)
        return self.consistency.loss(forward, inputs, reduce, self.silenced)

    def metrics(self) -> dict:
        return {**super().metrics(), **(self.consistency.metrics() if self.consistency is not None else {})}

    def perturb(self, output: torch.Tensor) -> torch.Tensor:
        if self._mirrored and self._held is not None and self._held.shape == output.shape:
            return -self._held
        noise = self.draw(output)
        self._held = noise if self.passes == 2 else None
        return noise

    def next_pass(self) -> None:
        """The batch's next pass: antithetic noise adds the negated noise of the first."""
        self._mirrored = True

    def reset(self) -> None:
        """The batch is done: the next forward draws afresh."""
        self._held, self._mirrored = None, False

    def on_step_begin(self, args, state, control, **kwargs):
        """A schedule's alpha for the step about to run, from the step alone: a resumed run continues it exactly."""
        if self.cfg.schedule != "constant":
            self.alpha = self.cfg.alpha * schedule_factor(self.cfg.schedule, state.global_step, state.max_steps,
                                                          self.cfg.warmup_ratio)
