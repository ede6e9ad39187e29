"""Resume: find, claim and validate the run and the checkpoint to continue.

A checkpoint is the Trainer's (weights, optimizer, scheduler, RNG, trainer state) plus neftlab's
`neftlab_state.pt` (noise alpha and threshold) and `neftlab_rank<N>.pt` (each rank's noise stream and
pruning masks). It counts only once `neftlab_complete.json`, written last, lists every file with its
size: a save cut off by kill -9 or a full disk has no marker, a file truncated later no longer has its
size, and either is skipped, named, in favour of the previous complete checkpoint.

`trainer.resume=auto` (the default) continues the newest unfinished run (interrupted, or killed and no
longer running) under the output root (`output_root`, outputs/) or in the job's own directory, owned by this
user, whose config and data equal this run's in everything that shapes training: `eval.*`, `logger.*` and the
other keys of `NOT_SHAPING` may change, and the resumed run records their new values.

A run is claimed by its `run.lock` (host, pid, the process's start time and the machine's boot id), renewed by a
heartbeat while the process works; so two reruns never continue one run. A lock is stale when its process is
gone: on this machine, when no process with that pid and start time is alive (a reused pid is another
process); on another machine, when its heartbeat stopped `STALE_AFTER_S` ago. `trainer.take_over=true` takes
over a lock that still looks alive. A completed run is never written into again.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
import torch
from omegaconf import OmegaConf
from transformers import TrainerCallback

from . import rundir
from .cache import file_sha256
from .config import ConfigError
from .rundir import FINGERPRINT, LOCK, MARKER, STATE_FILE
from .sharding import rank

log = logging.getLogger(__name__)

# Keys that do not shape training: they may change between an interruption and its rerun.
NOT_SHAPING = ("eval", "logger", "search", "output_root", "trainer.resume", "trainer.take_over", "trainer.save_steps",
               "trainer.save_total_limit")
HEARTBEAT_S = 30  # the holder renews run.lock this often
STALE_AFTER_S = 600  # a lock from another machine not renewed for this long is stale


# ------------------------------------------------------------- fingerprints

def shaping_config(config) -> dict:
    """The resolved config less the keys of NOT_SHAPING: what a resume must match."""
    plain = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    for key in NOT_SHAPING:
        *parents, last = key.split(".")
        node = plain
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return plain


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(shaping_config(config), sort_keys=True, default=str).encode()).hexdigest()


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


def saved_config(run_dir: Path) -> Optional[dict]:
    """The run's own config (.hydra/config.yaml), resolved; None when it has none."""
    path = Path(run_dir) / rundir.CONFIG
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True) if path.is_file() else None


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
            torch.load(path, weights_only=True, map_location="cpu")  # not onto the GPU that saved it
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
             if p.is_file() and p.name != MARKER and not rundir.is_temporary(p)}
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

def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> Optional[float]:
    """When the process `pid` started, or None when there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def _owner() -> dict:
    """This job: under torchrun every rank of one job shares the launcher's identity."""
    pid = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "started": _started(pid), "boot": _boot_id()}


def _same_process(holder: dict, other: dict) -> bool:
    started = holder.get("started")
    return (holder.get("host"), holder.get("boot"), holder.get("pid")) == (other["host"], other["boot"], other["pid"]) \
        and started is not None and other["started"] is not None and abs(started - other["started"]) < 1.0


