"""Sweeps on a real SLURM cluster (the one-node cluster of tests/slurm_cluster.py, without accounting): jobs
submitted by `hydra/launcher=slurm` complete with the local launcher's results, a failed job is reported and rerun
as a local one is; a job requeued (`scontrol requeue`, what preemption with requeue does), warned of its time limit
(USR2, submitit's `--signal`; USR1, the recipe's) or cancelled resumes from its checkpoint, the sweep waiting for
the requeued job; and the docs' two SLURM search recipes, sized tiny. Skipped, saying why, where the cluster cannot
be had (not root, slurm-wlm not installed)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, run

pytestmark = pytest.mark.slow

TINY = ["size=tiny", "logger=none"]
ON_SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0",
            "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=1"]
LONG = ["trainer.max_steps=12", "trainer.save_steps=4"]  # long enough to be stopped mid-training
LIVE = {"PENDING", "RUNNING", "REQUEUED", "COMPLETING", "CONFIGURING", "SUSPENDED"}


def _sweep(tmp_path: Path, *overrides: str) -> subprocess.Popen:
    """`python -m neftlab -m` through SLURM, its outputs under tmp_path, its terminal in tmp_path/sweep.log."""
    log = (tmp_path / "sweep.log").open("a")
    return subprocess.Popen([sys.executable, "-m", "neftlab", "-m", *ON_SLURM, *TINY, f"output_root={tmp_path}",
                             *overrides], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True)


def _finish(tmp_path: Path, proc: subprocess.Popen, timeout: int = 300) -> str:
    """What the sweep printed since the last look, once it has ended."""
    proc.wait(timeout=timeout)
    text = (tmp_path / "sweep.log").read_text()
    (tmp_path / "sweep.log").write_text("")
    return text


def _wait(condition, what: str, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the sweep ended ({proc.returncode}) before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: {log.read_text()[-3000:]}"
        time.sleep(0.2)


def _sweep_dir(tmp_path: Path) -> Path:
    (sweep,) = (tmp_path / "multiruns").iterdir()
    return sweep


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> float:
    """The eval loss of the stopped runs' config, run here without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted")
    outcome, summary = run(*TINY, *LONG, out_dir=out)
    assert outcome.status == "completed", outcome.message
    return summary["eval/loss"]


def test_a_sweep_through_slurm_matches_the_local_launcher_and_is_finished_by_its_rerun(slurm_cluster, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i} it is"}) + "\n" for i in range(40)))
    data = ["data=alpaca", f"data.path={good},{tmp_path / 'late.jsonl'}"]
    text = _finish(tmp_path, _sweep(tmp_path, *data))
    assert "1 job(s) failed:" in text and "late.jsonl: no such file" in text, text[-3000:]
    assert "Bypassing sacct" not in text and "Traceback" not in text  # no accounting here, quietly
    sweep = _sweep_dir(tmp_path)
    assert [_summary(sweep / j)["status"] for j in "01"] == ["completed", "failed"]
    local, summary = run(*TINY, "data=alpaca", f"data.path={good}", out_dir=tmp_path / "local")
    assert _summary(sweep / "0")["eval/loss"] == summary["eval/loss"]  # the same run, whichever launcher

    shutil.copy(good, tmp_path / "late.jsonl")
    proc = _sweep(tmp_path, *data)
    text = _finish(tmp_path, proc)
    assert proc.returncode == 0, text[-3000:]
    assert f"Continuing the unfinished sweep {sweep}" in text
    assert "1 job(s) were already completed: their results are reused" in text
    assert _summary(sweep / "1")["status"] == "completed"
    assert not LIVE & set(_settled(slurm_cluster).values())


def _settled(cluster) -> dict[str, str]:
    """Every job's state once none is live: a job's last process may still be exiting when the sweep has its
    result."""
    deadline = time.monotonic() + 60
    while LIVE & set((jobs := cluster.jobs()).values()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return jobs


def _running_job(cluster) -> str:
    (job,) = [j for j, state in cluster.jobs().items() if state == "RUNNING"]
    return job


@pytest.mark.parametrize("stop", [
    ["scontrol", "requeue"],  # what a preemption that requeues does: SIGTERM, the job pending again
    ["scancel", "--signal=USR2"],  # submitit's time-limit warning (--signal=USR2@signal_delay_s), as SLURM sends it
    ["scancel", "--signal=USR1"],  # the sbatch recipe's warning (--signal=USR1@120)
])
def test_a_stopped_job_is_requeued_and_resumed_while_the_sweep_waits(slurm_cluster, tmp_path, uninterrupted, stop):
    proc = _sweep(tmp_path, *LONG)
    log = tmp_path / "sweep.log"
    _wait(lambda: any(tmp_path.glob("multiruns/*/0/checkpoints/checkpoint-4")), "checkpoint-4", proc, log)
    job = _running_job(slurm_cluster)
    subprocess.run([*stop, job], check=True)
    _wait(lambda: slurm_cluster.jobs().get(job) == "PENDING", "the job requeued", proc, log)
    slurm_cluster.release(job)
    text = _finish(tmp_path, proc)
    assert proc.returncode == 0, text[-3000:]
    run_dir = _sweep_dir(tmp_path) / "0"
    summary = _summary(run_dir)
    assert summary["status"] == "completed" and summary["eval/loss"] == uninterrupted
    assert f"Resuming {run_dir} from checkpoint-" in (run_dir / "neftlab.log").read_text()
    assert _settled(slurm_cluster)[job] == "COMPLETED"  # and nothing left to run behind the sweep's back


def test_a_cancelled_job_is_named_and_the_same_command_resumes_it(slurm_cluster, tmp_path, uninterrupted):
    proc = _sweep(tmp_path, *LONG)
    log = tmp_path / "sweep.log"
    _wait(lambda: any(tmp_path.glob("multiruns/*/0/checkpoints/checkpoint-4")), "checkpoint-4", proc, log)
    job = _running_job(slurm_cluster)
    subprocess.run(["scancel", job], check=True)
    text = _finish(tmp_path, proc)
    assert proc.returncode == 128 + signal.SIGTERM, text[-3000:]
    assert f"SLURM job {job} (#0: " in text and ") was cancelled: its run stopped with a checkpoint" in text
    assert "Traceback" not in text
    run_dir = _sweep_dir(tmp_path) / "0"
    assert _summary(run_dir)["status"] == "interrupted"
    proc = _sweep(tmp_path, *LONG)
    text = _finish(tmp_path, proc)
    assert proc.returncode == 0, text[-3000:]
    assert _summary(run_dir)["eval/loss"] == uninterrupted
    assert f"Resuming {run_dir} from checkpoint-" in (run_dir / "neftlab.log").read_text()
    assert not LIVE & set(_settled(slurm_cluster).values())
