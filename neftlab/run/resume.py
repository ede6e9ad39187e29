"""Which run a job continues, and what it does with a directory that already holds one.

`trainer.resume=auto` (the default) continues the newest unfinished run (interrupted; killed and no longer running;
or failed after its training was checkpointed, so that the fixed command only evaluates) under the output root
(`output_root`, outputs/) or in the job's own directory, owned by this user, that is the same run as this one
(`fingerprint.Identity`: config, data, base model). `trainer.resume=<dir>` names the run or checkpoint. Each run it
takes is claimed first (`claim.RunLock`), so two reruns never continue one run; a run that cannot be claimed
because its directory is read-only is passed over, or, named explicitly, refused in one line.

A completed run is never written into again; a directory holding another config's run is refused, except a failed
run that kept nothing (no checkpoint, no model), which the new run replaces.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ..core import rundir
from ..core.claim import RunLock, describe
from ..core.errors import ConfigError
from ..core.files import link_below, read_json, remove_tree
from .checkpoint import checkpoints, problem, step_of, usable_checkpoint
from .fingerprint import Identity, config_differences, saved_config

log = logging.getLogger(__name__)


@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path
    lock: RunLock

    @property
    def step(self) -> int:
        return step_of(self.checkpoint)

    def keeps(self, row: dict) -> bool:
        """Whether this checkpoint already accounts for an event or answer: the training's own, up to its step.
        The final evaluation's are dropped, since a resumed run evaluates again."""
        return row["step"] <= self.step and row.get("stage", rundir.TRAIN) == rundir.TRAIN


class Refused(ConfigError):
    """The job's directory is another run's, or in use: said in one line, and nothing is written."""


class Busy(Refused):
    """The run is another live process's (training it, resuming it): this job leaves it to that one."""


class ReadOnlyRun(Refused):
    """A run whose directory cannot be written: archived, snapshotted, mounted read-only."""


def claim(run_dir: Path, take_over: bool = False, purpose: str = "run"
          ) -> tuple[RunLock, Optional[tuple[dict, float]]]:
    """(the lock, None when it was acquired, else its holder and age): `RunLock(run_dir).acquire`, with a
    read-only directory told as such (`ReadOnlyRun`)."""
    lock = RunLock(run_dir)
    try:
        return lock, lock.acquire(take_over, purpose)
    except OSError as e:
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise ReadOnlyRun(f"{run_dir} is read-only ({e.strerror}): a run there cannot be resumed in place; copy it "
                              "to a writable place and pass trainer.resume=<the copy>, or start a new run with "
                              "trainer.resume=false") from None
        raise


def run_dirs(root: Path) -> list[Path]:
    """The run directories under the output root, as neftlab lays them out: runs/X, multiruns/X/N,
    experiments/S/N and a search's experiments/S/T/N; none reached through a link."""
    found = [p.parent for depth in range(1, 5) for p in Path(root).glob("/".join(["*"] * depth) + "/"
                                                                         + rundir.FINGERPRINT)]
    return [p for p in found if link_below(p, root) is None]


def owner_name(path: Path) -> Optional[str]:
    """The other user who owns `path`, or None when it is this user's: a run is never taken over from another."""
    uid = path.stat().st_uid
    if uid == os.getuid():
        return None
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _explicit(setting: str, identity: Identity, take_over: bool) -> Resume:
    path = Path(setting).expanduser()
    key = f"trainer.resume={setting}"
    if path.name.startswith("checkpoint-") and path.parent.name == rundir.CHECKPOINTS:
        run_dir, checkpoint = path.parent.parent, path
        why = problem(checkpoint) if checkpoint.is_dir() else f"{checkpoint} does not exist"
        if why:
            raise ConfigError(f"{key}: cannot resume from it: {why}")
    else:
        run_dir, checkpoint = path, usable_checkpoint(path)
        if checkpoint is None:
            raise ConfigError(f"{key}: no complete checkpoint there (expected a run directory with "
                              "checkpoints/checkpoint-N, or a checkpoint-N directory)")
    if rundir.status(run_dir) == "completed":
        raise ConfigError(f"{key}: that run is completed, and a completed run is never written into again; "
                          "start a new run (trainer.resume=false)")
    if (other := owner_name(run_dir)) is not None:
        raise ConfigError(f"{key}: that run belongs to the user {other}; a run is never taken over from another user")
    differences = identity.config_differences(run_dir) or []
    if differences:
        raise ConfigError(f"{key}: that run's config differs in {'; '.join(differences)}; resume it with its own "
                          "config, or start a new run (trainer.resume=false)")
    if changes := identity.content_changes(run_dir):
        raise ConfigError(f"{key}: {'; '.join(changes)} since that run started; restore them, or start a new run "
                          "(trainer.resume=false)")
    lock, held = claim(run_dir, take_over, purpose="resume")
    if held is not None:
        raise ConfigError(f"{key}: that run is in use by {describe(*held)}; if that process is gone (a node that "
                          f"died, a container that was replaced), take the run over with trainer.resume={run_dir} "
                          "trainer.take_over=true")
    return Resume(run_dir, checkpoint, lock)


