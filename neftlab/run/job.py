"""One job of `python -m neftlab`: which directory its run uses, claimed before anything is written, then the
pipeline there, and how it ended.

Before anything is written, a job decides which directory its run uses:
- the job's output directory holds no run: a new run there, unless auto-resume finds an unfinished run of the same
  config, data and base model to continue (`resume.find_resume`);
- it holds this run completed: its result is reused, nothing is trained or written (a rerun of a sweep skips its
  completed jobs);
- it holds this run unfinished: that run is resumed, or, killed before its first complete checkpoint, trained again;
  a run that failed after its training was checkpointed only evaluates;
- it holds another config's run: refused in one line, and nothing is written there, not even .hydra/ or a log
  line; a failed one that kept no checkpoint or model is replaced.
The directory is then claimed (`claim.RunLock`, atomic): of two jobs started together, one claims it and the
other says in one line that it is in use, having written nothing. Under the claim the decision is taken again (the
other job may have finished meanwhile). Only then are .hydra/, the fingerprint and the log written, into the run's
own directory. An error ends the run with status "failed" in summary.json and one line on the terminal; the
traceback goes to the run's log. A job that never claimed a directory writes nothing at all.
"""

from __future__ import annotations

import errno
import logging
import logging.handlers
import os
import resource
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .. import data as data_mod
from .. import models
from ..config import Config, run_id, to_config
from ..config.compose import spelled_out
from ..config.objectives import objective, objective_keys
from ..core import ledger, rundir
from ..core.claim import RunLock, describe
from ..core.errors import ConfigError, NeftlabError, disk_full, first_line
from ..core.files import read_json, write_json
from ..core.rank import launched_ranks, rank
from ..core.rundir import RunFiles
from . import pipeline
from .checkpoint import training_done, usable_checkpoint
from .fingerprint import Identity, config_differences, saved_config
from .resume import Busy, Refused, Resume, claim, clear, find_resume, occupant
from .signals import Interrupted

log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """What a job knows of the command line that started it: its output directory, its overrides, and, in a sweep,
    the sweep's directory and its number. `from_hydra` reads it from Hydra; tests build one."""
    out_dir: Path
    overrides: list[str] = field(default_factory=list)
    name: str = "default"  # the run's name in W&B: what sets it apart (Hydra's override_dirname)
    log_name: str = "neftlab"
    sweep_dir: Optional[Path] = None
    number: int = 0
    choices: dict = field(default_factory=dict)
    hydra_config: Any = None  # for .hydra/hydra.yaml

    @property
    def multirun(self) -> bool:
        return self.sweep_dir is not None

    @classmethod
    def from_hydra(cls) -> "JobContext":
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
        h = HydraConfig.get()
        multirun = h.mode == RunMode.MULTIRUN
        return cls(Path(h.runtime.output_dir), list(h.overrides.task), h.job.override_dirname or "default",
                   h.job.name, Path(h.sweep.dir) if multirun else None, h.job.num if multirun else 0,
                   dict(h.runtime.choices), OmegaConf.create({"hydra": h}))


class HeldLog:
    """The job's log file, held back until the run's directory is decided: Hydra points it at the job's output
    directory, which may hold a completed run or another config's. Lines logged meanwhile are kept in memory and
    written first when the log is released to the run's directory; they are dropped if the job writes nothing."""

    def __init__(self):
        root = logging.getLogger()
        self.files = [h for h in root.handlers if isinstance(h, logging.FileHandler)]
        for handler in self.files:
            root.removeHandler(handler)
        self.memory = logging.handlers.MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 10)
        root.addHandler(self.memory)

    def release(self, run_dir: Path) -> None:
        root = logging.getLogger()
        root.removeHandler(self.memory)
        for handler in self.files:
            handler.close()  # opened lazily (delay: true): it never wrote into the job's directory
            path = Path(run_dir) / Path(handler.baseFilename).name
            if path.is_symlink():  # a link left in a run handed over: the log is the run's own file
                path.unlink()
            handler.baseFilename = os.path.abspath(path)
            for record in self.memory.buffer:
                if record.levelno >= handler.level:
                    handler.handle(record)
            root.addHandler(handler)
        self.memory.buffer.clear()
        self.files = []

    def drop(self) -> None:
        logging.getLogger().removeHandler(self.memory)
        self.memory.buffer.clear()


