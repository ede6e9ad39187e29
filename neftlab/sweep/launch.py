"""The launching process: before Hydra creates a run's or a sweep's directory, it must be usable; a sweep's
directory is fixed once, whatever the launcher, or the newest unfinished sweep of the same command is continued;
every job appends how it ended to the sweep's jobs.jsonl, which gives the exit code and the list of failed jobs
for every launcher; and a stop signal to the launching process reaches the running jobs, which checkpoint, before
the sweep exits with 128 + the signal."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sqlite3
import sys
from pathlib import Path
from typing import Optional

import psutil
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from ..config import run_id
from ..core import rundir
from ..core.errors import ConfigError
from ..core.ledger import LAUNCHER_PID_ENV, SWEEP_ENV, append, ledger_rows
from ..run.signals import STOP_SIGNALS



MIN_FREE_BYTES = 200 * 2**20
JOURNAL = "journal:"  # hydra.sweeper.storage=journal:PATH: an Optuna study in a journal file (a shared file system)


def journal_path(storage: str) -> Optional[Path]:
    return Path(storage.removeprefix(JOURNAL)) if storage.startswith(JOURNAL) else None


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


def check_study_file(path: Path) -> None:
    """A study's SQLite file, if there is one, must be readable before the search starts: a damaged one would
    otherwise end the search in a traceback from deep inside Optuna."""
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        result = str(e)
    if result != "ok":
        raise ConfigError(f"the study database {path} is damaged ({result}): move it aside to start a new study "
                          "there, or point hydra.sweeper.storage elsewhere")
    upgrade_study_file(path)


def _schema(path: Path) -> tuple[Optional[str], Optional[str]]:
    """(the Alembic revision of an Optuna SQLite study, the Optuna version that set it up), read without Optuna."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            revision = db.execute("SELECT version_num FROM alembic_version").fetchone()
            written = db.execute("SELECT library_version FROM version_info").fetchone()
    except sqlite3.DatabaseError:  # not an Optuna study (yet): Optuna sets it up or names the problem
        return None, None
    return (revision[0] if revision else None), (written[0] if written else None)