def lock_age(path: Path) -> float:
    """Seconds since the lock was last renewed."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return float("inf")


def alive(holder: dict, age: float) -> bool:
    """Whether the process named in a lock may still work in the run. On this machine (same boot): only if a
    process with that pid and start time runs, so a pid reused after kill -9 or a container restart is another
    process. Elsewhere, it cannot be asked: its heartbeat decides."""
    if holder.get("host") == socket.gethostname() and holder.get("boot", _boot_id()) == _boot_id():
        started = _started(int(holder.get("pid") or -1))
        return started is not None and (holder.get("started") is None or abs(started - holder["started"]) < 1.0)
    return age < STALE_AFTER_S


def describe(holder: dict, age: float) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (its lock renewed {age:.0f} s ago)"


@dataclass
class RunLock:
    """`run.lock` in a run directory: claimed by the job working in it, renewed every HEARTBEAT_S by a thread,
    removed when it ends."""

    run_dir: Path
    held: bool = field(default=False, init=False)
    _beat: Optional[threading.Event] = field(default=None, init=False, repr=False)

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK

    def acquire(self, take_over: bool = False) -> Optional[tuple[dict, float]]:
        """Claim the run; returns None on success, or the holder that may still be alive and its lock's age.

        The directory's flock makes the read-check-write one step: of two reruns started together, the
        second sees the first's lock. A stale lock (`alive`) is taken over, and so is any with `take_over`.
        """
        me = _owner()
        fd = os.open(self.run_dir, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            holder, age = rundir.read_json(self.path), lock_age(self.path)
            if isinstance(holder, dict) and not _same_process(holder, me) and alive(holder, age):
                if not take_over:
                    return holder, age
                log.warning("Taking %s over from %s (trainer.take_over=true)", self.run_dir, describe(holder, age))
            if rank() == 0:
                rundir.write_json(self.path, me)
            self.held = True
        finally:
            os.close(fd)  # releases the flock
        if rank() == 0:
            self._beat = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True, name="run.lock").start()
        return None

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None
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


def _shaping_differences(run_dir: Path, config) -> list[str]:
    saved = saved_config(run_dir)
    return [] if saved is None else config_differences(shaping_config(saved), shaping_config(config))


def _owner_name(path: Path) -> Optional[str]:
    """The other user who owns `path`, or None when it is this user's: a run is never taken over from another."""
    uid = path.stat().st_uid
    if uid == os.getuid():
        return None
    try:
        import pwd
        return pwd.getpwuid(uid).pw_name
    except (KeyError, ImportError):
        return str(uid)


def _claim(run_dir: Path, key: str, take_over: bool) -> RunLock:
    lock = RunLock(run_dir)
    held = lock.acquire(take_over)
    if held is not None:
        raise ConfigError(f"{key}: that run is in use by {describe(*held)}; if that process is gone (a node that "
                          f"died, a container that was replaced), take the run over with trainer.resume={run_dir} "
                          "trainer.take_over=true")
    return lock


def _explicit(setting: str, config, data: dict, take_over: bool) -> Resume:
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
    if (other := _owner_name(run_dir)) is not None:
        raise ConfigError(f"{key}: that run belongs to the user {other}; a run is never taken over from another user")
    differences = _shaping_differences(run_dir, config)
    if differences:
        raise ConfigError(f"{key}: that run's config differs in {'; '.join(differences)}; resume it with "
                          "its own config, or start a new run (trainer.resume=false)")
    fingerprint = rundir.read_json(run_dir / FINGERPRINT) or {}
    if fingerprint.get("data", data) != data:
        raise ConfigError(f"{key}: the data changed since that run started ({_data_change(fingerprint['data'], data)});"
                          " restore it, or start a new run (trainer.resume=false)")
    return Resume(run_dir, checkpoint, _claim(run_dir, key, take_over))


def _data_change(old: dict, new: dict) -> str:
    if old.get("path") != new.get("path"):
        return f"data file {old.get('path') or old.get('hub')} then, {new.get('path') or new.get('hub')} now"
    return f"{new['path']} has other contents ({old.get('size')} bytes then, {new.get('size')} now)"


def run_dirs(root: Path) -> list[Path]:
    """The run directories under the output root, as neftlab lays them out: runs/X, multiruns/X/N,
    experiments/S/N and a search's experiments/S/T/N."""
    return [p.parent for depth in range(1, 5) for p in Path(root).glob("/".join(["*"] * depth) + "/" + FINGERPRINT)]