@dataclass
class Outcome:
    """How a job ended: its status, one line, the run's directory, its summary and its return to the sweeper."""
    status: str  # completed | reused | failed | refused | busy (another process's) | interrupted
    message: str = ""
    run_dir: Optional[Path] = None
    summary: dict = field(default_factory=dict)
    objective: Any = None
    exit_code: int = 0


def start_wandb(cfg: Config, dict_cfg: DictConfig, ctx: JobContext, run_dir: Path):
    """The job's W&B run: named by its overrides, grouped by its sweep, with the resolved config for filtering."""
    from ..tracking.wandb_run import WandbRun
    return WandbRun(cfg.logger, run_dir, OmegaConf.to_container(dict_cfg, resolve=True), name=ctx.name,
                    group=ctx.sweep_dir.name if ctx.multirun else None,
                    job_type="train" if cfg.trainer.max_steps != 0 else "eval",
                    tags=[f"model:{ctx.choices.get('model', cfg.model.arch)}", f"noise:{cfg.noise.kind}",
                          f"pruning:{cfg.pruning.kind}"])


def _message(e: BaseException, out_dir: Path) -> tuple[str, str]:
    """(status, one line) for an exception that ended a run."""
    if isinstance(e, NeftlabError):
        return "failed", str(e)
    if isinstance(e, OmegaConfBaseException):
        return "failed", str(e).splitlines()[0]
    if disk_full(e, out_dir):
        return "interrupted", (f"no space left on device ({out_dir}): free some and rerun the same command to resume "
                               "from the last complete checkpoint")
    if isinstance(e, OSError) and e.errno == errno.EMFILE:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        return "failed", (f"too many open files: this process may open {limit} (ulimit -n); raise it, e.g. "
                          f"`ulimit -n 1024`, and rerun the same command")
    return "failed", first_line(e, 1000)


def _late(message: str, run_dir: Path) -> str:
    """A failure after training was checkpointed says how to go on without training again."""
    checkpoint = usable_checkpoint(run_dir)
    if checkpoint is None or not training_done(checkpoint):
        return message
    return f"{message} (training is saved in {checkpoint.name}: once the cause is fixed, the same command only evaluates)"


DECISIONS = ".jobs"  # under the output root: what rank 0 of a torchrun job decided, for its other ranks
DECISION_TIMEOUT_S = 1800


class Decision:
    """Rank 0 of a torchrun job decides which directory the run uses, and the other ranks do as it does: they cannot
    look for themselves, since rank 0's own writes (its claim, .hydra/) change what they would see. Rank 0 writes
    its decision to <output_root>/.jobs/<run id>.json, the other ranks wait for it; a job of one process needs
    none of this."""

    def __init__(self, root: Path):
        self.path = Path(root) / DECISIONS / f"{run_id()}.json"
        self.published = False

    def publish(self, decision: dict) -> None:
        write_json(self.path, decision, root=self.path.parent.parent)
        self.published = True

    def wait(self) -> dict:
        deadline = time.monotonic() + DECISION_TIMEOUT_S
        while (found := read_json(self.path)) is None:
            if time.monotonic() > deadline:
                raise NeftlabError(f"rank {rank()}: rank 0 decided nothing within {DECISION_TIMEOUT_S} s ({self.path})")
            time.sleep(0.2)
        return found


