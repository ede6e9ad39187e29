"""Run-time guards: stop cleanly on any stop signal, refuse non-finite losses and weights, refuse an unusable
output directory.

Under torchrun every rank must take the same decision at the same step, or the others wait in a
collective until the NCCL timeout. So each rank only notes what it saw (a signal, a NaN/inf loss) and
`StepAgreement` reduces both flags over all ranks in one collective before the optimizer step; the
stop and the skip then act on the agreed values only.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
from pathlib import Path
from typing import Callable, Optional

import torch
from transformers import TrainerCallback

from .config import ConfigError
from .errors import NeftlabError
from .sharding import agree_on_first, all_max, local_rows

log = logging.getLogger(__name__)

MIN_FREE_BYTES = 200 * 2**20


class NonFiniteError(NeftlabError, RuntimeError):
    """A NaN/inf loss or weight; the message gives the step."""


class Interrupted(BaseException):
    """Raised from the signal handler wherever the main thread is. A BaseException, as KeyboardInterrupt is, so
    that a library's `except Exception` around that spot (transformers' collators re-raise anything as a
    ValueError) cannot turn a SIGTERM into a failed run."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        resume = "a checkpoint was saved, rerun the same command to resume" if saved else "nothing to resume"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {resume}")
        self.signum, self.step = signum, step


def check_output_dir(path: Path) -> None:
    """Fail before anything loads when the run directory cannot be created, written or has no room."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"output directory {path} is not writable: {e.strerror or e}") from None
    free = shutil.disk_usage(path).free
    if free < MIN_FREE_BYTES:
        raise ConfigError(f"output directory {path} has {free / 2**20:.0f} MiB free, less than the "
                          f"{MIN_FREE_BYTES / 2**20:.0f} MiB a run needs for its files and checkpoints")


# Signals that end a run: a scheduler's preemption (SIGTERM), Ctrl-C, a closed terminal or dropped ssh (SIGHUP),
# and the early warnings clusters send before the end of a job's time (SIGUSR1/2, `sbatch --signal`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


class GracefulStop(TrainerCallback):
    """Every stop signal (STOP_SIGNALS), from `with stopper:` on.

    During training a signal is only noted: the step finishes, a checkpoint is saved and training stops (at the
    same step on every rank). Outside training (loading, final evaluation) it raises `Interrupted` at once, or,
    under torchrun in the final evaluation (`deferring`), at the next point all ranks agree on it (`agree`).
    While the stop's own checkpoint is written (`finishing`), further signals are held: a repeated SIGTERM
    would cut the checkpoint the rerun needs. A second Ctrl-C stops at once, also there.
    """

    def __init__(self):
        self.pending: Optional[int] = None  # seen by this rank, not yet agreed
        self.signum: Optional[int] = None  # agreed by all ranks: training stops
        self.step = 0
        self.training = False
        self.holding = False
        self.deferred = False  # under torchrun, in the final evaluation: noted, agreed at `agree`
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.pending == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        if self.holding:
            log.warning("%s received while the stop's checkpoint is written: finishing it first%s", name,
                        " (Ctrl-C again abandons it)" if signum == signal.SIGINT else "")
            self.pending = signal.SIGINT if signum == signal.SIGINT else self.pending
            return
        self.pending = self.pending or signum
        if self.deferred:
            log.warning("%s received: every rank stops at the evaluation's next agreed point, then saves a "
                        "checkpoint", name)
            return
        if not self.training:
            raise Interrupted(signum, self.step, saved=False)
        log.warning("%s received: saving a checkpoint after this step, then stopping", name)

    @contextlib.contextmanager
    def deferring(self, distributed: bool):
        """Under torchrun, during the final evaluation: a signal is only noted, and `agree` stops every rank at
        the same point (raising wherever each rank is would leave them in different collectives: synced
        generation makes every forward one, and the checkpoint after the stop is a collective save)."""
        self.deferred = distributed
        try:
            yield
        finally:
            self.deferred = False

    def agree(self, step: int) -> None:
        """A point every rank reaches alike: if any rank has a signal, all raise `Interrupted` here."""
        if self.deferred and (signum := int(all_max([float(self.pending or 0)], distributed=True)[0])):
            raise Interrupted(signum, step, saved=False)

    @contextlib.contextmanager
    def finishing(self):
        """Signals are held while the block (the stop's checkpoint) runs."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False

    def __enter__(self) -> "GracefulStop":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.training = True

    def on_step_end(self, args, state, control, **kwargs):
        self.step = state.global_step
        if self.signum:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False


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
            self.log_event(step, {"train/skipped_batches": self.skipped})
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
