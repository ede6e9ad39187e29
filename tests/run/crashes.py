"""What the fault tests share: the tiny runs they start from, crash states cut back from a real completed run, and
the same command run again (in this process, or as the command line where the process is the subject).

A crash state is a completed run cut back to what a crash at that point leaves: no summary, the checkpoints up to
that step, the metrics up to the step it was in, and the lock of a process that is gone. The completed runs
themselves are session fixtures (tests/conftest.py: `completed`, `reference`), shared by every file here."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neftlab.core import rundir
from neftlab.core.files import read_jsonl
from neftlab.run import checkpoint as checkpoints
from tests.helpers import ROOT, subprocess_run

# A 4-step run that keeps every checkpoint: the source of crash states at any step.
BASE = ["size=tiny", "logger=none", "trainer.save_steps=1", "trainer.save_total_limit=null"]
# Checkpoints every 2 steps, an evaluation at steps 2 and 4 with answers, the final evaluation, the model saved.
CHAOS = ["size=tiny", "logger=none", "trainer.max_steps=6", "trainer.save_steps=2", "trainer.eval_steps=2",
         "trainer.save_total_limit=null", "eval.generate_every_eval=true"]
# Numbers that do not depend on the clock (the Trainer's train_loss is a per-session mean).
EXACT = ("eval/loss", "eval/accuracy", "train/loss", "train/epoch", "efficiency/nonzero_params")


def neftlab_command(*args) -> list[str]:
    return [sys.executable, "-m", "neftlab", *args]


def command(tmp_path, *extra, multirun=False) -> list[str]:
    """BASE as a command line. Runs go to <tmp_path>/runs/<id>, sweeps to <tmp_path>/multiruns/<id>: tmp_path is
    the output root."""
    return neftlab_command(*(["-m"] if multirun else []), *BASE, *extra, f"output_root={tmp_path}")


def rerun(tmp_path, *extra, multirun=False):
    """The same command again: in this process (its log lines as the `stderr` to read), or, for a sweep, as the
    command line (the launcher is the subject)."""
    if multirun:
        proc = subprocess.run(command(tmp_path, *extra, multirun=True), cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        return proc
    given = [e for e in extra if e.startswith("hydra.run.dir=")]
    out_dir = Path(given[0].split("=", 1)[1]) if given else tmp_path / "runs" / f"rerun-{time.time_ns()}"
    return subprocess_run(*BASE, *(e for e in extra if e not in given), out_dir=out_dir, root=tmp_path)


def start(tmp_path, *extra, multirun=False) -> subprocess.Popen:
    """BASE as a command line in the background, its stderr piped."""
    return subprocess.Popen(command(tmp_path, *extra, multirun=multirun), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def wait_for(proc, condition, what) -> None:
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.01)


def crashed(completed, tmp_path, at: int, where: str = "runs/2026-01-01_00-00-00_1") -> Path:
    """The completed run as a kill -9 during step at+1 leaves it: no summary, checkpoints up to `at`, metrics
    up to the step it was in, and the lock of a process that no longer exists."""
    run = tmp_path / where
    shutil.copytree(completed, run)
    (run / "summary.json").unlink()
    for checkpoint in checkpoints.checkpoints(run):
        if checkpoints.step_of(checkpoint) > at:
            shutil.rmtree(checkpoint)
    events = read_jsonl(run / "metrics.jsonl")
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["step"] <= at + 1))
    dead = subprocess.Popen(["true"])
    dead.wait()
    (run / "run.lock").write_text(json.dumps({"host": os.uname().nodename, "pid": dead.pid, "job": "gone"}))
    return run


def assert_resumed_to_reference(run, completed, stderr, from_step) -> None:
    """`run` was resumed from `from_step` and ended as the uninterrupted 4-step run `completed`."""
    assert f"Resuming {run} from checkpoint-{from_step}" in stderr
    summary = json.loads((run / "summary.json").read_text())
    reference = json.loads((completed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {k: summary[k] for k in EXACT} == pytest.approx({k: reference[k] for k in EXACT}, rel=1e-5)
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if "train/loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in events if "eval/loss" in e] == [4]
    assert not (run / "run.lock").exists()


def tree(folder) -> dict[str, bytes]:
    """Every file under `folder`, by its relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def once_each(run_dir):
    """Every training step's loss once, and every prompt's answer once per generation."""
    events = read_jsonl(run_dir / rundir.METRICS)
    steps = [e["step"] for e in events if "train/loss" in e]
    answers = [(r["step"], r.get("stage"), r["prompt_id"]) for r in read_jsonl(run_dir / rundir.SAMPLES)]
    return steps, answers
