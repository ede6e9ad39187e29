"""Noise on the input embeddings: uniform (NEFTune), gaussian, symnoise, and the hook the dynamic noise, the
schedules and FreeLB build on.

NEFTune adds U(-1, 1) * alpha / sqrt(L_i * d) to the embedding output of sample i during
training, with L_i its number of real tokens. `symnoise` (SymNoise, arXiv 2312.01523, as its third-party
implementations read it: docs/methods.md) adds Bernoulli +-1 * alpha / sqrt(L_i * d) instead, with the same masks
and L_i. `antithetic=True` trains each batch twice, on x + eps and on x - eps with the same eps (two passes of
`passes.PassesTrainer`, each at half the loss), so the first-order terms of the noise cancel in the gradient.
Two forward hooks do it without touching the
model's code: a pre-hook on the whole model catches the attention mask (and the labels, for noise on the
prompt or the response only), and a hook on the input-embedding layer adds the noise to real tokens only, in
training mode only. `.alpha` is live: during training `NoiseCallback` moves it (a schedule, the dynamic rule).

Bring-your-own-loop use::

    with neftlab.methods.noise.attach(model, "uniform", alpha=5.0) as noise:
        ...train...            # noise.alpha is the current alpha
"""

from __future__ import annotations

import logging
from typing import Optional

import torch

from ..core.errors import NeftlabError

log = logging.getLogger(__name__)


class NoiseError(NeftlabError, RuntimeError):
    pass


EMBEDDING_KINDS = ("uniform", "gaussian", "symnoise", "dynamic", "freelb")  # what a hook on the embedding adds
DRAWN_KINDS = EMBEDDING_KINDS[:-1]  # noise drawn per token: antithetic passes can mirror it (not FreeLB's climb)


