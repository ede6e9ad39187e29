"""Which run a command resumes, reuses, refuses or starts: a completed run is never written into, an interrupted
one is resumed only with its own config, data and base model, a failed or read-only one is refused or passed over in
one line, and a sweep keeps one directory whatever process runs its jobs."""

import json
import os
import shutil
import signal
import subprocess

import pytest

from neftlab import report
from neftlab.config import ConfigError
from neftlab.core import rundir
from neftlab.core.files import read_jsonl
from neftlab.run import pipeline
from tests.helpers import ROOT, TINY, compose_cfg, run, subprocess_run
from tests.run.crashes import (CHAOS, assert_resumed_to_reference, command, crashed, once_each, rerun, tree,
                               wait_for)


def test_a_completed_run_is_never_written_into(completed, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(completed, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = rerun(tmp_path, f"trainer.resume={run}/checkpoints/checkpoint-2", "noise=uniform", "noise.alpha=15")
    assert proc.returncode == 1
    assert "that run is completed, and a completed run is never written into again" in proc.stderr
    # An explicit resume of an interrupted run with another config names the keys that differ.
    interrupted = crashed(completed, tmp_path, at=2)
    proc = rerun(tmp_path, f"trainer.resume={interrupted}", "noise=uniform", "noise.alpha=15")
    assert proc.returncode == 1 and "that run's config differs in noise.kind: 'none' -> 'uniform'; resume" in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_changed_data_is_never_resumed(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i} it is"}) + "\n" for i in range(30)))
    extra = ["data=alpaca", f"data.path={path}", "trainer.max_steps=3"]
    proc = rerun(tmp_path, *extra)
    (run,) = (tmp_path / "runs").iterdir()
    (run / "summary.json").unlink()  # as if killed before the end
    path.write_text(path.read_text().replace("Say 1", "Say one"))
    proc = rerun(tmp_path, *extra, f"trainer.resume={run}")
    assert proc.returncode == 1 and f"{path} has other contents" in proc.stderr
    proc = rerun(tmp_path, *extra)
    assert proc.returncode == 0
    assert f"Not resuming {run}: it has this config, but the data changed ({path} has other contents" in proc.stderr
    assert "Resuming" not in proc.stderr


def test_a_changed_base_model_is_never_resumed(tmp_path):
    from neftlab import models
    cfg = compose_cfg("model=llama_tiny")
    tokenizer = models.load_tokenizer(cfg.model)
    base = tmp_path / "base"
    models.load_model(cfg.model, tokenizer, seed=0).save_pretrained(base)
    tokenizer.save_pretrained(base)
    lora = [*TINY, f"model.name_or_path={base}", "model.arch=llama", "model.lora.enabled=true", "logger=none",
            "trainer.save_steps=1"]
    outcome, _ = run(*lora, out_dir=tmp_path / "runs" / "a", root=tmp_path)
    run_dir = tmp_path / "runs" / "a"
    (run_dir / rundir.SUMMARY).unlink()  # as if killed after its last checkpoint
    models.load_model(cfg.model, tokenizer, seed=1).save_pretrained(base)  # other weights at the same path
    refused = subprocess_run(*lora, f"trainer.resume={run_dir}", out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert refused.returncode == 1 and "the base model's weights changed" in refused.stderr
    passed = subprocess_run(*lora, out_dir=tmp_path / "runs" / "c", root=tmp_path)
    assert passed.returncode == 0 and f"Not resuming {run_dir}: it has this config, but the base model's weights " \
                                      "changed" in passed.stderr


@pytest.mark.slow
def test_a_completed_runs_directory_is_reused_or_refused_without_a_write(completed, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(completed, run)
    before = tree(run)
    proc = rerun(tmp_path, "noise=uniform", "noise.alpha=15", "seed=7", f"hydra.run.dir={run}")
    assert proc.returncode == 1 and tree(run) == before  # .hydra/ and neftlab.log included
    assert (f"output directory {run} already holds a completed run with another config (noise.kind: 'none' -> "
            "'uniform'; seed: 42 -> 7)") in proc.stderr  # another kind: its name says it, not each of its keys
    proc = rerun(tmp_path, f"hydra.run.dir={run}", "eval.max_new_tokens=3")
    assert proc.returncode == 0 and tree(run) == before
    assert f"{run} is already completed with this config: its result is reused" in proc.stderr
    assert f"evaluate it again with python -m neftlab.evaluate {run}" in proc.stderr
    # a sweep rerun into a fixed sweep directory: the completed job is reused, its log untouched (case 21)
    shutil.copytree(completed, tmp_path / "sweep" / "0")
    job = tree(tmp_path / "sweep" / "0")
    proc = rerun(tmp_path, f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=42", multirun=True)
    assert proc.returncode == 0 and tree(tmp_path / "sweep" / "0") == job
    assert "1 job(s) were already completed: their results are reused" in proc.stderr


def test_an_interrupted_runs_directory_keeps_its_run_resumable(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    before = tree(run)
    proc = rerun(tmp_path, "noise=uniform", "noise.alpha=15", f"hydra.run.dir={run}")
    assert proc.returncode == 1 and tree(run) == before
    assert f"output directory {run} already holds an unfinished run with another config" in proc.stderr
    # a key that does not shape training: the run is resumed, and records the new value (cases 4 and 12)
    proc = rerun(tmp_path, f"hydra.run.dir={run}", "eval.num_generations=1")
    assert proc.returncode == 0
    assert "with new values of keys that do not shape training: eval.num_generations: 2 -> 1" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)
    assert "num_generations: 1" in (run / ".hydra" / "config.yaml").read_text()


def test_a_failed_runs_directory_reused_by_another_config(reference, tmp_path):
    """A failed run that kept a checkpoint is refused to another config; one that kept nothing is replaced, and the
    new run is the one a rerun resumes."""
    run_dir = crashed(reference, tmp_path, at=4, where="runs/shared")
    summary = {"status": "failed", "error": "boom"}
    (run_dir / rundir.SUMMARY).write_text(json.dumps(summary))
    before = tree(run_dir)
    refused = subprocess_run(*CHAOS, "noise=uniform", out_dir=run_dir, root=tmp_path)
    assert refused.returncode == 1 and "already holds a failed run with another config" in refused.stderr
    assert tree(run_dir) == before
    shutil.rmtree(run_dir / rundir.CHECKPOINTS)
    shutil.rmtree(run_dir / rundir.MODEL, ignore_errors=True)
    with pytest.MonkeyPatch.context() as m:  # the new run is stopped at once in its final evaluation (case 16)
        m.setattr(pipeline, "evaluate", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
        killed = subprocess_run(*CHAOS, "noise=uniform", out_dir=run_dir, root=tmp_path)
    assert killed.returncode == 130 and "replacing it" in killed.stderr
    resumed = subprocess_run(*CHAOS, "noise=uniform", out_dir=tmp_path / "runs" / "rerun", root=tmp_path)
    assert resumed.returncode == 0 and f"Resuming {run_dir}" in resumed.stderr
    config = (run_dir / rundir.CONFIG).read_text()
    assert "kind: uniform" in config and once_each(run_dir)[0] == list(range(1, 7))


def test_a_run_that_fails_after_training_is_only_evaluated_by_the_fixed_command(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise ConfigError("a judge that failed after training")
    from neftlab import models
    with monkeypatch.context() as m:
        m.setattr(models, "resolve", lambda name, *a, **k: name)  # a judge that exists, until it is run
        m.setattr(pipeline, "judge_run", fail)
        first = subprocess_run(*TINY, "model=llama_tiny", "logger=none", "eval.judge.model=whatever",
                               out_dir=tmp_path / "runs" / "a", root=tmp_path)
    assert first.returncode == 1
    assert "training is saved in checkpoint-2: once the cause is fixed, the same command only evaluates" in first.stderr
    again = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert again.returncode == 0 and "evaluating only" in again.stderr, again.stderr[-3000:]
    run_dir = tmp_path / "runs" / "a"
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "completed"
    assert once_each(run_dir)[0] == [1, 2] and not (run_dir / rundir.CHECKPOINTS).exists()


@pytest.fixture
def read_only(tmp_path):
    """A directory bind-mounted read-only onto itself (archived, snapshotted)."""
    mounted = []

    def make(folder):
        if os.geteuid() != 0 or subprocess.run(["mount", "--bind", str(folder), str(folder)],
                                               capture_output=True).returncode:
            pytest.skip("needs root to mount a read-only directory")
        mounted.append(folder)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)])


def test_a_read_only_interrupted_run_is_passed_over_or_refused_in_one_line(reference, tmp_path, read_only):
    run_dir = crashed(reference, tmp_path, at=2)
    read_only(run_dir)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert proc.returncode == 0 and f"Not resuming {run_dir}: {run_dir} is read-only" in proc.stderr
    refused = subprocess_run(*CHAOS, out_dir=run_dir, root=tmp_path)
    assert refused.returncode == 1 and "is read-only (Read-only file system): a run there cannot be resumed in " \
                                      "place; copy it to a writable place and pass trainer.resume=" in refused.stderr


def _jobs(sweep):
    return {r["job"]: r for r in read_jsonl(sweep / rundir.SWEEP_JOBS, required="sweep") if "job" in r}


@pytest.mark.slow
def test_a_parallel_sweep_has_one_directory_an_exit_code_and_finishes_on_rerun(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"instruction": f"Say {i}", "output": f"{i} it is"}) + "\n" for i in range(40)))
    paths = f"data.path={good},{tmp_path / 'late.jsonl'}"
    proc = rerun(tmp_path, "hydra/launcher=parallel", "data=alpaca", paths, multirun=True)
    assert proc.returncode == 1 and "1 job(s) failed:" in proc.stderr
    assert "late.jsonl: no such file" in proc.stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()  # one directory for the sweep, whatever process ran a job
    assert {job: r["status"] for job, r in _jobs(sweep).items()} == {0: "completed", 1: "failed"}
    assert report.main([str(sweep)]) == 0  # the report finds the sweep's runs
    shutil.copy(good, tmp_path / "late.jsonl")
    first = tree(sweep / "0")
    proc = rerun(tmp_path, "hydra/launcher=parallel", "data=alpaca", paths, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Continuing the unfinished sweep {sweep}" in proc.stderr
    assert "1 job(s) were already completed: their results are reused" in proc.stderr
    assert list((tmp_path / "multiruns").iterdir()) == [sweep] and tree(sweep / "0") == first
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"
    # A finished sweep is not continued: the same command makes a new one (stopped once it has its directory).
    again = subprocess.Popen(command(tmp_path, "hydra/launcher=parallel", "data=alpaca", paths, multirun=True),
                             cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        wait_for(again, lambda: len(list((tmp_path / "multiruns").iterdir())) == 2, "a second sweep directory")
    finally:
        os.killpg(again.pid, signal.SIGKILL)
    assert "Continuing" not in again.communicate(timeout=60)[1]