def upgrade_study_file(path: Path) -> Optional[Path]:
    """A study set up by an older Optuna (2.10, under neftlab before its search moved to Optuna 5): copied aside,
    then upgraded in place, since `optuna storage upgrade` is one-way and the older Optuna cannot read it after.
    Returns the copy, or None when the study is current."""
    import logging
    import warnings

    import optuna
    revision, written = _schema(path)
    head = optuna.storages.RDBStorage("sqlite:///:memory:").get_current_version()
    if revision is None or revision == head:
        return None
    backup = path.with_name(f"{path.name}.optuna-{written or revision}.bak")
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as source, \
            contextlib.closing(sqlite3.connect(backup)) as copy:
        source.backup(copy)  # a consistent copy, even of a database another process has open
    logging.disable(logging.INFO)  # Alembic's step-by-step migration log
    try:
        with warnings.catch_warnings():  # Optuna 2's distributions, read once to be converted
            warnings.simplefilter("ignore", FutureWarning)
            optuna.storages.RDBStorage(f"sqlite:///{path}", skip_compatibility_check=True).upgrade()
    except Exception as e:  # noqa: BLE001 - whatever Alembic or SQLAlchemy raise, the copy is intact
        raise ConfigError(f"the study database {path} (set up by Optuna {written}) could not be upgraded to "
                          f"Optuna {optuna.__version__}'s schema ({type(e).__name__}: {e}); the original is kept "
                          f"as {backup}") from e
    finally:
        logging.disable(logging.NOTSET)
    print(f"Upgraded the study database {path}, set up by Optuna {written}, to Optuna {optuna.__version__}'s "
          f"schema; the original is kept as {backup} (an upgraded study cannot be read by the older Optuna)",
          file=sys.stderr)
    return backup


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
        rows = ledger_rows(earlier / rundir.SWEEP_JOBS)
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

    def __init__(self) -> None:
        # Hydra 1.4 ends a sweep whose start was refused too: then there is no ledger and nothing to restore
        self.previous: dict = {}
        self.ledger: Path | None = None

    @staticmethod
    def _check(check, path: str) -> None:
        try:
            check(Path(path))
        except ConfigError as e:  # Hydra's own logging (to stdout) is in force here, not the run's
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        search = OmegaConf.select(config, "hydra.runtime.choices.hparams_search")
        if search is not None:  # a search composed as one run would train one job at the defaults and stop
            print(f"Error: hparams_search={search} is a sweep: run it with -m (python -m neftlab -m "
                  f"hparams_search={search} ...)", file=sys.stderr)
            raise SystemExit(2)
        self._check(check_output_dir, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
        sweep_dir = _continued_sweep(config) or Path(str(config.hydra.sweep.dir))
        if sweep_dir != Path(str(config.hydra.sweep.dir)):
            print(f"Continuing the unfinished sweep {sweep_dir}: its completed jobs are reused, its interrupted ones "
                  "resumed, its failed ones tried again (hydra.sweep.dir=NEW for a new sweep)", file=sys.stderr)
        with read_write(config.hydra), open_dict(config.hydra):  # resolved once, here, for every job and launcher
            config.hydra.sweep.dir = str(sweep_dir)
            config.hydra.overrides.hydra.append(f"hydra.sweep.dir='{sweep_dir}'")
        self._check(check_output_dir, str(sweep_dir))
        storage = str(config.hydra.sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):  # an Optuna study's database: SQLite does not make its folder
            study = storage.removeprefix("sqlite:///")
            self._check(check_output_dir, str(Path(study).parent))
            self._check(check_study_file, Path(study))
        elif journal := journal_path(storage):  # nor does Optuna's journal file
            self._check(check_output_dir, str(journal.parent))
        self.ledger, self.sweep = sweep_dir / rundir.SWEEP_JOBS, run_id()
        append(self.ledger, {"sweep": self.sweep, "command": list(config.hydra.overrides.task),
                                          "pattern": pattern})
        os.environ[SWEEP_ENV], os.environ[LAUNCHER_PID_ENV] = self.sweep, str(os.getpid())
        self.previous = {s: signal.signal(s, self._stop) for s in STOP_SIGNALS}

    def _stop(self, signum, frame) -> None:
        """A stop signal to the launching process: jobs not started yet will not start, and the running ones (in
        other processes: a parallel launcher's workers) are sent SIGTERM and checkpoint; the launcher waits for
        them, and the sweep exits with 128 + signum at its end."""
        append(self.ledger, {"sweep": self.sweep, "stop": signum})
        print(f"{signal.Signals(signum).name} received: stopping the sweep's jobs; each saves a checkpoint",
              file=sys.stderr)
        me = psutil.Process()
        descendants = {p.pid for p in me.children(recursive=True)}
        for pid in self._running():
            if pid in descendants:
                os.kill(pid, signal.SIGTERM)

    def _running(self) -> set[int]:
        """The pids of this sweep's jobs that started and have not ended."""
        last = {r["job"]: r for r in ledger_rows(self.ledger)
                if r["sweep"] == self.sweep and "job" in r}
        return {r["pid"] for r in last.values() if r["status"] == "running"}

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        if self.ledger is None:  # refused at its start (on_multirun_start said why)
            return
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        rows = [r for r in ledger_rows(self.ledger) if r["sweep"] == self.sweep]
        stop = next((r["stop"] for r in rows if "stop" in r), None)
        jobs = {r["job"]: r for r in rows if "job" in r}  # the last line of each job
        failed = [r for r in jobs.values() if r["status"] in ("failed", "refused")]
        busy = [r for r in jobs.values() if r["status"] == "busy"]
        interrupted = [r for r in jobs.values() if r["status"] == "interrupted"]
        reused = [r for r in jobs.values() if r["status"] == "reused"]
        append(self.ledger, {"sweep": self.sweep, "end": True, "failed": len(failed) + len(busy),
                             "interrupted": len(interrupted) + (stop is not None)})
        if reused:
            print(f"{len(reused)} job(s) were already completed: their results are reused", file=sys.stderr)
        for what, rows_ in (("failed", failed), ("were interrupted", interrupted),
                            ("were being run by another process", busy)):
            if rows_:
                print(f"{len(rows_)} job(s) {what}:", file=sys.stderr)
                for r in sorted(rows_, key=lambda r: r["job"]):
                    print(f"  {r['run'] or r['dir']}: {r['error']}", file=sys.stderr)
        if busy:
            print("rerun the same command once it has ended: their results are then reused", file=sys.stderr)
        if stop is not None or interrupted:
            print("rerun the same command to resume them", file=sys.stderr)
            raise SystemExit(128 + (stop or signal.SIGTERM))
        if failed or busy:
            raise SystemExit(1)
