"""Resume: SIGTERM saves and a rerun resumes to the same result; runs are found, claimed and never taken over live."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TINY, cli
from neftlab import resume, rundir
from neftlab.config import ConfigError

RESUMABLE = ["size=tiny", "trainer.max_steps=40", "trainer.save_steps=5", "noise=dynamic", "noise.adjust_interval=2",
             "noise.stability_threshold=auto", "pruning=l1", "pruning.interval=3", "pruning.schedule=gradual",
             "pruning.ramp_steps=20", "logger=wandb", "logger.mode=offline"]
# The clock's figures, and the Trainer's own train_loss: its mean over the steps of the last session only.
TIME_DEPENDENT = ("runtime", "per_second", "latency", "memory", "total_flos", "train/train_loss")


def comparable(summary: dict) -> dict:
    """The summary's numbers that do not depend on the clock."""
    return {k: v for k, v in summary.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and not any(t in k for t in TIME_DEPENDENT)}


def neftlab(*overrides):
    return [sys.executable, "-m", "neftlab", *overrides]


def test_sigterm_saves_and_rerunning_the_command_resumes_to_the_uninterrupted_result(tmp_path):
    _, reference = cli(*RESUMABLE, out_dir=tmp_path / "reference")
    assert reference["status"] == "completed"

    command = neftlab(*RESUMABLE, f"hydra.run.dir={tmp_path}/runs/" + "${run_id:}")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(tmp_path.glob("runs/*/checkpoints/checkpoint-5")):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    (run_dir,) = tmp_path.glob("runs/*")
    interrupted = json.loads((run_dir / "summary.json").read_text())
    assert interrupted["status"] == "interrupted" and 5 <= interrupted["step"] < 40
    assert f"checkpoint-{interrupted['step']}" in os.listdir(run_dir / "checkpoints")
    first_run_id = (run_dir / "wandb-run-id").read_text()

    rerun = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Resuming {run_dir} from checkpoint-{interrupted['step']}" in rerun.stderr
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["status"] == "completed"
    assert comparable(resumed) == pytest.approx(comparable(reference), rel=1e-5, abs=1e-6)

    events = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if "train/loss" in e] == list(range(1, 41))  # none lost, none twice
    assert [e["step"] for e in events if "noise/stability" in e] == list(range(2, 41, 2))
    assert [e["step"] for e in events if "pruning/sparsity" in e] == [0, *range(3, 40, 3)]
    assert (run_dir / "wandb-run-id").read_text() == first_run_id
    run_files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))  # one per session, one run id: W&B
    assert len(run_files) == 2 and {p.stem for p in run_files} == {f"run-{first_run_id}"}  # merges them on sync


def test_same_seed_gives_identical_metrics(tmp_path):
    _, first = cli(*TINY, "model=llama_tiny", "noise=uniform", "logger=none", out_dir=tmp_path / "a")
    _, second = cli(*TINY, "model=llama_tiny", "noise=uniform", "logger=none", out_dir=tmp_path / "b")
    assert first["status"] == "completed" and comparable(first) == comparable(second)


def test_explicit_resume_settings(tmp_path):
    data = {"hub": None}
    with pytest.raises(ConfigError, match="trainer.resume=true: no interrupted run"):
        resume.find_resume(True, {"trainer": {}}, tmp_path / "run", data)
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        resume.find_resume(str(tmp_path), {"trainer": {}}, tmp_path / "run", data)
    assert resume.find_resume(False, {"trainer": {}}, tmp_path / "run", data) is None


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    procs = [subprocess.Popen(neftlab("size=tiny", "method=original", "logger=none", "eval.num_generations=0"),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)


def test_a_run_still_in_progress_is_not_taken_over(tmp_path):
    config, data = {"seed": 1, "trainer": {"resume": "auto"}}, {"hub": None}
    sleeper = subprocess.Popen(["sleep", "30"])
    run = tmp_path / "runs" / "0"  # a sweep job's directory: its name says nothing about its process
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(json.dumps(config))
    resume.record(run, config, data)
    checkpoint = run / "checkpoints" / "checkpoint-5"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    resume.mark_complete(checkpoint, keep=None)
    (run / rundir.LOCK).write_text(json.dumps({"host": os.uname().nodename, "pid": sleeper.pid, "job": "other"}))
    here = tmp_path / "runs" / "now"
    assert resume.find_resume("auto", config, here, data) is None  # its process is alive
    sleeper.kill()
    sleeper.wait()
    found = resume.find_resume("auto", config, here, data)
    assert found.run_dir == run and found.step == 5 and found.lock.held
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    found.lock.release()
    assert not (run / rundir.LOCK).exists()
