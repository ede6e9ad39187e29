"""`noise=noisefit`: NoiseFiT (arXiv 2504.03302; the authors' NoiseFiT.py), Gaussian noise on the hidden states of
the transformer layers of highest (or lowest) signal-to-noise ratio, scaled per token, and its hybrid loss of a
clean pass and two noisy ones. docs/methods.md says which of the reference's two versions neftlab follows where.

- The noise, on a chosen layer's output h (per token t, over its hidden size d): h + z * s / sqrt(d) * MAD_t *
  exp(-beta |h - median_t| / MAD_t) * min(5, exp(var_t / mean var)), z ~ N(0, 1) from the kind's own stream; median,
  MAD and var over the token's d values, the mean var over its own sequence's real tokens (packed sequences apart);
  none on padding, none in eval mode, none on the loss's clean pass; the noise itself carries no gradient.
- The layers: on the first training batch, in eval mode and without gradients, each layer's SNR = mean |h| / mean
  |noise| over the real tokens (the noise's mean |z| taken exactly, sqrt(2/pi)); the `layers` of largest or lowest
  SNR are noised for the rest of training, and saved in the kind's state, so a resumed run noises the same ones.
- The loss: hybrid_alpha * CE(clean) + (1 - hybrid_alpha) * T^2 * mean_i KL(p_clean^T || p_noisy_i^T)
  + lambda_consistency * T^2 * KL(p_noisy2^T || p_noisy1^T), p^T = softmax(logits / T), the clean pass and the
  second noisy pass detached where they are targets, each KL per token over the tokens with a next-token label and
  reduced as the Trainer reduces its cross-entropy.
"""

from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist

from ...config.checks import check, check_choice
from ...config.noise import NoiseConfig
from ...core.dist import all_reduce
from ...core.measures import Measure
from .consistency import counted, kl
from .kind import NoiseError, NoiseKind, Param
from .sequences import Sequences

log = logging.getLogger(__name__)

EPSILON = 1e-6  # the reference's, in its robust statistics and its SNR
FACTOR_CAP = 5.0  # the reference's cap on the token's variance factor
HALF_NORMAL = math.sqrt(2 / math.pi)  # E|z|, z ~ N(0, 1)
CHECKPOINTING = ("activation_checkpointing", "gradient_checkpointing")  # the latter its deprecated alias
RERUN = ("its noise is drawn by hooks on the layers, which activation checkpointing reruns in the backward pass "
         "without it")

CE = Measure("noise/noisefit_ce", "NoiseFiT clean cross-entropy", None, "{:.4f}", "noise", column=False, curve=True)
SOFT = Measure("noise/noisefit_soft", "NoiseFiT clean-to-noisy KL", None, "{:.4f}", "noise", column=False, curve=True)
CONSISTENCY = Measure("noise/noisefit_consistency", "NoiseFiT noisy-noisy KL", None, "{:.4f}", "noise", column=False,
                      curve=True)