class Noise:
    """An attached noise hook. `.alpha` is live (dynamic noise changes it); `.remove()` detaches it."""

    def __init__(self, model: torch.nn.Module, kind: str, alpha: float = 5.0, length_mode: str = "real",
                 std: Optional[float] = None, seed: Optional[int] = None, tokens: str = "all",
                 antithetic: bool = False):
        if kind not in EMBEDDING_KINDS + ("none", "noisytune"):
            raise NoiseError(f"unknown noise kind {kind!r}: use none, uniform, gaussian, symnoise, dynamic, freelb "
                             "or noisytune")
        if antithetic and kind not in DRAWN_KINDS:
            raise NoiseError(f"antithetic noise mirrors a drawn noise: use it with {', '.join(DRAWN_KINDS[:-1])} or "
                             f"{DRAWN_KINDS[-1]}, not {kind}")
        if length_mode not in ("real", "padded"):
            raise NoiseError(f"unknown length_mode {length_mode!r}: use real or padded")
        if tokens not in ("all", "prompt", "response"):
            raise NoiseError(f"unknown tokens {tokens!r}: use all, prompt or response")
        self.kind, self.alpha, self.length_mode, self.std, self.tokens = kind, float(alpha), length_mode, std, tokens
        self.embedding = model.get_input_embeddings()
        self._magnitude: Optional[torch.Tensor] = None  # kept on the device: reading it every forward would sync
        # With a seed the noise has its own random stream (the runner gives each rank its own seed, so data-
        # parallel ranks draw different noise); without, it draws from torch's global generator.
        self.seed, self._generator, self._pending_state = seed, None, None
        self._mask: Optional[torch.Tensor] = None
        self._positions: Optional[torch.Tensor] = None
        self._labels: Optional[torch.Tensor] = None
        self._padded_ratio: Optional[torch.Tensor] = None
        self.passes = 2 if antithetic else 1  # forward and backward passes per batch (`passes.PassesTrainer`)
        self._held: Optional[torch.Tensor] = None  # antithetic: the first pass's noise, mirrored in the second
        self._mirrored = False
        self._handles = []
        if kind not in EMBEDDING_KINDS:
            return
        if getattr(self.embedding, "_neftlab_noise", None) is not None or hasattr(self.embedding, "neftune_noise_alpha"):
            raise NoiseError("this embedding already has noise attached (neftlab's or the Trainer's "
                             "neftune_noise_alpha); noise is never applied twice")
        self.embedding._neftlab_noise = self
        self._handles = [model.register_forward_pre_hook(self._catch_inputs, with_kwargs=True),
                         self.embedding.register_forward_hook(self._add_noise)]

    def _catch_inputs(self, module, args, kwargs):
        self._mask, self._positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        self._labels = kwargs.get("labels")

    def _real_lengths(self, mask: Optional[torch.Tensor], shape: tuple, device) -> torch.Tensor:
        """L for every token, shape (batch, length): its own sequence's real length.

        A sequence is a row of a padded batch (its attention mask's sum), or, in a packed or padding-free row,
        a run of position ids restarting at 0, with or without a mask. A batch with neither counts one
        sequence per row, which is right without padding."""
        batch, length = shape
        positions = self._positions if self._positions is not None and self._positions.shape[-1] == length else None
        if positions is not None:  # no restart: one sequence per row, the mask's count as below (no host sync)
            starts = (positions.expand(batch, length) == 0).long()
            starts[:, 0] = 1
            sequence = starts.cumsum(1) - 1  # which packed sequence each token belongs to
            real = torch.ones(batch, length, device=device) if mask is None else mask.to(device).float()
            counts = torch.zeros(batch, length, device=device).scatter_add_(1, sequence, real)
            return counts.gather(1, sequence).clamp(min=1)
        if mask is not None:
            return mask.to(device).float().sum(1, keepdim=True).clamp(min=1).expand(batch, length)
        return torch.full((batch, length), float(length), device=device)

    def _add_noise(self, module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not module.training:
            return None
        if self._mirrored and self._held is not None and self._held.shape == output.shape:
            noise = -self._held
        else:
            noise = self.draw(output)
            self._held = noise if self.passes == 2 else None
        return (output.float() + noise).to(output.dtype)

    def next_pass(self) -> None:
        """The batch's next pass: antithetic noise adds the negated noise of the first."""
        self._mirrored = True

    def reset(self) -> None:
        """The batch is done: the next forward draws afresh."""
        self._held, self._mirrored = None, False

    def draw(self, output: torch.Tensor) -> torch.Tensor:
        """This batch's noise for the embedding output `output`, in fp32, zero where no noise goes."""
        batch, length, dim = output.shape
        mask = self._mask if self._mask is not None and tuple(self._mask.shape) == (batch, length) else None
        real = self._real_lengths(mask, (batch, length), output.device)
        # length_mode=padded: the whole row's length, as the Hugging Face hook takes it, also under packing
        lengths = torch.full_like(real, float(length)) if self.length_mode == "padded" else real
        scale = self.alpha / torch.sqrt(lengths * dim)  # per token: alpha / sqrt(L_i * d) of its sequence
        self._magnitude = scale.mean().detach()
        self._padded_ratio = torch.sqrt(real / length).mean().detach()  # the padded formula's over the real one's
        generator = self._generator_on(output.device)
        # In fp32 whatever the weights' dtype, cast once at the end: in bf16 the noise itself, at L*d of about 2M
        # some 30 bf16 steps of a typical embedding value, would be drawn and scaled in 8 bits.
        if self.kind == "gaussian":
            sigma = torch.full_like(scale, self.std) if self.std is not None else scale
            noise = torch.randn(output.shape, generator=generator, dtype=torch.float32, device=output.device)
            noise = noise * sigma[:, :, None]
        elif self.kind == "symnoise":  # Bernoulli +-1, each sign with probability 1/2
            signs = torch.randint(0, 2, output.shape, generator=generator, device=output.device)
            noise = (signs.to(torch.float32) * 2 - 1) * scale[:, :, None]
        else:
            noise = torch.empty(output.shape, dtype=torch.float32, device=output.device).uniform_(
                -1, 1, generator=generator) * scale[:, :, None]
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

    def _generator_on(self, device: torch.device) -> Optional[torch.Generator]:
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    state_key = "noise"

    def state_dict(self) -> dict:
        """The noise stream's position, for checkpoints (None: the global generator, which the Trainer saves). Each
        rank has its own stream, so each rank saves its own."""
        return {"rng": self._generator.get_state() if self._generator is not None else self._pending_state}

    def load_state_dict(self, state: dict) -> None:
        if self._generator is not None and state["rng"] is not None:
            self._generator.set_state(state["rng"])
        else:
            self._pending_state = state["rng"]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._mask = self._positions = self._labels = None
        if getattr(self.embedding, "_neftlab_noise", None) is self:
            del self.embedding._neftlab_noise

    def __enter__(self) -> "Noise":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: torch.nn.Module, kind: str = "uniform", **params) -> Noise:
    """Attach noise of `kind` to the input embedding of `model` (any HF model, PEFT-wrapped or not).

    params: alpha, length_mode ("real" | "padded"), std (gaussian), seed (an own random stream), tokens ("all" |
    "prompt" | "response"), antithetic (x + eps, then x - eps: drive the passes with `next_pass` and `reset`, as
    `passes.PassesTrainer` does). Dynamic noise is uniform noise whose alpha a `DynamicAlpha` moves, and a schedule
    moves it in `NoiseCallback`; `attach` accepts their keys and ignores them. FreeLB's perturbation is
    `neftlab.methods.freelb.FreeLB`, which its Trainer drives.
    """
    for key in ("alpha_min", "alpha_max", "alpha_step", "adjust_interval", "stability_threshold", "schedule",
                "warmup_ratio", "intensity"):
        params.pop(key, None)
    if kind == "freelb":
        raise NoiseError("FreeLB's perturbation climbs the loss between passes, which its Trainer drives: use "
                         "neftlab.methods.freelb.FreeLB with neftlab.methods.passes.PassesTrainer")
    return Noise(model, kind, **params)