def find_resume(setting: Any, config, run_dir: Path, data: dict, root: Path, take_over: bool = False
                ) -> Optional[Resume]:
    """The run to continue for trainer.resume=`setting` (auto | true | false | a run or checkpoint dir), claimed.
    Auto looks in the job's own directory and among this user's runs under the output root `root`, nowhere else."""
    if setting is False or setting == "false":
        return None
    if setting not in (True, "auto", "true"):
        return _explicit(str(setting), config, data, take_over)
    wanted = config_hash(config)
    found = []
    for candidate in {Path(run_dir), *run_dirs(root)}:
        if not (candidate / rundir.CONFIG).exists() or not (candidate / rundir.CHECKPOINTS).is_dir():
            continue
        if rundir.status(candidate) not in (None, "absent", "interrupted") or _owner_name(candidate) is not None:
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
        held = lock.acquire(take_over and candidate == Path(run_dir))
        if held is None:
            return Resume(candidate, checkpoint, lock)
        if candidate != Path(run_dir):  # the job's own directory in use: the job itself says so
            log.warning("Not resuming %s: it is in use by %s; starting a new run in %s (if that process is gone, "
                        "take the run over with trainer.resume=%s trainer.take_over=true)", candidate, describe(*held),
                        run_dir, candidate)
    if setting in (True, "true"):
        raise ConfigError("trainer.resume=true: no interrupted run with this config and data and a complete "
                          f"checkpoint was found in {run_dir} or under {root}; pass trainer.resume=<run dir> or "
                          "trainer.resume=auto")
    return None


@dataclass
class Occupied:
    """What a job does with an output directory that already holds a run: `reuse` its result (completed with this
    config), `resume` it (unfinished with this config), or `refuse` (another config), with the one line to say."""
    action: str
    message: str
    summary: Optional[dict] = None


def occupant(run_dir: Path, config, data: dict) -> Optional[Occupied]:
    """The decision for a job pointed at `run_dir`, taken before anything is written there; None when the
    directory holds no run (or only a failed one, which a rerun replaces)."""
    status = rundir.status(run_dir)
    if status in ("absent", "failed"):
        return None
    differences = _shaping_differences(run_dir, config)
    fingerprint = rundir.read_json(run_dir / FINGERPRINT) or {}
    if fingerprint.get("data", data) != data:
        differences.append(_data_change(fingerprint["data"], data))
    what = "a completed run" if status == "completed" else f"an {status or 'unfinished'} run"
    if differences:
        how = "" if status == "completed" else "resume it with its own config, or "
        return Occupied("refuse", f"output directory {run_dir} already holds {what} with another config "
                                  f"({'; '.join(differences)}); a run's files are never overwritten: {how}choose "
                                  "another hydra.run.dir")
    if status == "completed":
        saved = saved_config(run_dir) or {}
        changed = config_differences(saved.get("eval", {}), OmegaConf.to_container(OmegaConf.create(config),
                                                                                   resolve=True).get("eval", {}))
        hint = (f" (its eval.* keys differ: {'; '.join(changed)}; evaluate it again with python -m neftlab.evaluate "
                f"{run_dir} eval.KEY=VALUE)") if changed else ""
        return Occupied("reuse", f"{run_dir} is already completed with this config: its result is reused, nothing is "
                                 f"trained{hint}", rundir.read_json(run_dir / rundir.SUMMARY))
    return Occupied("resume", "")


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
               "pruning_masks": [m.contiguous().cpu() for m in self.pruner.masks] if self.pruner else None}
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
        # On the CPU: the pruner moves the masks to their weights' devices (every rank would otherwise open a
        # CUDA context on the GPU that saved each file).
        saved = {**torch.load(checkpoint / STATE_FILE, weights_only=True, map_location="cpu"),
                 **torch.load(checkpoint / rundir.rank_state(rank()), weights_only=True, map_location="cpu")}
        self.noise_callback.noise.set_rng_state(saved["noise_rng"])
        self.noise_callback.noise.alpha = saved["noise_alpha"]
        if self.noise_callback.dynamic is not None:
            self.noise_callback.dynamic.threshold = saved["noise_threshold"]
        if self.pruner is not None and saved["pruning_masks"] is not None:
            self.pruner.masks = saved["pruning_masks"]
        log.info("Restored noise alpha %.4f and %s from %s", saved["noise_alpha"],
                 "pruning masks" if saved["pruning_masks"] is not None else "no pruning masks", checkpoint.name)
