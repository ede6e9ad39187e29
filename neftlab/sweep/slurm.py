"""A sweep's jobs on SLURM (`hydra/launcher=slurm`): hydra-submitit-launcher, with the two things a real cluster
needs more.

In the launching process (`SlurmLauncher`), the wait for the jobs holds whether or not the cluster keeps
accounting: submitit asks `sacct`, and where it does not answer (no slurmdbd) asks `squeue` instead, quietly, so a
requeued job is waited for and a cancelled one is seen to end. A job that ends without a result (cancelled, killed,
its node lost) is reported as a local job that did not complete is: its status in the sweep's jobs.jsonl and one
line naming the SLURM job, and the sweep goes on to its end.

In a job (`stopped`): a stop signal stops the run with a checkpoint, as anywhere; then the job leaves no result,
so that the sweep waits for its next run. SLURM reruns the job itself after `scontrol requeue` or a preemption
that requeues; a time limit's warning (`--signal`: USR2, submitit's, or USR1, the sbatch recipe's) makes the job
requeue itself, as submitit does. The rerun resumes the run from its checkpoint; a job cancelled (`scancel`) is
not rerun, and the same sweep command again resumes it.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as SubmititSlurmLauncher


log = logging.getLogger(__name__)

WARNINGS = (signal.SIGUSR1, signal.SIGUSR2)  # a time limit's warning (sbatch --signal): the job requeues itself
# States of a job that will not run again (sacct's or squeue's words); any other (pending, running, requeued,
# completing, suspended) is waited for. ENDED: neither knows the job any more.
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED", "REVOKED", "SPECIAL_EXIT", "ENDED"}
POLL_S = 60  # the longest wait between two looks at the jobs' states (submitit looks sooner after a submission)


def _state(info: dict) -> str:
    return (info.get("State") or "UNKNOWN").split()[0].upper()  # sacct says "CANCELLED by 0"


def _watcher():
    """submitit's watcher of SLURM jobs, asking `squeue` where `sacct` does not answer."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    class QueueWatcher(SlurmInfoWatcher):
        accounting = True

        def is_done(self, job_id: str, mode: str = "standard") -> bool:
            return _state(self.get_info(job_id, mode=mode)) in ENDED

        def update(self) -> None:
            command = self._make_command()
            if command is None:
                return
            self._num_calls += 1
            out = None
            if self.accounting:
                try:
                    out = subprocess.run(command, capture_output=True, text=True, check=True, timeout=120).stdout
                except (OSError, subprocess.SubprocessError):
                    self.accounting = False
                    log.info("sacct does not answer (the cluster keeps no accounting): the jobs' states are "
                             "read from squeue")
            if out is None:
                out = self._queue()
            if out is not None:
                self._info_dict.update(self.read_info(out))
            self._last_status_check = time.time()
            self._finished |= {j for j in self._registered - self._finished if self.is_done(j, mode="cache")}

        def _queue(self) -> str | None:
            """sacct's answer, from squeue: the jobs the controller still knows (an ended one for MinJobAge,
            5 minutes by default); a job it no longer knows has ENDED."""
            try:
                out = subprocess.run(["squeue", "--me", "-h", "-r", "--states=all", "-o", "%i|%T|%N"],
                                     capture_output=True, text=True, check=True, timeout=120).stdout
            except (OSError, subprocess.SubprocessError) as e:
                log.warning("squeue did not answer (%s): the jobs' states are looked at again later", e)
                return None
            known = {line.split("|")[0] for line in out.splitlines()}
            gone = [f"{j}|ENDED|" for j in self._registered - self._finished if j not in known]
            return "\n".join(["JobID|State|NodeList", *out.splitlines(), *gone])

    return QueueWatcher(delay_s=POLL_S)


class SlurmLauncher(SubmititSlurmLauncher):
    """hydra-submitit-launcher's SLURM launcher (conf/hydra/launcher/slurm.yaml), whose wait holds on a cluster with
    or without accounting, and whose jobs that end without a result are reported as neftlab's local jobs are."""

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        """The base class's launch (its executor, parameters and array of jobs), with the wait above."""
        import submitit
        from hydra.core.singleton import Singleton
        from hydra.core.utils import filter_overrides
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
        from omegaconf import OmegaConf

        specific = {"max_num_timeout", "python"}
        executor = submitit.AutoExecutor(cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
                                         **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                            if k in specific})
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in specific | {"submitit_folder"}})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        log.info("Submitit '%s' sweep output dir : %s", self._EXECUTOR, sweep_dir)
        params = []
        for number, overrides in enumerate(job_overrides, initial_job_idx):
            log.info("\t#%d : %s", number, " ".join(filter_overrides(overrides)))
            params.append((list(overrides), "hydra.sweep.dir", number, f"job_id_for_{number}", Singleton.get_state()))
        jobs = executor.map_array(self, *zip(*params))
        watcher = _watcher()
        for job in jobs:
            job.watcher = watcher
        return [self._result(job, list(overrides), number)
                for number, (job, overrides) in enumerate(zip(jobs, job_overrides), initial_job_idx)]

    def _result(self, job, overrides: list[str], number: int) -> JobReturn:
        """The job's own return, or, for a job that ended without one, what a local job that did not complete
        returns (None), its status in the sweep's ledger and one line naming it."""
        while not job.done():
            time.sleep(1)
        if job.paths.result_pickle.exists():
            return job.results()[0]
        from ..core import ledger  # here, not above: the launcher class is imported at every start, --help included
        state = job.state.split()[0]
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        last = ledger.job_statuses(sweep_dir).get(number)
        what = "was cancelled" if state == "CANCELLED" else f"ended {state}"
        if last == "interrupted":
            print(f"SLURM job {job.job_id} (#{number}: {' '.join(overrides)}) {what}: its run stopped with a "
                  "checkpoint, which the same command resumes", file=sys.stderr)
        else:
            message = f"SLURM job {job.job_id} {what} without a result; its log: {job.paths.stderr}"
            print(f"#{number}: {message}", file=sys.stderr)
            ledger.record_job(sweep_dir, number, sweep_dir / str(number), "failed", message=message)
        ret = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        ret.return_value = None
        return ret


def in_slurm_job() -> bool:
    """Whether this process is a sweep's job that the SLURM launcher submitted (submitit's own test)."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm"


def stopped(exit_code: int) -> None:
    """A sweep's job in SLURM that a signal stopped (its run checkpointed, `exit_code` 128 + the signal) ends here
    with no result, so that the sweep waits for its next run: after a time limit's warning, the job first asks
    SLURM to requeue it (as submitit does); after SIGTERM, SLURM has requeued it already, or cancelled it, which
    the launching process sees. Anywhere else, nothing."""
    if not in_slurm_job():
        return
    if exit_code - 128 in WARNINGS:
        import submitit
        job = submitit.JobEnvironment().job_id
        try:
            subprocess.run(["scontrol", "requeue", job], check=True, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:  # a job that may not be requeued (--no-requeue), say
            reason = (getattr(e, "stderr", None) or str(e)).strip().splitlines()[-1]
            log.warning("SLURM job %s could not be requeued (%s): the same sweep command again resumes it", job,
                        reason)
        else:
            log.warning("SLURM job %s requeued: its next run resumes from the checkpoint", job)
    raise SystemExit(exit_code)

