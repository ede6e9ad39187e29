"""Resume: find, claim and validate the run and the checkpoint to continue.

A checkpoint is the Trainer's (weights, optimizer, scheduler, RNG, trainer state) plus neftlab's
`neftlab_state.pt` (noise alpha and threshold) and `neftlab_rank<N>.pt` (each rank's noise stream and
pruning masks). It counts only once `neftlab_complete.json`, written last, lists every file with its
size: a save cut off by kill -9 or a full disk has no marker, a file truncated later no longer has its
size, and either is skipped, named, in favour of the previous complete checkpoint.

`trainer.resume=auto` (the default) continues the newest unfinished run (interrupted, or killed and no
longer running) whose config and data fingerprints equal this run's. A run is claimed by creating its
`run.lock` exclusively (host, pid and job inside), so two reruns never continue one run; the lock of a
process that is gone is stale and taken over. A completed run is never written into again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from . import rundir
from .cache import file_sha256
from .config import ConfigError, rank, run_id

log = logging.getLogger(__name__)

from .rundir import FINGERPRINT, LOCK, MARKER, STATE_FILE


# ------------------------------------------------------------- fingerprints

def comparable_config(config) -> dict:
    """The resolved config less what may change between an interruption and its rerun."""
    plain = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    plain.get("trainer", {}).pop("resume", None)
    return plain


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(comparable_config(config), sort_keys=True, default=str).encode()).hexdigest()


def data_fingerprint(path: Optional[Path], hub: Optional[str] = None) -> dict:
    """What the run reads: a local file's path, size and content hash, or the hub dataset's name."""
    if path is None:
        return {"hub": hub}
    return {"path": str(Path(path).resolve()), "size": Path(path).stat().st_size, "sha256": file_sha256(path)}


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def record(run_dir: Path, config, data: dict) -> None:
    """Write the run's fingerprints, which a later auto-resume compares against."""
    if rank() == 0:
        rundir.write_json(run_dir / FINGERPRINT, {"config": config_hash(config), "data": data})


# --------------------------------------------------------------- checkpoints

def _step(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint-N directories, newest first."""
    found = [p for p in (run_dir / rundir.CHECKPOINTS).glob("checkpoint-*") if p.name.rsplit("-", 1)[1].isdigit()]
    return sorted(found, key=_step, reverse=True)


def problem(checkpoint: Path) -> Optional[str]:
    """Why `checkpoint` cannot be resumed from, or None when it is complete and intact."""
    marker = rundir.read_json(checkpoint / MARKER)
    if not isinstance(marker, dict) or not isinstance(marker.get("files"), dict):
        return f"{checkpoint.name} is incomplete (no {MARKER}: its save was cut off)"
    for name, size in marker["files"].items():
        path = checkpoint / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is corrupt ({path.stat().st_size} bytes, {size} when saved)"
    for path in checkpoint.glob("neftlab_*.pt"):
        try:
            torch.load(path, weights_only=True)
        except Exception as e:
            return f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    for path in checkpoint.glob("*.safetensors"):
        try:
            from safetensors import safe_open
            with safe_open(str(path), framework="pt"):
                pass
        except Exception as e:
            return f"{path} is corrupt ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
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
    state = rundir.read_json(checkpoint / rundir.TRAINER_STATE) or {}
    return 0 < state.get("max_steps", 0) <= state.get("global_step", 0)


def mark_complete(checkpoint: Path, keep: Optional[int]) -> None:
    """Write the marker listing every file of `checkpoint`, then delete older checkpoints beyond `keep`
    complete ones (and any incomplete ones older than this), so the last complete one is never lost."""
    sizes = {str(p.relative_to(checkpoint)): p.stat().st_size for p in sorted(checkpoint.rglob("*"))
             if p.is_file() and p.name != MARKER and not p.name.startswith(".")}
    rundir.write_json(checkpoint / MARKER, {"files": sizes})
    complete = 0
    for older in checkpoints(checkpoint.parent.parent):
        if older == checkpoint or (older / MARKER).exists():
            complete += 1
            if keep is None or complete <= keep:
                continue
        elif _step(older) > _step(checkpoint):
            continue  # a newer save in progress elsewhere is not ours to judge
        shutil.rmtree(older, ignore_errors=True)


# --------------------------------------------------------------------- locks

def _owner() -> dict:
    """This job: under torchrun every rank of one job shares the launcher's identity (its run id)."""
    pid = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "job": run_id()}


def _alive(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True  # another machine's process cannot be checked from here: assume it runs
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, KeyError, ValueError, TypeError):
        return True
    return True


@dataclass
class RunLock:
    """`run.lock` in a run directory: created exclusively by the job working in it, removed when it ends."""

    run_dir: Path
    held: bool = field(default=False, init=False)

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK

    def acquire(self) -> Optional[dict]:
        """Claim the run; returns None on success, or the live job that has it.

        The directory's flock makes the read-check-write one step: of two reruns started together, the
        second sees the first's lock. A lock whose process is gone (kill -9) is stale and taken over.
        """
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            holder = rundir.read_json(self.path)
            if isinstance(holder, dict) and holder.get("job") != run_id() and _alive(holder):
                return holder
            rundir.write_json(self.path, _owner())
            self.held = True
            return None
        finally:
            os.close(fd)  # releases the flock

    def release(self) -> None:
        if self.held and rank() == 0:
            self.path.unlink(missing_ok=True)
        self.held = False


# ------------------------------------------------------------------- finding

