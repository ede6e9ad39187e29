"""Stop cleanly on any stop signal: a scheduler's preemption, Ctrl-C, a closed terminal, a cluster's warning.

Under torchrun every rank must take the same decision at the same step, or the others wait in a collective until
the NCCL timeout: each rank only notes the signal it saw, and the ranks agree on it (`nonfinite.StepAgreement`
during training, `GracefulStop.agree` in the final evaluation) before anyone acts.
"""

from __future__ import annotations

import contextlib
import logging
import signal
from typing import Optional

from transformers import TrainerCallback

from ..core.dist import all_max

log = logging.getLogger(__name__)


class Interrupted(BaseException):
    """Raised from the signal handler wherever the main thread is. A BaseException, as KeyboardInterrupt is, so
    that a library's `except Exception` around that spot (transformers' collators re-raise anything as a
    ValueError) cannot turn a SIGTERM into a failed run."""

    def __init__(self, signum: int, step: int, saved: bool = True):
        resume = "a checkpoint was saved, rerun the same command to resume" if saved else "nothing to resume"
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; {resume}")
        self.signum, self.step = signum, step


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

    def on_epoch_end(self, args, state, control, **kwargs):
        """The Trainer ends the epoch it stops in, and with `eval_strategy=epoch` evaluates there: an evaluation
        in mid-epoch that the uninterrupted run never makes. A stopping run skips it (this callback comes after
        the Trainer's own flow callback, which asked for it)."""
        if self.signum:
            control.should_evaluate = False

    def on_train_end(self, args, state, control, **kwargs):
        self.training = False
