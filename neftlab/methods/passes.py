"""Several forward and backward passes per batch, for the perturbations that need them: FreeLB's K ascent passes
and antithetic noise's x + eps and x - eps (`noise.antithetic`). The perturbation is a forward hook on the
embedding that knows which pass it is in (`next_pass`, `reset`); this small Trainer subclass only repeats the
Trainer's own `training_step`, so gradient accumulation, mixed precision, LoRA, DDP (one gradient all-reduce per
batch: the passes before the last run under `no_sync`) and the non-finite guard act as on any step. Each pass's
loss is divided by the number of passes, so the parameters' gradients are the mean over the passes, and the
memory is that of one pass: the passes run one after the other, not as a bigger batch."""

from __future__ import annotations

import contextlib
from typing import Optional, Protocol

from transformers import Trainer


class Passes(Protocol):
    passes: int

    def next_pass(self) -> None: ...

    def reset(self) -> None: ...


class PassesTrainer(Trainer):
    """The Trainer with `passes.passes` passes per batch when it is built with `passes`; otherwise the plain
    Trainer."""

    def __init__(self, *args, passes: Optional[Passes] = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.passes = passes

    def compute_loss(self, model, inputs, *args, **kwargs):
        out = super().compute_loss(model, inputs, *args, **kwargs)
        if self.passes is None or not model.training:
            return out
        if isinstance(out, tuple):
            return (out[0] / self.passes.passes, *out[1:])
        return out / self.passes.passes

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.passes is None:
            return super().training_step(model, inputs, num_items_in_batch)
        count = self.passes.passes
        total = None
        try:
            for k in range(count):
                last = k == count - 1
                with contextlib.nullcontext() if last else self.accelerator.no_sync(model):
                    loss = super().training_step(model, dict(inputs), num_items_in_batch)
                total = loss if total is None else total + loss
                if not last:
                    self.passes.next_pass()
        finally:
            self.passes.reset()
        return total