def _candidates(identity: Identity, out_dir: Path, root: Path) -> list[tuple[Path, Path]]:
    """(run, its newest usable checkpoint) of every run auto-resume may continue, newest checkpoint first."""
    found = []
    for candidate in {Path(out_dir), *run_dirs(root)}:
        if not (candidate / rundir.CONFIG).exists() or not checkpoints(candidate):
            continue
        if rundir.status(candidate) not in (None, "absent", "interrupted", "failed") or owner_name(candidate):
            continue
        if identity.config_differences(candidate) != []:
            continue
        if changes := identity.content_changes(candidate):
            log.warning("Not resuming %s: it has this config, but %s", candidate, "; ".join(changes))
            continue
        checkpoint = usable_checkpoint(candidate)
        if checkpoint is not None:
            found.append((checkpoint.stat().st_mtime, candidate, checkpoint))
    return [(run, checkpoint) for _, run, checkpoint in sorted(found, reverse=True)]


def find_resume(setting: Any, identity: Identity, out_dir: Path, root: Path, take_over: bool = False
                ) -> Optional[Resume]:
    """The run to continue for trainer.resume=`setting` (auto | true | false | a run or checkpoint dir), claimed.
    Auto looks in the job's own directory and among this user's runs under the output root `root`, nowhere else."""
    if setting is False or setting == "false":
        return None
    if setting not in (True, "auto", "true"):
        return _explicit(str(setting), identity, take_over)
    for candidate, checkpoint in _candidates(identity, out_dir, root):
        try:
            lock, held = claim(candidate, take_over and candidate == Path(out_dir), purpose="resume")
        except ReadOnlyRun as e:
            if candidate == Path(out_dir):
                raise
            log.warning("Not resuming %s: %s", candidate, e)
            continue
        if held is None:
            if rundir.status(candidate) == "completed":  # finished by its holder while this job looked
                lock.release()
                continue
            return Resume(candidate, checkpoint, lock)
        if held[0].get("purpose") == "resume":  # another rerun of the same command got there first
            raise Busy(f"{candidate}, this config's interrupted run, is being resumed by {describe(*held)}: "
                              "nothing to do here (trainer.resume=false starts another run of the same config)")
        if candidate != Path(out_dir):  # the job's own directory in use: the job itself says so
            log.warning("Not resuming %s: it is in use by %s; starting a new run in %s (if that process is gone, "
                        "take the run over with trainer.resume=%s trainer.take_over=true)", candidate, describe(*held),
                        out_dir, candidate)
    if setting in (True, "true"):
        raise ConfigError("trainer.resume=true: no unfinished run with this config and data and a complete "
                          f"checkpoint was found in {out_dir} or under {root}; pass trainer.resume=<run dir> or "
                          "trainer.resume=auto")
    return None


@dataclass
class Occupied:
    """What a job does with an output directory that already holds a run: `reuse` its result (completed, the same
    run), `retrain` it (unfinished, the same run, no checkpoint to continue from), `replace` it (failed, another
    config, nothing kept), or `refuse`, with the one line to say."""
    action: str
    message: str = ""
    summary: Optional[dict] = None


def kept_something(run_dir: Path) -> bool:
    """Whether a run kept trained weights: a checkpoint or a model."""
    return bool(checkpoints(run_dir)) or (Path(run_dir) / rundir.MODEL).exists()


def occupant(run_dir: Path, identity: Identity) -> Optional[Occupied]:
    """The decision for a job pointed at `run_dir`, taken before anything is written there; None when the
    directory holds no run."""
    status = rundir.status(run_dir)
    if status == "absent":
        return None
    if status == "unreadable":
        return Occupied("refuse", f"output directory {run_dir} holds a run whose {rundir.SUMMARY} is unreadable: its "
                                  "files are left as they are; choose another hydra.run.dir")
    differences = identity.differences(run_dir)
    if differences is None:
        differences = ["it has no readable .hydra/config.yaml"]
    state = status or "unfinished"
    what = f"{'an' if state[0] in 'aeiou' else 'a'} {state} run"
    if differences:
        if status == "failed" and not kept_something(run_dir):
            return Occupied("replace", f"{run_dir} holds a failed run of another config that kept no checkpoint or "
                                       "model: replacing it")
        how = "" if status == "completed" else "resume it with its own config, or "
        return Occupied("refuse", f"output directory {run_dir} already holds {what} with another config "
                                  f"({'; '.join(differences)}); a run's files are never overwritten: {how}choose "
                                  "another hydra.run.dir")
    if status == "completed":
        changed = config_differences((saved_config(run_dir) or {}).get("eval", {}),
                                     OmegaConf.to_container(OmegaConf.create(identity.config), resolve=True).get("eval", {}))
        hint = (f" (its eval.* keys differ: {'; '.join(changed)}; evaluate it again with python -m neftlab.evaluate "
                f"{run_dir} eval.KEY=VALUE)") if changed else ""
        return Occupied("reuse", f"{run_dir} is already completed with this config: its result is reused, nothing is "
                                 f"trained{hint}", read_json(Path(run_dir) / rundir.SUMMARY, root=run_dir))
    why = "failed before its training was checkpointed" if status == "failed" else \
        "was stopped before its first complete checkpoint"
    return Occupied("retrain", f"{run_dir} {why}: training it again from step 0")


def clear(run_dir: Path) -> None:
    """Remove a run's files from its directory (never following a link), all but the claim of the job replacing it."""
    for entry in Path(run_dir).iterdir():
        if entry.name != rundir.LOCK:
            remove_tree(entry, root=run_dir)
