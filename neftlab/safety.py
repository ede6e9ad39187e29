"""Nothing lost: resume from checkpoints, stop cleanly on SIGTERM/SIGINT, refuse non-finite losses and weights.

A checkpoint is the Trainer's (weights, optimizer, scheduler, RNG, trainer state) plus
`neftlab_state.pt`: the live noise alpha and threshold and the pruning masks. The dynamic-alpha
step counter and the pruning schedule position are the global step, which the Trainer restores.

`trainer.resume=auto` (the default) continues, in its own directory, the newest unfinished run
(interrupted or killed, with a checkpoint) whose resolved config equals this one, so rerunning
an interrupted command picks up where it stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from .config import ConfigError, rank

log = logging.getLogger(__name__)

STATE_FILE = "neftlab_state.pt"
MIN_FREE_BYTES = 200 * 2**20


class NonFiniteError(RuntimeError):
    """A NaN/inf loss or weight; the message gives the step."""


class Interrupted(Exception):
    def __init__(self, signum: int, step: int):
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; a checkpoint was saved, "
                         "rerun the same command to resume")
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


# ----------------------------------------------------------------- resume

@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path

    @property
    def step(self) -> int:
        return _step(self.checkpoint)


def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def last_checkpoint(run_dir: Path) -> Optional[Path]:
    checkpoints = [p for p in (run_dir / "checkpoints").glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(checkpoints, key=_step, default=None)


def _comparable(config) -> dict:
    plain = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    plain.get("trainer", {}).pop("resume", None)
    return plain


def _unfinished(run_dir: Path) -> bool:
    """Interrupted, or killed before it could write a summary, and not still running here."""
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text()).get("status") == "interrupted"
    pid = run_dir.name.rsplit("_", 1)[-1]  # run directories end in the pid of the process (or launcher) running them
    if pid.isdigit() and int(pid) not in (os.getpid(), os.getppid()):
        try:
            os.kill(int(pid), 0)
            return False  # that process is alive: a run in progress, not one to take over
        except ProcessLookupError:
            pass
        except PermissionError:
            return False
    return True


def find_resume(setting, config, run_dir: Path) -> Optional[Resume]:
    """The run to continue for trainer.resume=`setting` (auto | true | false | a run or checkpoint dir)."""
    if setting is False or setting == "false":
        return None
    if setting not in (True, "auto", "true"):
        path = Path(setting).expanduser()
        checkpoint = path if (path / "trainer_state.json").exists() else last_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"trainer.resume={setting}: no checkpoint there (expected a run directory with "
                              "checkpoints/checkpoint-N, or a checkpoint-N directory)")
        return Resume(checkpoint.parent.parent, checkpoint)
    wanted = _comparable(config)
    # This run's directory, its siblings (outputs/runs/*), and the jobs of sibling sweeps (outputs/multiruns/*/N).
    candidates = {run_dir, *run_dir.parent.glob("*"), *run_dir.parent.parent.glob("*/*")}
    found = []
    for candidate in candidates:
        config_file = candidate / ".hydra" / "config.yaml"
        checkpoint = last_checkpoint(candidate) if config_file.exists() else None
        if checkpoint is not None and _unfinished(candidate):
            try:
                same = _comparable(OmegaConf.load(config_file)) == wanted
            except Exception:  # an old run whose config no longer resolves is simply not a match
                same = False
            if same:
                found.append(Resume(candidate, checkpoint))
    if not found:
        if setting in (True, "true"):
            raise ConfigError("trainer.resume=true: no interrupted run with this config and a checkpoint was found "
                              f"near {run_dir}; pass trainer.resume=<run dir> or trainer.resume=auto")
        return None
    return max(found, key=lambda r: r.checkpoint.stat().st_mtime)


# --------------------------------------------------------------- callbacks

class StateCheckpoint(TrainerCallback):
    """Saves and restores what the Trainer does not: noise alpha and threshold, pruning masks."""

    def __init__(self, noise_callback, pruner):
        self.noise_callback, self.pruner = noise_callback, pruner

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        # Every rank has its own noise stream; masks are per rank too when the weights are sharded.
        torch.save({"noise_rng": self.noise_callback.noise.rng_state(),
                    "pruning_masks": [m.contiguous() for m in self.pruner.masks] if self.pruner else None},
                   folder / f"neftlab_rank{rank()}.pt")
        if state.is_world_process_zero:
            dynamic = self.noise_callback.dynamic
            torch.save({"noise_alpha": self.noise_callback.noise.alpha,
                        "noise_threshold": dynamic.threshold if dynamic else None}, folder / STATE_FILE)

    def load(self, checkpoint: Path) -> None:
        saved = {**torch.load(checkpoint / STATE_FILE, weights_only=True),
                 **torch.load(checkpoint / f"neftlab_rank{rank()}.pt", weights_only=True)}
        self.noise_callback.noise.set_rng_state(saved["noise_rng"])
        self.noise_callback.noise.alpha = saved["noise_alpha"]
        if self.noise_callback.dynamic is not None:
            self.noise_callback.dynamic.threshold = saved["noise_threshold"]
        if self.pruner is not None and saved["pruning_masks"] is not None:
            self.pruner.masks = saved["pruning_masks"]
        log.info("Restored noise alpha %.4f and %s from %s", saved["noise_alpha"],
                 "pruning masks" if saved["pruning_masks"] is not None else "no pruning masks", checkpoint.name)


class GracefulStop(TrainerCallback):
    """On SIGTERM (preemption) or SIGINT (Ctrl-C) finish the current step, save a checkpoint and stop.

    A second Ctrl-C stops at once.
    """

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        self.signum = signum
        log.warning("%s received: saving a checkpoint after this step, then stopping", signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def on_train_begin(self, args, state, control, **kwargs):
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)

    def on_step_end(self, args, state, control, **kwargs):
        signum = self.signum or 0
        if args.world_size > 1:  # every rank must stop at the same step, or the others wait in a collective forever
            flag = torch.tensor([signum], device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag)
        if signum:
            self.signum = signum
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise NonFiniteError(f"parameter {name} holds NaN/inf at step {step}; not saving it")


class NonFiniteGuard(TrainerCallback):
    """Stops on a NaN/inf train loss (or, with trainer.nonfinite_loss=skip, drops that batch's gradient, up
    to trainer.max_skipped_steps times), and never lets a checkpoint with NaN/inf weights be written."""

    def __init__(self, model: torch.nn.Module, mode: str, max_skipped: int,
                 log_event: Callable[[int, dict], None]):
        self.model, self.mode, self.max_skipped, self.log_event = model, mode, max_skipped, log_event
        self.skipped, self.step = 0, 0
        self._hook = None

    def _check(self, module, args, output):
        loss = output.get("loss") if isinstance(output, dict) else None
        if not module.training or loss is None or torch.isfinite(loss).all():
            return None
        step = self.step + 1
        if self.mode == "skip" and self.skipped < self.max_skipped:
            self.skipped += 1
            log.warning("train loss is %s at step %d: this batch contributes no gradient (%d of %d skips)",
                        loss.item(), step, self.skipped, self.max_skipped)
            self.log_event(step, {"train/skipped_batches": self.skipped})
            # A fresh leaf: backward reaches no parameter, so their grads stay None and AdamW leaves them alone.
            output["loss"] = torch.zeros((), device=loss.device, requires_grad=True)
            return output
        extra = f" after {self.skipped} skipped batches (trainer.max_skipped_steps)" if self.mode == "skip" else ""
        raise NonFiniteError(f"train loss is {loss.item()} at step {step}{extra}; stopping "
                             "(trainer.nonfinite_loss=skip drops such batches instead)")

    def on_train_begin(self, args, state, control, **kwargs):
        self._hook = self.model.register_forward_hook(self._check)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step = state.global_step

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_save:
            check_finite_weights(self.model, state.global_step)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
