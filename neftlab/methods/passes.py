"""The one Trainer subclass: a noise kind's say over each training step, through the Trainer's own steps.

Passes: FreeLB's K ascent passes and antithetic noise's x + eps and x - eps (`noise.antithetic`) take several
forward and backward passes per batch. The perturbation is a forward hook on the embedding that knows which pass
it is in (`next_pass`, `reset`); this class only repeats the Trainer's own `training_step`, so gradient
accumulation, mixed precision, LoRA, DDP (one gradient all-reduce per batch: the passes before the last run under
`no_sync`) and the non-finite guard act as on any step. Each pass's loss is divided by the number of passes, so the
parameters' gradients are the mean over the passes, and the memory is that of one pass: the passes run one after
the other, not as a bigger batch.

Loss terms: within a pass the kind computes the loss (`NoiseKind.loss`) from the Trainer's own forward, so a kind
may run more forwards and add terms to it (a consistency term, NoiseFiT's hybrid loss), reduced over tokens the way
the Trainer reduces its cross-entropy (`token_mean`)."""

from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from transformers import Trainer


class PassesTrainer(Trainer):
    """The Trainer, with the run's noise kind (`noise`) computing each training loss and driving its passes when it
    has more than one; without `noise`, the plain Trainer."""

    def __init__(self, *args, noise: Optional[Any] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.noise = noise

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.noise is None or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

        def forward(batch: dict):
            return super(PassesTrainer, self).compute_loss(model, batch, True, num_items_in_batch)

        def reduce(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self.token_mean(values, mask, num_items_in_batch)

        loss, outputs = self.noise.loss(forward, inputs, reduce)
        if self.noise.driven:
            loss = loss / self.noise.passes
        return (loss, outputs) if return_outputs else loss

    def token_mean(self, values: torch.Tensor, mask: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
        """The mean of a per-token term over the tokens `mask` marks, weighted as the Trainer weighs its
        cross-entropy: when it counts the label tokens of the whole step (`num_items_in_batch`, over the
        accumulated micro-batches and, with `average_tokens_across_devices`, the ranks), the sum over this
        micro-batch divided by that count, scaled as the Trainer scales its loss; otherwise this micro-batch's mean,
        which the Trainer divides by the accumulation steps like its own loss."""
        mask = mask.to(values.dtype)
        total = (values * mask).sum()
        if num_items_in_batch is None or not (self.model_accepts_loss_kwargs or self.compute_loss_func):
            return total / mask.sum().clamp(min=1)
        total = total / num_items_in_batch
        if self.args.average_tokens_across_devices:
            total = total * (self.accelerator.num_processes // self.get_tp_size() if self.args.n_gpu <= 1
                             else self.args.n_gpu)
        return total

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.noise is None or not self.noise.driven:
            return super().training_step(model, inputs, num_items_in_batch)
        count = self.noise.passes
        total = None
        try:
            for k in range(count):
                last = k == count - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, dict(inputs), num_items_in_batch)
                total = loss if total is None else total + loss
                if not last:
                    self.noise.next_pass()
        finally:
            self.noise.reset()
        return total