class Job:
    """One job: decide and claim its run's directory, run the pipeline there, end with an `Outcome`."""

    def __init__(self, dict_cfg: DictConfig, ctx: JobContext, held: HeldLog):
        self.dict_cfg, self.ctx, self.held = dict_cfg, ctx, held
        self.files: Optional[RunFiles] = None
        self.lock: Optional[RunLock] = None
        self.resume: Optional[Resume] = None
        root = Path(str(dict_cfg.get("output_root", "outputs")))
        self.decision = Decision(root) if launched_ranks() > 1 else None

    def _claimed(self, run_dir: Path, cfg: Optional[Config], keep=None) -> None:
        """The run's directory is decided and held: its .hydra/ and the held log go there, and its files are
        opened (with the W&B run, when it logs to W&B)."""
        if rank() == 0:
            rundir.write_hydra(run_dir, self.dict_cfg, self.ctx.hydra_config or OmegaConf.create({}),
                               self.ctx.overrides)
        self.held.release(run_dir)
        sinks = [start_wandb(cfg, self.dict_cfg, self.ctx, run_dir)] if (
            cfg is not None and cfg.logger.kind == "wandb" and rank() == 0) else []
        self.files = RunFiles(run_dir, keep=keep, sinks=sinks)

    def _objective(self, cfg: Config, summary: dict):
        return objective(summary, objective_keys(cfg.search.objectives, cfg.eval.judge.model is not None))

    def run(self) -> Outcome:
        outcome = self._run()
        if self.decision is not None and rank() == 0 and not self.decision.published:
            self.decision.publish({"action": "ended", "status": outcome.status, "message": outcome.message,
                                   "exit_code": outcome.exit_code})
        return outcome

    def _run(self) -> Outcome:
        out_dir = self.ctx.out_dir
        try:
            if stopped := ledger.sweep_stopped(self.ctx.sweep_dir):
                return Outcome("interrupted", f"not started: the sweep was stopped by {signal.Signals(stopped).name}",
                               exit_code=128 + stopped)
            self.dict_cfg = spelled_out(self.dict_cfg)  # what the run saves and logs names its kind and each value
            cfg = to_config(self.dict_cfg)
            source, model_files = data_mod.locate(cfg.data), models.locate(cfg.model)
            identity = Identity(self.dict_cfg, source.fingerprint(), model_files.fingerprint())
            outcome = self._follow(cfg) if self.decision is not None and rank() != 0 else self._decide(cfg, identity)
            if outcome is not None:
                return outcome
            if self.decision is not None and rank() == 0:
                self.decision.publish({"action": "run", "run_dir": str(self.files.dir),
                                       "checkpoint": str(self.resume.checkpoint) if self.resume else None})
            pipeline.run(cfg, self.files, self.resume, source, model_files)
            summary = self.files.finish("completed")
            pipeline.drop_unasked_checkpoints(cfg, self.files)
            return Outcome("completed", "", self.files.dir, summary, self._objective(cfg, summary))
        except Interrupted as e:
            return self._ended("interrupted", str(e), 128 + e.signum, step=e.step)
        except KeyboardInterrupt:
            return self._ended("interrupted", "stopped at once by Ctrl-C; the last complete checkpoint, if any, is "
                                              "kept", 130)
        except Exception as e:
            status, message = _message(e, out_dir)
            log.debug("Traceback:\n%s", traceback.format_exc())
            return self._ended(status, message, 1, refused=isinstance(e, Refused), busy=isinstance(e, Busy))
        finally:
            if self.lock is not None:
                self.lock.release()

    def _decide(self, cfg: Config, identity: Identity) -> Optional[Outcome]:
        """Claim the run's directory, or end here: reused, or refused having written nothing."""
        out_dir = self.ctx.out_dir
        for _ in range(2):  # decided, claimed, decided again under the claim
            occupied = occupant(out_dir, identity)
            if occupied is not None and occupied.action == "refuse":
                raise Refused(occupied.message)
            if occupied is not None and occupied.action == "reuse":
                return Outcome("reused", occupied.message, out_dir, occupied.summary or {},
                               self._objective(cfg, occupied.summary or {}))
            self.resume = find_resume(cfg.trainer.resume, identity, out_dir, Path(cfg.output_root),
                                      cfg.trainer.take_over)
            if self.resume is not None:
                self.lock = self.resume.lock
                run_dir = self.resume.run_dir
                changed = config_differences(saved_config(run_dir) or {},
                                             OmegaConf.to_container(self.dict_cfg, resolve=True))
                log.info("Resuming %s from %s%s", run_dir, self.resume.checkpoint.name,
                         f" with new values of keys that do not shape training: {'; '.join(changed)}" if changed
                         else "")
                self._claimed(run_dir, cfg, keep=self.resume.keeps)
                return None
            self.lock, held = claim(out_dir, cfg.trainer.take_over)
            if held is not None:
                self.lock = None
                raise Busy(f"output directory {out_dir} is in use by {describe(*held)}: choose another "
                                  "hydra.run.dir, or, if that process is gone, take the run over with "
                                  "trainer.take_over=true")
            again = occupant(out_dir, identity)
            if (again and again.action) == (occupied and occupied.action):
                break
            self.lock.release()  # it changed while this job looked (finished, say): decide again
            self.lock = None
        else:
            raise ConfigError(f"output directory {out_dir} keeps changing while this job looks at it: rerun")
        if occupied is not None and occupied.action in ("replace", "retrain"):
            log.warning("%s", occupied.message)
            clear(out_dir)
        self._claimed(out_dir, cfg)
        identity.record(out_dir)
        return None

    def _follow(self, cfg: Config) -> Optional[Outcome]:
        """A rank other than 0: the directory rank 0 claimed, or the end rank 0 came to."""
        decided = self.decision.wait()
        if decided["action"] == "ended":
            self.held.drop()
            return Outcome(decided["status"], decided["message"], exit_code=decided["exit_code"])
        run_dir = Path(decided["run_dir"])
        self.lock = RunLock(run_dir)
        if self.lock.acquire() is not None:  # rank 0's claim is this job's own: another job holds it
            raise Refused(f"{run_dir}: rank 0's claim was lost")
        if decided["checkpoint"]:
            self.resume = Resume(run_dir, Path(decided["checkpoint"]), self.lock)
        self._claimed(run_dir, cfg, keep=self.resume.keeps if self.resume else None)
        return None

    def _ended(self, status: str, message: str, exit_code: int, refused: bool = False, busy: bool = False,
               **extra) -> Outcome:
        """A run that ends early: summary.json and the log where the run's files are. A job that has claimed no
        directory writes a failure only into its own output directory, when it holds nothing, claiming it first;
        otherwise it only says so."""
        if self.files is None and self.lock is None and not refused and rank() == 0 and \
                rundir.status(self.ctx.out_dir) == "absent":
            lock, held = claim(self.ctx.out_dir)
            if held is None:
                self.lock = lock
                self._claimed(self.ctx.out_dir, None)
        if self.files is None:
            self.held.drop()
            return Outcome("busy" if busy else "refused" if status == "failed" else status, message,
                           exit_code=exit_code)
        if status == "failed":
            message = _late(message, self.files.dir)
        summary = self.files.finish(status, message, **extra)
        return Outcome(status, message, self.files.dir, summary, exit_code=exit_code)


