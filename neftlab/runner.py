"""The command line's side of a run: one Hydra job, around `pipeline.run`, and the sweep it may belong to.

Before anything is written, a job decides which directory its run uses:
- the job's output directory holds no run (or a failed one): a new run there, unless auto-resume finds an
  interrupted run with this config to continue;
- it holds this config's completed run: its result is reused, nothing is trained or written (a rerun of a sweep
  skips its completed jobs);
- it holds this config's unfinished run: that run is resumed, or, killed before its first complete checkpoint,
  trained again;
- it holds another config's run: refused in one line, and nothing is written there, not even .hydra/ or a log line.
Only then are .hydra/, the fingerprint and the log written, into the run's own directory. An error ends the run with
status "failed" in summary.json and one line on the terminal; the traceback goes to the run's log.

A sweep (`RunGuard`): its directory is fixed once, in the launching process, whatever the launcher; the same sweep
command again continues the newest unfinished sweep of that command; every job appends how it ended to the
sweep's jobs.jsonl, which gives the exit code and the list of failed jobs for every launcher; and a stop signal
to the launching process reaches the running jobs, which checkpoint, before the sweep exits with 128 + the signal.
"""

from __future__ import annotations

import logging
import logging.handlers
import os
import signal
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import psutil
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from . import data as data_mod
from . import errors, guards, pipeline, rundir, search
from . import resume as resume_mod
from .config import Config, ConfigError, check_keys, run_id
from .rundir import RunFiles
from .sharding import rank
from .tracking import WandbRun

log = logging.getLogger(__name__)

SWEEP_ENV, LAUNCHER_PID_ENV = "NEFTLAB_SWEEP", "NEFTLAB_SWEEP_PID"  # set by RunGuard for the sweep's jobs


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
            handler.baseFilename = os.path.abspath(Path(run_dir) / Path(handler.baseFilename).name)
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
    status: str  # completed | reused | failed | refused | interrupted
    message: str = ""
    run_dir: Optional[Path] = None
    summary: dict = field(default_factory=dict)
    objective: Any = None
    exit_code: int = 0


def start_wandb(cfg: Config, dict_cfg: DictConfig, hydra_cfg, run_dir: Path) -> WandbRun:
    """The job's W&B run: named by its overrides, grouped by its sweep, with the resolved config for filtering."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return WandbRun(cfg.logger, run_dir, OmegaConf.to_container(dict_cfg, resolve=True),
                    name=hydra_cfg.job.override_dirname or "default",
                    group=Path(hydra_cfg.sweep.dir).name if multirun else None,
                    job_type="train" if cfg.trainer.max_steps != 0 else "eval",
                    tags=[f"model:{hydra_cfg.runtime.choices.get('model', cfg.model.arch)}",
                          f"noise:{cfg.noise.kind}", f"pruning:{cfg.pruning.method}"])


def _message(e: BaseException, out_dir: Path) -> tuple[str, str]:
    """(status, one line) for an exception that ended a run."""
    if isinstance(e, errors.NeftlabError):
        return "failed", str(e)
    if isinstance(e, OmegaConfBaseException):
        return "failed", str(e).splitlines()[0]
    if errors.disk_full(e, out_dir):
        return "interrupted", (f"no space left on device ({out_dir}): free some and rerun the same command to resume "
                               "from the last complete checkpoint")
    return "failed", f"{type(e).__name__}: {e}"


def _objective(cfg: Config, summary: dict):
    return search.objective(summary, search.objective_keys(cfg.search.objectives, cfg.eval.judge.model is not None))


def _job(dict_cfg: DictConfig, hydra_cfg, out_dir: Path, held: HeldLog) -> Outcome:
    """Decide the run's directory, then run the pipeline there."""
    files: Optional[RunFiles] = None
    lock = resume_mod.RunLock(out_dir)
    writable = rundir.status(out_dir) in ("absent", "failed")  # nothing of another run is in the job's directory

    def claim(run_dir: Path) -> None:
        """The run's directory is decided: its .hydra/ and the held log go there."""
        if rank() == 0:
            rundir.write_hydra(run_dir, dict_cfg, OmegaConf.create({"hydra": hydra_cfg}), hydra_cfg.overrides.task)
        held.release(run_dir)
    try:
        if stopped := sweep_stopped():
            return Outcome("interrupted", f"not started: the sweep was stopped by {signal.Signals(stopped).name}",
                           exit_code=128 + stopped)
        check_keys(dict_cfg, Config)
        cfg: Config = OmegaConf.to_object(dict_cfg)
        cfg.validate()
        data = resume_mod.data_fingerprint(*data_mod.source(cfg.data))
        occupied = resume_mod.occupant(out_dir, dict_cfg, data)
        if occupied is not None and occupied.action == "refuse":
            raise ConfigError(occupied.message)
        if occupied is not None and occupied.action == "reuse":
            return Outcome("reused", occupied.message, out_dir, occupied.summary or {},
                           _objective(cfg, occupied.summary or {}))
        root = Path(cfg.output_root)
        resume = resume_mod.find_resume(cfg.trainer.resume, dict_cfg, out_dir, data, root, cfg.trainer.take_over)
        if resume is not None:
            lock, run_dir = resume.lock, resume.run_dir
            changed = resume_mod.config_differences(resume_mod.saved_config(run_dir) or {},
                                                    OmegaConf.to_container(dict_cfg, resolve=True))
            log.info("Resuming %s from %s%s", run_dir, resume.checkpoint.name,
                     f" with new values of keys that do not shape training: {'; '.join(changed)}" if changed else "")
            files = RunFiles(run_dir, keep=resume.keeps)
        else:
            run_dir = out_dir
            if rank() == 0 and rundir.status(out_dir) not in ("absent", "failed"):
                if occupied is None or occupied.action != "resume":
                    raise ConfigError(f"output directory {out_dir} already holds a run; a run's files are never "
                                      "overwritten: choose another hydra.run.dir")
                log.warning("%s was stopped before its first complete checkpoint: training it again from step 0",
                            out_dir)
            held_by = lock.acquire(cfg.trainer.take_over)
            if held_by is not None:
                raise ConfigError(f"output directory {out_dir} is in use by {resume_mod.describe(*held_by)}: choose "
                                  "another hydra.run.dir, or, if that process is gone, take the run over with "
                                  "trainer.take_over=true")
            files = RunFiles(out_dir)
            resume_mod.record(out_dir, dict_cfg, data)
        claim(run_dir)
        if cfg.logger.kind == "wandb" and files.writes:
            files.tracker = start_wandb(cfg, dict_cfg, hydra_cfg, files.dir)
        pipeline.run(cfg, files, resume)
        summary = files.finish("completed")
        pipeline.drop_unasked_checkpoints(cfg, files)
        return Outcome("completed", "", run_dir, summary, _objective(cfg, summary))
    except guards.Interrupted as e:
        return _ended(files, out_dir, writable, held, claim, "interrupted", str(e), 128 + e.signum, step=e.step)
    except KeyboardInterrupt:
        return _ended(files, out_dir, writable, held, claim, "interrupted",
                      "stopped at once by Ctrl-C; the last complete checkpoint, if any, is kept", 130)
    except Exception as e:
        status, message = _message(e, out_dir)
        log.debug("Traceback:\n%s", traceback.format_exc())
        return _ended(files, out_dir, writable, held, claim, status, message, 1)
    finally:
        lock.release()


def _ended(files: Optional[RunFiles], out_dir: Path, writable: bool, held: HeldLog, claim, status: str, message: str,
           exit_code: int, **extra) -> Outcome:
    """A run that ends early: summary.json and the log where the run's files are, or, if it never got a directory
    of its own, in the job's directory (with its .hydra/) only when no other run is there; otherwise it only says
    so."""
    if files is None and writable:
        files = RunFiles(out_dir)
        claim(out_dir)
    if files is None:
        held.drop()
        return Outcome("refused" if status == "failed" else status, message, exit_code=exit_code)
    held.release(files.dir)
    summary = files.finish(status, message, **extra)
    return Outcome(status, message, files.dir, summary, exit_code=exit_code)


def main(dict_cfg: DictConfig) -> Any:
    """Hydra's task function: one job of a run or a sweep. Returns the job's objective (`search.objectives`) for an
    optimizing sweeper, None when the run did not complete. Outside a sweep, and for a stop in a sweep's own
    process, it exits with the run's exit code."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    if multirun:
        record_job(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, out_dir, Outcome("running"))
    held = HeldLog()
    outcome = _job(dict_cfg, hydra_cfg, out_dir, held)
    held.drop()
    if outcome.status == "reused":
        log.info("%s", outcome.message)
    elif outcome.status == "interrupted":
        log.warning("%s", outcome.message)
    elif outcome.message:
        log.error("%s", outcome.message)
        if outcome.run_dir is not None:
            log.info("Full traceback in %s; the run's files are in %s", outcome.run_dir / f"{hydra_cfg.job.name}.log",
                     outcome.run_dir)
    _tidy(out_dir, outcome.run_dir)
    if multirun:
        record_job(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, out_dir, outcome)
        if outcome.status == "interrupted" and os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):
            raise SystemExit(outcome.exit_code)  # a stop of the sweep's own process ends the sweep
        return outcome.objective  # None for a failed job: an optimizing sweeper records a failed trial, and goes on
    if text := closing(outcome):
        print(text, file=sys.stderr)
    if outcome.exit_code:
        raise SystemExit(outcome.exit_code)
    return outcome.objective


def closing(outcome: Outcome) -> str:
    """The few lines that end a run on the terminal: how it ended, its headline numbers, where it is, what next."""
    run, s = outcome.run_dir, outcome.summary
    if outcome.status in ("refused", "failed") or run is None:
        return ""  # its one line is logged already; the traceback, if any, is in the run's log
    head = []
    if isinstance(s.get("eval/loss"), (int, float)):
        head.append(f"eval loss {s['eval/loss']:.4f}")
    if isinstance(s.get("eval/accuracy"), (int, float)):
        head.append(f"accuracy {s['eval/accuracy']:.4f}")
    if isinstance(s.get("eval/response_length"), (int, float)):
        cut = s.get("eval/hit_max_new_tokens")
        head.append(f"answers {s['eval/response_length']:.1f} tokens on average" +
                    (f" ({cut:.0%} cut at eval.max_new_tokens)" if isinstance(cut, (int, float)) else ""))
    if isinstance(s.get("judge/win_rate"), (int, float)):
        head.append(f"judge win rate {s['judge/win_rate']:.3f}" +
                    ("" if s.get("judge/reliable") else " (the judge failed its controls: no evidence)"))
    lines = [f"neftlab: {outcome.status}" + (f" ({outcome.message})" if outcome.status == "interrupted" else "") +
             f": {run}"]
    if head:
        lines.append("  " + ", ".join(head))
    if outcome.status == "interrupted":
        lines.append("  next: rerun the same command to resume it")
    else:
        lines += ["  next: python -m neftlab.report " + str(run),
                  f"        python -m neftlab.judge {run} --baseline reference",
                  f"        python -m neftlab.evaluate {run} eval.max_new_tokens=512"]
    return "\n".join(lines)


def _tidy(out_dir: Path, run_dir: Optional[Path]) -> None:
    """No empty folders left: the job's directory when the run lives elsewhere (or nowhere), an unused
    checkpoints/."""
    for folder in ([run_dir / rundir.CHECKPOINTS] if run_dir else []) + [out_dir]:
        try:
            folder.rmdir()  # only if empty
        except OSError:
            pass


# ------------------------------------------------------------------------------------------------ sweeps

def record_job(sweep_dir: Path, number: int, out_dir: Path, outcome: Outcome) -> None:
    """Append how this job ended to the sweep's jobs.jsonl, one whole line."""
    rundir.append_jsonl(sweep_dir / rundir.SWEEP_JOBS, {
        "sweep": os.environ.get(SWEEP_ENV, ""), "job": number, "dir": str(out_dir), "status": outcome.status,
        "run": str(outcome.run_dir or ""), "error": outcome.message[:1000], "pid": os.getpid()})


def sweep_stopped() -> Optional[int]:
    """The signal that stopped this job's sweep before the job started, if one did."""
    sweep = os.environ.get(SWEEP_ENV)
    if not sweep or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    rows = rundir.read_jsonl(Path(HydraConfig.get().sweep.dir) / rundir.SWEEP_JOBS, required="sweep")
    return next((r["stop"] for r in rows if r["sweep"] == sweep and "stop" in r), None)


def _continued_sweep(config: DictConfig) -> Optional[Path]:
    """The newest unfinished earlier sweep of the same command (the same overrides and sweep directory pattern), for
    a basic (grid) sweep whose directory is named by its run id; None otherwise. A sweep is unfinished when its
    last invocation ended with a job not completed, or did not end (killed)."""
    pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
    if "${run_id:}" not in str(pattern) or "BasicSweeper" not in str(config.hydra.sweeper.get("_target_", "")):
        return None
    here = Path(str(config.hydra.sweep.dir))
    command = list(config.hydra.overrides.task)
    for earlier in sorted(here.parent.glob(here.name.replace(run_id(), "*")), key=lambda p: p.stat().st_mtime,
                          reverse=True):
        rows = rundir.read_jsonl(earlier / rundir.SWEEP_JOBS, required="sweep")
        starts = [r for r in rows if "command" in r]
        if earlier == here or not starts or (starts[-1]["command"], starts[-1]["pattern"]) != (command, pattern):
            continue
        ends = [r for r in rows if "end" in r and r["sweep"] == starts[-1]["sweep"]]
        return earlier if not ends or ends[-1]["failed"] or ends[-1]["interrupted"] else None
    return None


