"""Refuse non-finite losses and weights: stop on a NaN/inf train loss (or skip that batch's update), never save a
NaN/inf weight. Under torchrun the ranks agree on what any of them saw, in one collective before each optimizer
step, together with a stop signal (`StepAgreement`)."""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from ..core import measures
from ..core.dist import agree_on_first, all_max, local_rows
from ..core.errors import NeftlabError
from .signals import GracefulStop

log = logging.getLogger(__name__)


class NonFiniteError(NeftlabError, RuntimeError):
    """A NaN/inf loss or weight; the message gives the step."""


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Refuse to save NaN/inf weights. A sharded weight's check on one rank reads only its own rows, so the ranks
    agree on what any of them found: all raise, or none does (one rank alone would leave the others waiting in the
    collective save until torchrun kills them)."""
    bad, group = None, None
    for name, p in model.named_parameters():
        local, shard_group = local_rows(p, copy_ok=True)
        group = group or shard_group
        if bad is None and not torch.isfinite(local).all():
            bad = name
    bad = agree_on_first(bad, group)
    if bad is not None:
        raise NonFiniteError(f"parameter {bad} holds NaN/inf at step {step}; not saving it")


class NonFiniteGuard(TrainerCallback):
    """Stops on a NaN/inf train loss (or, with trainer.nonfinite_loss=skip, drops that step's gradient, up to
    trainer.max_skipped_steps times), and never lets a checkpoint with NaN/inf weights be written.

    The forward hook only accumulates a flag on the device (no host sync per forward); the loss itself is
    left alone, so under DDP/FSDP every rank still joins the gradient reduce. The flag is read on the host only
    where a decision needs it: before every optimizer step under torchrun (the ranks agree there) or to skip a
    batch; in one process that stops on a NaN (`fail`), at logging and save steps and at the end, from the first
    bad step kept on the device.
    """

    def __init__(self, model: torch.nn.Module, mode: str, max_skipped: int,
                 log_event: Callable[[int, dict], None]):
        self.model, self.mode, self.max_skipped, self.log_event = model, mode, max_skipped, log_event
        self.skipped = 0
        self.bad: Optional[torch.Tensor] = None  # this rank saw a NaN/inf loss since the last optimizer step
        self.first_bad: Optional[torch.Tensor] = None  # the first step with one, on the device (-1: none yet)
        self._hook = None

    def _check(self, module, args, output):
        loss = output.get("loss") if isinstance(output, dict) else None
        if module.training and loss is not None:
            bad = ~torch.isfinite(loss.detach()).all()
            self.bad = bad if self.bad is None else self.bad | bad

    def take_flag(self) -> float:
        flag, self.bad = (0.0 if self.bad is None else float(self.bad)), None
        return flag

    def note(self, step: int) -> None:
        """Keep, on the device, the first step whose loss was not finite; no host sync."""
        if self.bad is None:
            return
        if self.first_bad is None:
            self.first_bad = torch.full((), -1, dtype=torch.long, device=self.bad.device)
        self.first_bad = torch.where(self.bad & (self.first_bad < 0), step, self.first_bad)
        self.bad = None

    def check_noted(self) -> None:
        """Stop for a non-finite loss noted since training began (one process, `fail`)."""
        if self.first_bad is not None and (step := int(self.first_bad)) >= 0:
            self.decide(True, step)

    def decide(self, nonfinite: bool, step: int) -> None:
        """Act on the agreed flag: raise, or drop every gradient so that the optimizer moves nothing."""
        if not nonfinite:
            return
        if self.mode == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            log.warning("train loss is not finite at step %d on some rank: this step's update is skipped "
                        "(%d of %d skips)", step, self.skipped, self.max_skipped)
            self.log_event(step, {measures.SKIPPED_BATCHES.key: self.skipped})
            for p in self.model.parameters():
                p.grad = None  # AdamW skips parameters without a gradient: no momentum, no weight decay
            return
        extra = f" after {self.skipped} skipped batches (trainer.max_skipped_steps)" if self.mode == "skip" else ""
        raise NonFiniteError(f"train loss is not finite at step {step}{extra}; stopping "
                             "(trainer.nonfinite_loss=skip drops such batches instead)")

    def on_train_begin(self, args, state, control, **kwargs):
        self._hook = self.model.register_forward_hook(self._check)

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_save:
            self.check_noted()
        if control.should_save:
            check_finite_weights(self.model, state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.check_noted()
        self.remove()

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class StepAgreement(TrainerCallback):
    """Before each optimizer step: under torchrun, one collective over all ranks agrees on a NaN/inf loss and on a
    stop signal, so that every rank skips or stops at the same step. In one process nothing needs agreeing: the
    signal is already on the host, and the NaN flag stays on the device unless a skip needs it now. A signal that
    came after the last step's agreement is agreed on when training ends."""

    def __init__(self, guard: NonFiniteGuard, stopper: GracefulStop):
        self.guard, self.stopper = guard, stopper

    def _agree_on_signal(self, signum: float) -> None:
        if signum and not self.stopper.signum:
            self.stopper.signum = int(signum)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        step = state.global_step + 1
        if args.world_size == 1 and self.guard.mode == "fail":
            self._agree_on_signal(float(self.stopper.pending or 0))
            self.guard.note(step)
            return
        nonfinite, signum = all_max([self.guard.take_flag(), float(self.stopper.pending or 0)],
                                    distributed=args.world_size > 1)
        self._agree_on_signal(signum)
        self.guard.decide(bool(nonfinite), step)

    def on_train_end(self, args, state, control, **kwargs):
        self._agree_on_signal(all_max([float(self.stopper.pending or 0)], distributed=args.world_size > 1)[0])