@dataclass
class Resume:
    run_dir: Path
    checkpoint: Path
    lock: RunLock

    @property
    def step(self) -> int:
        return _step(self.checkpoint)

    def keeps(self, row: dict) -> bool:
        """Whether this checkpoint already accounts for an event or answer: the training's own, up to its step.
        The final evaluation's are dropped, since a resumed run evaluates again."""
        return row["step"] <= self.step and row.get("stage", rundir.TRAIN) == rundir.TRAIN


def _explicit(setting: str, config, data: dict) -> Resume:
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
    saved = run_dir / rundir.CONFIG
    if saved.exists():
        differences = config_differences(comparable_config(OmegaConf.load(saved)), comparable_config(config))
        if differences:
            raise ConfigError(f"{key}: that run's config differs in {'; '.join(differences)}; resume it with "
                              "its own config, or start a new run (trainer.resume=false)")
    fingerprint = rundir.read_json(run_dir / FINGERPRINT) or {}
    if fingerprint.get("data", data) != data:
        raise ConfigError(f"{key}: the data changed since that run started ({_data_change(fingerprint['data'], data)});"
                          " restore it, or start a new run (trainer.resume=false)")
    lock = RunLock(run_dir)
    holder = lock.acquire()
    if holder is not None:
        raise ConfigError(f"{key}: that run is in use by pid {holder.get('pid')} on {holder.get('host')}")
    return Resume(run_dir, checkpoint, lock)


def _data_change(old: dict, new: dict) -> str:
    if old.get("path") != new.get("path"):
        return f"data file {old.get('path') or old.get('hub')} then, {new.get('path') or new.get('hub')} now"
    return f"{new['path']} has other contents ({old.get('size')} bytes then, {new.get('size')} now)"


def find_resume(setting: Any, config, run_dir: Path, data: dict) -> Optional[Resume]:
    """The run to continue for trainer.resume=`setting` (auto | true | false | a run or checkpoint dir), claimed."""
    if setting is False or setting == "false":
        return None
    if setting not in (True, "auto", "true"):
        return _explicit(str(setting), config, data)
    wanted = config_hash(config)
    # This run's directory, its siblings (outputs/runs/*), and the jobs of sibling sweeps (outputs/multiruns/*/N).
    candidates = {run_dir, *run_dir.parent.glob("*"), *run_dir.parent.parent.glob("*/*")}
    found = []
    for candidate in candidates:
        if not (candidate / rundir.CONFIG).exists() or not (candidate / rundir.CHECKPOINTS).is_dir():
            continue
        if rundir.status(candidate) not in (None, "absent", "interrupted"):
            continue
        fingerprint = rundir.read_json(candidate / FINGERPRINT) or {}
        if fingerprint.get("config") != wanted:
            continue
        if fingerprint.get("data") != data:
            log.warning("Not resuming %s: it has this config, but %s", candidate,
                        _data_change(fingerprint.get("data") or {}, data))
            continue
        checkpoint = usable_checkpoint(candidate)
        if checkpoint is not None:
            found.append((checkpoint.stat().st_mtime, candidate, checkpoint))
    for _, candidate, checkpoint in sorted(found, reverse=True):
        lock = RunLock(candidate)
        holder = lock.acquire()
        if holder is None:
            return Resume(candidate, checkpoint, lock)
        log.warning("Not resuming %s: it is in use by pid %s on %s; starting a new run in %s",
                    candidate, holder.get("pid"), holder.get("host"), run_dir)
    if setting in (True, "true"):
        raise ConfigError("trainer.resume=true: no interrupted run with this config and data and a complete "
                          f"checkpoint was found near {run_dir}; pass trainer.resume=<run dir> or trainer.resume=auto")
    return None


# ----------------------------------------------------------------- callback

class StateCheckpoint(TrainerCallback):
    """Saves and restores what the Trainer does not (noise alpha and threshold, pruning masks), then marks the
    checkpoint complete and rotates old ones (the Trainer's own rotation would run before the marker)."""

    def __init__(self, noise_callback, pruner, keep: Optional[int]):
        self.noise_callback, self.pruner, self.keep = noise_callback, pruner, keep

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        # Every rank has its own noise stream; masks are per rank too when the weights are sharded.
        own = {"noise_rng": self.noise_callback.noise.rng_state(),
               "pruning_masks": [m.contiguous() for m in self.pruner.masks] if self.pruner else None}
        rundir.atomic_write(folder / rundir.rank_state(rank()), lambda tmp: torch.save(own, tmp))
        if args.world_size > 1:
            from .sharding import barrier
            barrier()  # every rank's part is on disk before rank 0 marks the checkpoint complete
        if state.is_world_process_zero:
            dynamic = self.noise_callback.dynamic
            shared = {"noise_alpha": self.noise_callback.noise.alpha,
                      "noise_threshold": dynamic.threshold if dynamic else None}
            rundir.atomic_write(folder / STATE_FILE, lambda tmp: torch.save(shared, tmp))
            mark_complete(folder, self.keep)

    def load(self, checkpoint: Path) -> None:
        saved = {**torch.load(checkpoint / STATE_FILE, weights_only=True),
                 **torch.load(checkpoint / rundir.rank_state(rank()), weights_only=True)}
        self.noise_callback.noise.set_rng_state(saved["noise_rng"])
        self.noise_callback.noise.alpha = saved["noise_alpha"]
        if self.noise_callback.dynamic is not None:
            self.noise_callback.dynamic.threshold = saved["noise_threshold"]
        if self.pruner is not None and saved["pruning_masks"] is not None:
            self.pruner.masks = saved["pruning_masks"]
        log.info("Restored noise alpha %.4f and %s from %s", saved["noise_alpha"],
                 "pruning masks" if saved["pruning_masks"] is not None else "no pruning masks", checkpoint.name)