class RunGuard(Callback):
    """Hydra callbacks in the launching process: checks the output directory before Hydra creates it; for a
    sweep, fixes its directory once (or continues an unfinished one), passes stop signals to the running jobs,
    and at the end reports the jobs that did not complete and exits accordingly, whatever the launcher."""

    @staticmethod
    def _check(check, path: str) -> None:
        try:
            check(Path(path))
        except ConfigError as e:  # Hydra's own logging (to stdout) is in force here, not the run's
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(guards.check_output_dir, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
        sweep_dir = _continued_sweep(config) or Path(str(config.hydra.sweep.dir))
        if sweep_dir != Path(str(config.hydra.sweep.dir)):
            print(f"Continuing the unfinished sweep {sweep_dir}: its completed jobs are reused, its interrupted ones "
                  "resumed, its failed ones tried again (hydra.sweep.dir=NEW for a new sweep)", file=sys.stderr)
        with read_write(config.hydra), open_dict(config.hydra):  # resolved once, here, for every job and launcher
            config.hydra.sweep.dir = str(sweep_dir)
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{sweep_dir}'")
        self._check(guards.check_output_dir, str(sweep_dir))
        storage = str(config.hydra.sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):  # an Optuna study's database: SQLite does not make its folder
            study = storage.removeprefix("sqlite:///")
            self._check(guards.check_output_dir, str(Path(study).parent))
            self._check(search.check_study_file, study)
        self.ledger, self.sweep = sweep_dir / rundir.SWEEP_JOBS, run_id()
        rundir.append_jsonl(self.ledger, {"sweep": self.sweep, "command": list(config.hydra.overrides.task),
                                          "pattern": pattern})
        os.environ[SWEEP_ENV], os.environ[LAUNCHER_PID_ENV] = self.sweep, str(os.getpid())
        self.previous = {s: signal.signal(s, self._stop) for s in guards.STOP_SIGNALS}

    def _stop(self, signum, frame) -> None:
        """A stop signal to the launching process: jobs not started yet will not start, and the running ones (in
        other processes: a parallel launcher's workers) are sent SIGTERM and checkpoint; the launcher waits for
        them, and the sweep exits with 128 + signum at its end."""
        rundir.append_jsonl(self.ledger, {"sweep": self.sweep, "stop": signum})
        print(f"{signal.Signals(signum).name} received: stopping the sweep's jobs; each saves a checkpoint",
              file=sys.stderr)
        me = psutil.Process()
        descendants = {p.pid for p in me.children(recursive=True)}
        for pid in self._running():
            if pid in descendants:
                os.kill(pid, signal.SIGTERM)

    def _running(self) -> set[int]:
        """The pids of this sweep's jobs that started and have not ended."""
        last = {r["job"]: r for r in rundir.read_jsonl(self.ledger, required="sweep")
                if r["sweep"] == self.sweep and "job" in r}
        return {r["pid"] for r in last.values() if r["status"] == "running"}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        rows = [r for r in rundir.read_jsonl(self.ledger, required="sweep") if r["sweep"] == self.sweep]
        stop = next((r["stop"] for r in rows if "stop" in r), None)
        jobs = {r["job"]: r for r in rows if "job" in r}  # the last line of each job
        failed = [r for r in jobs.values() if r["status"] in ("failed", "refused")]
        interrupted = [r for r in jobs.values() if r["status"] == "interrupted"]
        reused = [r for r in jobs.values() if r["status"] == "reused"]
        rundir.append_jsonl(self.ledger, {"sweep": self.sweep, "end": True, "failed": len(failed),
                                          "interrupted": len(interrupted) + (stop is not None)})
        if reused:
            print(f"{len(reused)} job(s) were already completed: their results are reused", file=sys.stderr)
        for what, rows_ in (("failed", failed), ("were interrupted", interrupted)):
            if rows_:
                print(f"{len(rows_)} job(s) {what}:", file=sys.stderr)
                for r in sorted(rows_, key=lambda r: r["job"]):
                    print(f"  {r['run'] or r['dir']}: {r['error']}", file=sys.stderr)
        if stop is not None or interrupted:
            print("rerun the same command to resume them", file=sys.stderr)
            raise SystemExit(128 + (stop or signal.SIGTERM))
        if failed:
            raise SystemExit(1)
