"""An Optuna study that several sweeper processes share, on one machine or many: through a journal file on a
shared file system (`hydra.sweeper.storage=journal:PATH`) or any SQLAlchemy URL (a PostgreSQL server; SQLite on
one machine).

Hydra's Optuna sweeper runs `n_trials` in each process and leaves a killed process's trial RUNNING for ever; a
shared study needs three things more, built here over Optuna's ask/tell and the study's own records, so that every
process decides alike from the same storage:
- the study ends at `n_trials` in all: a process asks only while the study holds fewer, and a trial asked in the
  same instant as another process's last one is dropped by its number (`SURPLUS`), before it draws anything;
- each running trial names its process (`OWNER`, as `run.lock` does) and is renewed every `claim.HEARTBEAT_S`
  (`HEARTBEAT`); a trial whose process is gone (on this machine: no such process; elsewhere: not renewed for
  `claim.STALE_AFTER_S`, the rule that frees a run directory) is failed by whichever process sees it first and
  retried with the same parameters (Optuna's `RetryHeartbeatStaleTrialCallback`), so the retry resumes that run
  from its checkpoint; a trial whose job was interrupted (a stop signal) is retried the same way at once;
- a process whose share is done waits for the trials other processes are running, and takes over any that go
  stale, so the study never ends with a trial lost.

`StudySweeperImpl` is Hydra's Optuna sweeper (its search space, custom spaces, samplers and result file) with
its one-method `sweep()` loop replaced by one over a `SharedStudy`.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import sys
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import optuna
from optuna.exceptions import ExperimentalWarning, UpdateFinishedTrialError
from optuna.storages import RetryHeartbeatStaleTrialCallback
from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl, create_params_from_overrides
from omegaconf import OmegaConf
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from optuna.trial import FrozenTrial, Trial, TrialState

from ..core import claim
from ..core import ledger
from ..core.errors import ConfigError
from .launch import journal_path

log = logging.getLogger(__name__)

OWNER, HEARTBEAT, SURPLUS = "neftlab:owner", "neftlab:heartbeat", "neftlab:surplus"  # trials' system attrs
MAX_RETRY = 3  # a trial whose process keeps dying is retried this often, then counts as failed
CREATE_TRIES = 5  # opening a study that sweepers create together: the ones that lose the race try again


def open_storage(spec: Optional[str]) -> Optional[optuna.storages.BaseStorage]:
    """The storage `hydra.sweeper.storage` names: `journal:PATH`, an SQLAlchemy URL, or none (in memory: a study of
    this process alone)."""
    if spec is None:
        return None
    if (journal := journal_path(spec)) is not None:
        path = str(journal)  # the open lock (O_EXCL) is Optuna's choice for a network file system
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(
            path, lock_obj=optuna.storages.journal.JournalFileOpenLock(path)))
    # SQLite's default 5 s wait for a write lock is short for two sweepers writing at once
    engine = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite") else {}
    return optuna.storages.RDBStorage(spec, engine_kwargs=engine)


def open_study(storage: Optional[str], name: Optional[str], sampler: Any, directions: list[str]) -> optuna.Study:
    """The study, created or loaded; a storage that cannot be opened (a server down, a wrong URL or password, a
    driver not installed) is named in one line."""
    try:
        for attempt in range(CREATE_TRIES):
            try:
                return optuna.create_study(study_name=name, storage=open_storage(storage), sampler=sampler,
                                           directions=directions, load_if_exists=True)
            except IntegrityError:
                # Sweepers started together on a fresh database each create Optuna's tables; the server lets one
                # win (PostgreSQL: `duplicate key ... pg_type_typname_nsp_index`) and the others find them made.
                if attempt == CREATE_TRIES - 1:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except (SQLAlchemyError, ImportError, OSError, ValueError) as e:
        reason = str(getattr(e, "orig", None) or e).strip().splitlines()[0]
        raise ConfigError(f"the study's storage hydra.sweeper.storage={storage} cannot be opened: {reason}") from e


def retried(trials: list[FrozenTrial]) -> set[int]:
    """The numbers of the trials that were retried: a retry takes their place."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        return {n for t in trials for n in RetryHeartbeatStaleTrialCallback.retry_history(t)}


def counted(trials: list[FrozenTrial]) -> list[FrozenTrial]:
    """The trials that count toward `n_trials`: all but a retried trial (its retry counts) and a surplus one."""
    gone = retried(trials)
    return [t for t in trials if t.number not in gone and not t.system_attrs.get(SURPLUS)]