def run_job(dict_cfg: DictConfig, ctx: JobContext) -> Outcome:
    """One job, with its log held until its directory is decided, and, in a sweep, its line in the ledger."""
    if ctx.multirun:
        ledger.record_job(ctx.sweep_dir, ctx.number, ctx.out_dir, "running")
    held = HeldLog()
    outcome = Job(dict_cfg, ctx, held).run()
    held.drop()
    if outcome.status == "reused":
        log.info("%s", outcome.message)
    elif outcome.status == "interrupted":
        log.warning("%s", outcome.message)
    elif outcome.message:
        log.error("%s", outcome.message)
        if outcome.run_dir is not None:
            log.info("Full traceback in %s; the run's files are in %s", outcome.run_dir / f"{ctx.log_name}.log",
                     outcome.run_dir)
    _tidy(ctx.out_dir, outcome.run_dir)
    if ctx.multirun:
        ledger.record_job(ctx.sweep_dir, ctx.number, ctx.out_dir, outcome.status, outcome.run_dir, outcome.message)
    return outcome


def _tidy(out_dir: Path, run_dir: Optional[Path]) -> None:
    """No empty folders left: the job's directory when the run lives elsewhere (or nowhere), an unused
    checkpoints/."""
    for folder in ([run_dir / rundir.CHECKPOINTS] if run_dir else []) + [out_dir]:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass
