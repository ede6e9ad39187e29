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
import textwrap
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT, run
from tests.slurm_cluster import why_not

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


@pytest.mark.slow
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


def test_where_the_cluster_cannot_be_had_the_tests_say_why_in_one_line(monkeypatch):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert why_not() == ("a SLURM cluster needs root to start slurmctld and slurmd (run the tests as root, as CI "
                         "does)")
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "slurmd" else f"/usr/sbin/{name}")
    assert why_not() == "SLURM is not installed (slurmd not found): apt-get install slurm-wlm (.ci/run does)"


@pytest.mark.parametrize("accounting", [True, False])
def test_the_jobs_states_come_from_sacct_where_it_answers_else_from_squeue(monkeypatch, accounting):
    """sacct's words where the cluster keeps accounting ("CANCELLED by 0"); else squeue's, and a job squeue no longer
    knows has ended (the cluster's own jobs run without accounting above)."""
    from neftlab.sweep import slurm

    def answer(command, **kwargs):
        if command[0] == "sacct" and not accounting:
            raise subprocess.CalledProcessError(1, command, stderr="Slurm accounting storage is disabled")
        out = "JobID|State|NodeList\n7|CANCELLED by 0|vm\n8|RUNNING|vm\n" if command[0] == "sacct" else "8|RUNNING|vm\n"
        return subprocess.CompletedProcess(command, 0, stdout=out)

    monkeypatch.setattr(slurm.subprocess, "run", answer)
    watcher = slurm._watcher()
    assert [watcher.is_done(job, mode="force") for job in ("7", "8")] == [True, False]
    assert watcher.get_state("7", mode="cache") == ("CANCELLED by 0" if accounting else "ENDED")
    assert watcher.accounting is accounting


def test_a_stopped_job_leaves_no_result_in_slurm_and_asks_to_be_requeued_after_a_warning(monkeypatch, caplog):
    from neftlab.sweep import slurm
    asked = []

    def refuse(command, **kwargs):
        asked.append(command)
        raise subprocess.CalledProcessError(1, command, stderr="scontrol: error: Requested operation is disabled")

    monkeypatch.setattr(slurm.subprocess, "run", refuse)
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    assert slurm.stopped(128 + signal.SIGUSR2) is None and not asked  # outside SLURM: nothing
    monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # as submitit's batch script sets it
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    with pytest.raises(SystemExit) as ended:
        slurm.stopped(128 + signal.SIGTERM)  # SLURM has requeued it already, or cancelled it
    assert ended.value.code == 128 + signal.SIGTERM and not asked
    with pytest.raises(SystemExit):
        slurm.stopped(128 + signal.SIGUSR2)
    assert asked == [["scontrol", "requeue", "7"]]
    assert "SLURM job 7 could not be requeued (scontrol: error: Requested operation is disabled): the same sweep " \
           "command again resumes it" in caplog.text


def _running_job(cluster) -> str:
    (job,) = [j for j, state in cluster.jobs().items() if state == "RUNNING"]
    return job


@pytest.mark.slow
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


@pytest.mark.slow
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


def _recipe(n: int) -> str:
    """The n-th shell block of docs/sweeps.md's SLURM search recipes."""
    text = (ROOT / "docs" / "sweeps.md").read_text().split("**A search on a SLURM cluster**")[1]
    return textwrap.dedent(text.split("```bash\n")[n + 1].split("```")[0])


def _tiny(recipe: str, tmp_path: Path, **more: str) -> str:
    """A recipe sized for this node: tiny runs, 4 trials, no GPU, the shared file system under tmp_path."""
    for old, new in {"size=gpu": "size=tiny logger=none", "hydra.sweeper.n_trials=30": "hydra.sweeper.n_trials=4",
                     "/shared/neftlab": str(tmp_path), "python -m": f"{sys.executable} -m", **more}.items():
        assert old in recipe, old
        recipe = recipe.replace(old, new)
    return recipe


def _study(tmp_path: Path):
    import optuna
    from neftlab.sweep.study import open_storage
    return optuna.load_study(study_name="neftune_search_tiny",
                             storage=open_storage(f"journal:{tmp_path}/neftune_search.journal"))


def _complete_without_repeats(tmp_path: Path) -> list:
    """The study's trials, once it has ended at n_trials=4 completed trials, each run trained once."""
    from optuna.trial import TrialState

    from neftlab.sweep.study import counted
    trials = _study(tmp_path).trials
    assert len(counted(trials)) == 4 and all(t.state == TrialState.COMPLETE for t in counted(trials))
    assert not any(t.state == TrialState.RUNNING for t in trials)
    runs = [json.loads(p.read_text()) for p in tmp_path.glob("outputs/experiments/*/*/*/summary.json")]
    done = [r for r in runs if r.get("status") == "completed"]
    assert sorted(r["eval/loss"] for r in done) == sorted(t.value for t in counted(trials))  # none trained twice
    return trials


@pytest.mark.slow
def test_the_recipe_of_sweepers_on_the_login_node_submitting_their_trials(slurm_cluster, tmp_path):
    script = _tiny(_recipe(0), tmp_path, **{
        "for i in 1 2 3": "for i in 1 2",
        "hydra.launcher.partition=gpu hydra.launcher.gpus_per_node=1": "hydra.launcher.partition=debug "
        "hydra.launcher.gpus_per_node=0 hydra.launcher.cpus_per_task=1 hydra.launcher.mem_gb=1"})
    subprocess.run(["bash", "-c", script + "wait\n"], cwd=tmp_path, check=True, timeout=600)
    for i in (1, 2):
        log = (tmp_path / f"sweeper_{i}.log").read_text()
        assert "Traceback" not in log and "Bypassing sacct" not in log, log[-3000:]
    trials = _complete_without_repeats(tmp_path)
    assert len(trials) == 4
    assert not LIVE & set(_settled(slurm_cluster).values())


def _array_task(run: Path) -> str:
    """The SLURM array task (JOB_TASK) of the sweeper whose trial trains in `run`: its pid in the sweep's ledger,
    its task in that process's environment (one node: /proc holds it)."""
    pid = [json.loads(line) for line in (run.parent / "jobs.jsonl").read_text().splitlines()][-1]["pid"]
    env = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
    return f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"


@pytest.mark.slow
def test_the_recipe_of_an_sbatch_array_of_sweepers_with_one_task_cancelled_mid_trial(slurm_cluster, tmp_path):
    script = _tiny(_recipe(1), tmp_path, **{"--array=0-3 --gpus=1": "--array=0-1",
                                            "size=tiny logger=none": "size=tiny logger=none " + " ".join(LONG)})
    (tmp_path / "search.sbatch").write_text(script)
    submitted = subprocess.run(["sbatch", "--parsable", "search.sbatch"], cwd=tmp_path, capture_output=True, text=True)
    assert submitted.returncode == 0, submitted.stderr
    array = submitted.stdout.strip()
    deadline = time.monotonic() + 300
    while not (started := list(tmp_path.glob("outputs/experiments/*/*/*/checkpoints/checkpoint-4"))):
        assert time.monotonic() < deadline, slurm_cluster.jobs()
        time.sleep(0.2)
    run = started[0].parent.parent
    cancelled = _array_task(run)
    subprocess.run(["scancel", cancelled], check=True)
    deadline = time.monotonic() + 600
    while LIVE & {state for job, state in slurm_cluster.jobs().items() if job.startswith(f"{array}_")}:
        assert time.monotonic() < deadline, slurm_cluster.jobs()
        time.sleep(1)
    assert slurm_cluster.jobs()[cancelled] == "CANCELLED"
    trials = _complete_without_repeats(tmp_path)
    (stopped,) = [t for t in trials if t.system_attrs.get("failed_trial") is None and t.state.name == "FAIL"]
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == stopped.number)
    assert retry.params == stopped.params and retry.state.name == "COMPLETE"  # tried again
    assert f"Resuming {run} from checkpoint-" in (run / "neftlab.log").read_text()  # from the stopped run's checkpoint
    for out in tmp_path.glob("slurm-*.out"):
        assert "Traceback" not in out.read_text(), out.read_text()[-3000:]