class SharedStudy:
    """One process's hold on a study that others may share: asks for at most its share, renews its running
    trials, fails and retries the stale trials of processes that are gone."""

    def __init__(self, study: optuna.Study, n_trials: int):
        self.study, self.n_trials = study, n_trials
        self.storage = study._storage  # noqa: SLF001 - the storage the study was opened on, for system attrs
        self.mine: set[int] = set()  # trial ids this process is running
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            self._retry = RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)

    def _trials(self) -> list[FrozenTrial]:
        return self.study.get_trials(deepcopy=False)

    def left(self) -> int:
        """How many more trials the study needs, counting the running and waiting ones."""
        return self.n_trials - len(counted(self._trials()))

    def ask(self, k: int) -> list[Trial]:
        """Up to `k` trials for this process (a waiting retry first, as Optuna's ask pops one); none when the study
        is full. A trial that another process's, asked at the same moment, has pushed past `n_trials` is failed as
        surplus before it draws a parameter."""
        waiting = sum(t.state == TrialState.WAITING for t in self._trials())
        trials = [self.study.ask() for _ in range(min(k, max(self.left(), 0) + waiting))]
        numbers = sorted(t.number for t in counted(self._trials()))
        kept = []
        for trial in trials:
            if trial.number in numbers[:self.n_trials]:
                kept.append(trial)
                self._own(trial._trial_id)  # noqa: SLF001
            else:
                self.storage.set_trial_system_attr(trial._trial_id, SURPLUS, True)  # noqa: SLF001
                self.study.tell(trial, state=TrialState.FAIL)
        return kept

    def _own(self, trial_id: int) -> None:
        self.storage.set_trial_system_attr(trial_id, OWNER, claim.owner())
        self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
        self.mine.add(trial_id)

    def tell(self, trial: Trial, values: Optional[list[float]]) -> None:
        self.mine.discard(trial._trial_id)  # noqa: SLF001
        self.study.tell(trial, values=values, state=TrialState.FAIL if values is None else TrialState.COMPLETE)

    def give_back(self, trial: Trial) -> None:
        """A trial this process will not finish (its job was stopped): failed, and retried with its parameters, by
        this process or another, which resumes its run."""
        self.mine.discard(trial._trial_id)  # noqa: SLF001
        self._fail_and_retry(trial._trial_id)  # noqa: SLF001

    def _fail_and_retry(self, trial_id: int) -> bool:
        try:
            if not self.storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                return False
        except UpdateFinishedTrialError:  # another process failed it first, and retries it
            return False
        self._retry(self.study, self.storage.get_trial(trial_id))
        return True

    def others_running(self) -> list[FrozenTrial]:
        return [t for t in self._trials() if t.state == TrialState.RUNNING and t._trial_id not in self.mine]  # noqa: SLF001

    def fail_stale(self) -> list[int]:
        """Fail and retry the running trials of processes that are gone; their numbers."""
        now, failed = time.time(), []
        for t in self.others_running():
            beat = t.system_attrs.get(HEARTBEAT, t.datetime_start.timestamp() if t.datetime_start else now)
            if not claim.alive(t.system_attrs.get(OWNER, {}), now - beat) and \
                    self._fail_and_retry(t._trial_id):  # noqa: SLF001
                failed.append(t.number)
        if failed:
            log.warning("Trial(s) %s: their process is gone; failed, and queued to be tried again with the same "
                        "parameters", ", ".join(map(str, failed)))
        return failed

    @contextmanager
    def beating(self) -> Iterator[None]:
        """Renew this process's running trials every `claim.HEARTBEAT_S` while its jobs run."""
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(claim.HEARTBEAT_S):
                for trial_id in list(self.mine):
                    try:
                        self.storage.set_trial_system_attr(trial_id, HEARTBEAT, time.time())
                    except Exception as e:  # noqa: BLE001 - an unreachable storage: the trial may go stale
                        log.warning("Could not renew trial %s in the study's storage: %s", trial_id, e)

        thread = threading.Thread(target=beat, daemon=True, name="study-heartbeat")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()


POLL_S = 5  # how often a process whose share is done looks at the trials others are running


def values(return_value: Any, n: int) -> Optional[list[float]]:
    """The job's objective as Optuna's values, or None (a failed trial) when it is not n finite numbers."""
    try:
        out = [float(return_value)] if n == 1 else [float(v) for v in return_value]
    except (TypeError, ValueError):
        return None
    return out if len(out) == n else None


