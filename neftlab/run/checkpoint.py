"""Checkpoints: what a rerun continues from.

A checkpoint is the Trainer's (weights, optimizer, scheduler, RNG, trainer state) plus `neftlab_rank<N>.pt`, the
state of every neftlab component that has one (the noise's random stream, alpha and the dynamic threshold, the
pruning masks), saved by each component itself (`state_dict`), per rank. It counts only once
`neftlab_complete.json`, written last, lists every file with its size: a save cut off by kill -9 or a full disk
has no marker, a file truncated later no longer has its size, a file damaged in place (a zeroed zip directory)
no longer parses, and each is skipped, named, in favour of the previous complete checkpoint. Checkpoints written
before the components kept their own state (`neftlab_state.pt` beside the rank files) still restore.

Nothing is trusted that a run directory merely holds: a checkpoint reached through a symbolic link, or holding
one, is never taken, and every file is loaded without running code (`files.load_torch`, the Trainer's own
`weights_only=True` loads).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional, Protocol

import torch
from transformers import TrainerCallback

from ..core import rundir
from ..core.dist import barrier
from ..core.files import UnreadableFile, atomic_write, is_temporary, link_below, load_torch, problem_with, \
    read_json, remove_tree, write_json
from ..core.rank import rank

log = logging.getLogger(__name__)

MARKER, TRAINER_STATE = rundir.MARKER, rundir.TRAINER_STATE
FORMAT = 2  # 1: neftlab_state.pt held alpha and threshold, the rank files rng and masks


class Stateful(Protocol):
    """A component that saves and restores its own state."""
    state_key: str

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N directories, newest first; none reached through a link."""
    folder = Path(run_dir) / rundir.CHECKPOINTS
    if not folder.is_dir() or link_below(folder, run_dir) is not None:
        return []
    found = [p for p in folder.glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit() and not p.is_symlink()]
    return sorted(found, key=step_of, reverse=True)


def problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from, or None when it is complete and intact."""
    if checkpoint.is_symlink():
        return f"{checkpoint} is a symbolic link"
    marker = read_json(checkpoint / MARKER, root=checkpoint)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return f"{checkpoint.name} is incomplete (no {MARKER}: its save was cut off)"
    for name, size in marker["files"].items():
        path = checkpoint / name
        if link_below(path, checkpoint) is not None:
            return f"{path} is a symbolic link"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is corrupt ({path.stat().st_size} bytes, {size} when saved)"
        if (why := problem_with(path)) is not None:
            return why
    for path in checkpoint.glob("neftlab_*.pt"):
        try:
            load_torch(path, root=checkpoint)
        except UnreadableFile as e:
            return str(e)
    return None


def usable_checkpoint(run_dir: Path) -> Optional[Path]:
    """The newest complete, intact checkpoint; each newer one skipped is named in the log."""
    for checkpoint in checkpoints(run_dir):
        why = problem(checkpoint)
        if why is None:
            return checkpoint
        log.warning("Skipping %s: %s", checkpoint, why)
    return None


def training_done(checkpoint: Path) -> bool:
    """Whether the checkpoint was taken at the run's last step (then a rerun only evaluates)."""
    state = read_json(checkpoint / TRAINER_STATE, root=checkpoint) or {}
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def mark_complete(checkpoint: Path, keep: Optional[int]) -> None:
    """Write the marker listing every file of `checkpoint`, then delete older checkpoints beyond `keep`
    complete ones (and any incomplete ones older than this), so the last complete one is never lost."""
    run_dir = checkpoint.parent.parent
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MARKER and not is_temporary(p)}
    write_json(checkpoint / MARKER, {"files": sizes}, root=run_dir)
    complete = 0
    for older in checkpoints(run_dir):
        if older == checkpoint or (older / MARKER).exists():
            complete += 1
            if keep is None or complete <= keep:
                continue
        elif step_of(older) > step_of(checkpoint):
            continue  # a newer save in progress elsewhere is not ours to judge
        remove_tree(older, root=run_dir)


def legacy_states(checkpoint: Path, own: dict) -> dict:
    """A checkpoint of format 1 (neftlab_state.pt: alpha and threshold; the rank file: rng and masks) as the
    components' states."""
    shared = load_torch(checkpoint / rundir.STATE_FILE, root=checkpoint)
    return {"noise": {"rng": own.get("noise_rng"), "alpha": shared["noise_alpha"],
                      "dynamic": {"threshold": shared["noise_threshold"]}},
            "pruning": {"masks": own.get("pruning_masks")}}


def one_noise_state(states: dict) -> dict:
    """The noise kind's state in one piece: until 2026-12 its random stream was saved under `noise` and its alpha
    and dynamic threshold under `noise_control`, by a callback of their own."""
    if "noise_control" not in states:
        return states
    states = dict(states)
    control = states.pop("noise_control") or {}
    states["noise"] = {**(states.get("noise") or {}), **control}
    return states


class StateCheckpoint(TrainerCallback):
    """Saves and restores what the Trainer does not: each component's own state (`Stateful`), per rank; then marks
    the checkpoint complete and rotates old ones (the Trainer's own rotation would run before the marker)."""

    def __init__(self, components: list[Stateful], keep: Optional[int]):
        self.components = {c.state_key: c for c in components}
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        run_dir = folder.parent.parent
        states = {"format": FORMAT, "states": {key: c.state_dict() for key, c in self.components.items()}}
        atomic_write(folder / rundir.rank_state(rank()), lambda tmp: torch.save(states, tmp), root=run_dir)
        if args.world_size > 1:
            barrier()  # every rank's part is on disk before rank 0 marks the checkpoint complete
        if state.is_world_process_zero:
            mark_complete(folder, self.keep)

    def load(self, checkpoint: Path) -> None:
        """Each component's state from `checkpoint`, this rank's file. A component the checkpoint has no state for
        (an older neftlab that did not have it) keeps its own start."""
        own = load_torch(checkpoint / rundir.rank_state(rank()), root=checkpoint)
        states = one_noise_state(own["states"]) if own.get("format") == FORMAT else legacy_states(checkpoint, own)
        for key, component in self.components.items():
            if states.get(key) is not None:
                component.load_state_dict(states[key])
        log.info("Restored the state of %s from %s", ", ".join(k for k in self.components if states.get(k)),
                 checkpoint.name)


def save_checkpoint(trainer) -> None:
    """A complete checkpoint at the current step, unless one is there: what a rerun continues from."""
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not (folder / MARKER).exists():
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)