@dataclass
class NoiseFiTConfig(NoiseConfig):
    scale: float = 1.0  # the noise's base std in units of 1/sqrt(d), times the token's MAD (the reference's v2 centre)
    layers: int = 3  # how many layers get noise (the reference's num_noise_layers); all of them in a smaller model
    snr: str = "largest"  # largest | lowest: the layers of highest or lowest SNR (the reference's snr_format)
    beta: float = 0.1  # the per-value weight exp(-beta |h - median| / MAD): less noise on outlying values
    hybrid_alpha: float = 0.5  # the clean cross-entropy's weight; 1 - hybrid_alpha the clean-to-noisy KL's
    lambda_consistency: float = 0.05  # the noisy-noisy KL's weight (the reference's default)
    temperature: float = 1.0  # T of the KL terms, which are scaled by T^2

    def validate(self, key: str) -> None:
        check(self.scale > 0, f"{key}.scale", self.scale, "> 0")
        check(self.layers >= 1, f"{key}.layers", self.layers, "an integer >= 1")
        check_choice(f"{key}.snr", self.snr, ("largest", "lowest"))
        check(self.beta >= 0, f"{key}.beta", self.beta, ">= 0")
        check(0 <= self.hybrid_alpha <= 1, f"{key}.hybrid_alpha", self.hybrid_alpha, "in [0, 1]")
        check(self.lambda_consistency >= 0, f"{key}.lambda_consistency", self.lambda_consistency, ">= 0")
        check(self.temperature > 0, f"{key}.temperature", self.temperature, "> 0")

    def validate_run(self, cfg) -> None:
        for option in CHECKPOINTING:
            value = (cfg.trainer.args or {}).get(option)
            check(not value, f"trainer.args.{option}", value, f"false with noise.kind=noisefit: {RERUN}")


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer layers (llama's and OPT's decoder layers, BERT's encoder layers, GPT-2's
    blocks, PEFT-wrapped or not): its one list of `config.num_hidden_layers` modules of one class."""
    count = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and count and len(m) == count
              and len({type(layer) for layer in m}) == 1]
    if len(stacks) != 1:
        raise NoiseError(f"noise=noisefit needs the model's one stack of config.num_hidden_layers={count} "
                         f"transformer layers and found {len(stacks)} in {type(model).__name__}: use a llama-, OPT- "
                         "or BERT-like model")
    return stacks[0]


def snr_layers(snr: torch.Tensor, count: int, rule: str) -> list[int]:
    """The reference's rule: the `count` layers of largest (or lowest) SNR, in that order; all of them when the
    model has fewer."""
    return torch.topk(snr, min(count, snr.numel()), largest=rule == "largest").indices.tolist()


class NoiseFiT(Sequences, NoiseKind):
    name = "noisefit"
    Config = NoiseFiTConfig
    # The noise's size from the bottom of the reference's own grid (0.25 / sqrt(d)) up to about the per-token size of
    # NEFTune's alpha 20 on the overfit study's model (benchmarks/noisefit_scale.py, docs/methods.md)
    space = (Param("scale", 0.25, 24.0, log=True),)
    logs = (CE, SOFT, CONSISTENCY)

    def __init__(self, model: torch.nn.Module, cfg: Optional[NoiseFiTConfig] = None, **kwargs):
        super().__init__(model, cfg, **kwargs)
        self.model = model
        self.stack = transformer_layers(model)
        self.chosen: Optional[list[int]] = None  # the noised layers, chosen at the first training batch
        self.snr: Optional[list[float]] = None  # every layer's SNR then
        self._noisy = False  # within the loss's noisy passes
        self._probe: Optional[torch.Tensor] = None  # per layer: sum |h|, sum of the noise's mean |.|, values
        self._terms: Optional[torch.Tensor] = None  # the last loss's three terms, on the device
        self._handles = [model.register_forward_pre_hook(self._catch_inputs, with_kwargs=True)]
        self._noise_handles: list = []

    @property
    def own_loss(self) -> bool:
        return True

    # The noise

    def _real(self, shape: tuple, device) -> torch.Tensor:
        """1 on the batch's real tokens, 0 on padding, shape (batch, length)."""
        mask = self._mask if self._mask is not None and tuple(self._mask.shape) == tuple(shape) else None
        return torch.ones(shape, device=device) if mask is None else mask.to(device).float()

    @torch.no_grad()
    def adaptive_scale(self, hidden: torch.Tensor) -> torch.Tensor:
        """Each value's noise std, fp32, zero on padding: the reference's adaptive_noise_injection with base_std
        s / sqrt(d), its mean var taken over each sequence's real tokens."""
        h = hidden.detach().float()
        batch, length, dim = h.shape
        real = self._real((batch, length), h.device)
        var = h.var(dim=-1)
        mean_var = self._sequence_sums(var * real) / self._real_lengths(real, (batch, length), h.device)
        factor = torch.exp(var / (mean_var + EPSILON)).clamp(max=FACTOR_CAP)
        median = h.median(dim=-1, keepdim=True).values
        deviation = (h - median).abs()
        mad = deviation.median(dim=-1, keepdim=True).values
        mad = torch.maximum(mad, EPSILON * h.norm(dim=-1, keepdim=True))
        weight = torch.exp(-self.cfg.beta * deviation / (mad + EPSILON))
        return (self.cfg.scale / math.sqrt(dim)) * mad * weight * (factor * real)[:, :, None]

    @torch.no_grad()
    def draw(self, hidden: torch.Tensor) -> torch.Tensor:
        """The noise for a layer's output `hidden`, fp32, from the kind's own stream."""
        unit = torch.randn(hidden.shape, generator=self._generator_on(hidden.device), device=hidden.device,
                           dtype=torch.float32)
        return unit * self.adaptive_scale(hidden)

    def _add_noise(self, module, args, output):
        if not (self._noisy and module.training):
            return None
        hidden = output[0] if isinstance(output, tuple) else output
        noisy = (hidden.float() + self.draw(hidden)).to(hidden.dtype)
        return (noisy, *output[1:]) if isinstance(output, tuple) else noisy

    def _hook_chosen(self) -> None:
        for handle in self._noise_handles:
            handle.remove()
        self._noise_handles = [self.stack[i].register_forward_hook(self._add_noise) for i in self.chosen]

    # The layers

    def _measure(self, index: int, module, args, output) -> None:
        hidden = output[0] if isinstance(output, tuple) else output
        real = self._real(hidden.shape[:2], hidden.device)
        values = real.sum() * hidden.shape[-1]
        signal = (hidden.detach().float().abs() * real[:, :, None]).sum()
        noise = HALF_NORMAL * self.adaptive_scale(hidden).sum()
        self._probe[index] += torch.stack([signal, noise, values]).to(self._probe)

    @torch.no_grad()
    def choose(self, forward: Callable[[dict], tuple], inputs: dict) -> None:
        """Each layer's SNR on this batch (all ranks' together), in eval mode, without noise; the chosen layers
        noised from now on, and logged once."""
        if getattr(self.model, "is_gradient_checkpointing", False):
            raise NoiseError(f"noise=noisefit cannot train with activation checkpointing on: {RERUN}")
        self._probe = torch.zeros(len(self.stack), 3, dtype=torch.float64)
        handles = [layer.register_forward_hook(functools.partial(self._measure, i))
                   for i, layer in enumerate(self.stack)]
        training = self.model.training
        self.model.eval()
        try:
            forward(dict(inputs))
        finally:
            self.model.train(training)
            for handle in handles:
                handle.remove()
        probe = all_reduce(self._probe, dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        self._probe = None
        values = probe[:, 2].clamp(min=1)
        snr = (probe[:, 0] / values) / (probe[:, 1] / values + EPSILON)
        self.snr = snr.tolist()
        self.chosen = snr_layers(snr, self.cfg.layers, self.cfg.snr)
        self._hook_chosen()
        log.info("noise=noisefit noises layers %s of %d (the %s SNR; every layer's: %s)", self.chosen,
                 len(self.stack), self.cfg.snr, ", ".join(f"{v:.4g}" for v in self.snr))
        self.log_event(0, {f"noise/noisefit_snr_layer{i}": self.snr[i] for i in self.chosen})

    # The loss

    def loss(self, forward, inputs, reduce):
        if self.chosen is None:
            self.choose(forward, inputs)
        ce, outputs = forward(dict(inputs))
        self._noisy = True
        try:
            noisy = [forward(dict(inputs))[1].logits for _ in range(2)]
        finally:
            self._noisy = False
        cut, mask = counted(outputs.logits, inputs)
        clean, first, second = cut(outputs.logits).detach(), cut(noisy[0]), cut(noisy[1])
        t = self.cfg.temperature
        soft = reduce((kl(clean, first, t) + kl(clean, second, t)) / 2, mask) * t ** 2  # the clean pass a target
        consistency = reduce(kl(second.detach(), first, t), mask) * t ** 2
        alpha = self.cfg.hybrid_alpha
        total = alpha * ce + (1 - alpha) * soft + self.cfg.lambda_consistency * consistency
        self._terms = torch.stack([ce.detach().float(), soft.detach(), consistency.detach()])
        return total, outputs

    def metrics(self) -> dict:
        if self._terms is None:
            return {}
        return dict(zip((CE.key, SOFT.key, CONSISTENCY.key), self._terms.tolist()))  # one host sync, at logging

    # Its state

    def state_dict(self) -> dict:
        """The noise stream's position and the chosen layers with every layer's SNR: a resumed run noises the same
        layers without measuring them again."""
        return {"rng": self._stream_state(), "layers": self.chosen, "snr": self.snr}

    def load_state_dict(self, state: dict) -> None:
        self._load_stream_state(state.get("rng"))
        if state.get("layers") is not None:
            self.chosen, self.snr = list(state["layers"]), state.get("snr")
            self._hook_chosen()

    def remove(self) -> None:
        for handle in self._handles + self._noise_handles:
            handle.remove()
        self._handles, self._noise_handles = [], []
        self._forget_inputs()