class StudySweeperImpl(OptunaSweeperImpl):
    """Hydra's Optuna sweeper, whose `n_trials` is the study's total, shared by every process that runs it."""

    def _parse_sweeper_params_config(self) -> list[str]:
        """The sweeper's params as overrides, leaving out those set to "": a search that takes a study's set-up
        drops the study's own grid so (hparams_search/overfit.yaml: `seed: ""`, `noise: ""`; Hydra types them str,
        so not null)."""
        return [f"{k!s}={v}" for k, v in (self.params or {}).items() if v not in (None, "")]

    def _space(self, arguments: list[str]) -> tuple[dict, dict, list[str]]:
        self._process_searchspace_config()
        space, fixed, fixed_overrides = create_params_from_overrides(self._parse_sweeper_params_config() + arguments)
        if isinstance(self.sampler, functools.partial) and self.sampler.func == optuna.samplers.GridSampler:
            grid = {name: self._to_grid_sampler_choices(d) for name, d in space.items()}
            self.sampler = self.sampler(grid)
            self.n_trials = min(self.n_trials, math.prod(len(v) for v in grid.values()))
        return {k: v for k, v in space.items() if k not in fixed}, fixed, fixed_overrides

    def sweep(self, arguments: list[str]) -> None:
        space, fixed, fixed_overrides = self._space(arguments)
        directions = self._get_directions()
        try:
            study = open_study(self.storage, self.study_name, self.sampler, directions)
        except ConfigError as e:  # before any trial, in one line, as RunGuard's checks of the sweep
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2)
        shared = SharedStudy(study, self.n_trials)
        log.info("Study %s in %s: %d of its %d trials to go, %d per batch in this process", study.study_name,
                 self.storage, max(shared.left(), 0), self.n_trials, self.n_jobs)
        waited = False
        while not ledger.sweep_stopped(Path(self.sweep_dir)):
            shared.fail_stale()
            trials = shared.ask(self.n_jobs)
            if not trials:
                others = shared.others_running()
                if not others:
                    break
                if not waited:
                    log.info("This process's share is done; waiting for trial(s) %s, which other processes are "
                             "running (one whose process is gone is tried again here)",
                             ", ".join(str(t.number) for t in others))
                    waited = True
                time.sleep(POLL_S)
                continue
            self._run(shared, trials, space, fixed, fixed_overrides, len(directions))
        self._write_results(study, directions)

    def _run(self, shared: SharedStudy, trials: list, space: dict, fixed: dict, fixed_overrides: list[str],
             n: int) -> None:
        overrides = self._configure_trials(trials, space, fixed, fixed_overrides)
        first = self.job_idx
        with shared.beating():
            try:
                returns = self.launcher.launch(overrides, initial_job_idx=first)
            except BaseException:  # a stop of this process in a job run here: the trials go back to the study
                for trial in trials:
                    shared.give_back(trial)
                raise
        self.job_idx += len(returns)
        status = ledger.job_statuses(Path(self.sweep_dir))
        failures = 0
        for i, (trial, ret) in enumerate(zip(trials, returns)):
            if status.get(first + i) == "interrupted":
                shared.give_back(trial)
                continue
            try:
                value = values(ret.return_value, n)
            except Exception:  # noqa: BLE001 - the job raised: Hydra keeps its exception for the return value
                value = None
            failures += value is None
            shared.tell(trial, value)
        if failures / len(returns) > self.max_failure_rate:
            for ret in returns:
                ret.return_value  # noqa: B018 - Hydra raises the failed job's own error

    def _write_results(self, study: optuna.Study, directions: list[str]) -> None:
        """optimization_results.yaml in this process's sweep directory, as the plugin writes it: the best trial,
        or the Pareto front; nothing when the study has no completed trial yet."""
        if not any(t.state == optuna.trial.TrialState.COMPLETE for t in study.get_trials(deepcopy=False)):
            log.warning("The study has no completed trial: no best parameters to write")
            return
        if len(directions) == 1:
            best = study.best_trial
            result = {"name": "optuna", "best_params": best.params, "best_value": best.value}
            log.info("Best parameters: %s; best value: %s", best.params, best.value)
        else:
            result = {"name": "optuna", "solutions": [{"params": t.params, "values": t.values}
                                                      for t in study.best_trials]}
            log.info("Pareto front: %d trial(s)", len(result["solutions"]))
        OmegaConf.save(OmegaConf.create(result), os.path.join(str(self.sweep_dir), "optimization_results.yaml"))
