"""A run stopped by a signal or a kill: each stop ends in one line, and the same command again ends as the
uninterrupted run (the session's `completed` and `reference` runs, tests/conftest.py). A signal, a kill -9 or a
process's death is the subject here, so those runs are command lines of their own; the reruns run in this process."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neftlab.core import rundir
from neftlab.core.files import read_jsonl
from neftlab.evaluation.llm_judge.answers import final_answers
from neftlab.run import checkpoint as checkpoints
from neftlab.run import pipeline, signals
from tests.helpers import ROOT, compose_cfg, run, subprocess_run
from tests.run.crashes import (BASE, CHAOS, EXACT, assert_resumed_to_reference, crashed, neftlab_command, once_each,
                               rerun, start, tree, wait_for)


def test_every_stop_signal_takes_the_same_path():
    """SIGTERM (preemption), Ctrl-C, SIGHUP (a closed terminal, a dropped ssh), SIGUSR1/2 (a cluster's early
    warning): each is noted during training and stops the run outside it, and the previous handlers come back.
    The whole path, run to the end and resumed, is the next test's, with SIGHUP."""
    import os
    before = {signum: signal.getsignal(signum) for signum in signals.STOP_SIGNALS}
    assert set(signals.STOP_SIGNALS) == {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2}
    for signum in signals.STOP_SIGNALS:
        stopper = signals.GracefulStop()
        with stopper:
            assert signal.getsignal(signum) == stopper._handle  # else the kill below would end the test process
            stopper.training = True
            os.kill(os.getpid(), signum)
            assert stopper.pending == signum  # noted: the step finishes and a checkpoint is saved
            stopper.training, stopper.pending = False, None
            with pytest.raises(signals.Interrupted):
                os.kill(os.getpid(), signum)
        assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGHUP], ids=["SIGHUP"])
def test_a_signal_at_the_last_step_ends_there(completed, tmp_path, signum):
    proc = start(tmp_path)
    wait_for(proc, lambda: list(tmp_path.glob("runs/*/checkpoints/checkpoint-3")), "checkpoint-3")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and "Traceback" not in stderr
    (run,) = (tmp_path / "runs").iterdir()
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    assert not (run / rundir.LOCK).exists()
    rerun_proc = rerun(tmp_path)
    assert rerun_proc.returncode == 0
    resumed_from = int(rerun_proc.stderr.split(f"Resuming {run} from checkpoint-")[1].split()[0])
    assert_resumed_to_reference(run, completed, rerun_proc.stderr, from_step=resumed_from)  # no step 5


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_during_the_final_evaluation_keeps_the_training(completed, tmp_path, signum):
    slow_eval = ["eval.num_generations=4", "eval.max_new_tokens=400"]  # seconds of generation to land in
    proc = start(tmp_path, *slow_eval)
    wait_for(proc, lambda: any("train/train_runtime" in p.read_text() for p in tmp_path.glob("runs/*/metrics.jsonl")),
              "the end of training")
    proc.send_signal(signum)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum and "Traceback" not in stderr
    assert f"stopped by {signal.Signals(signum).name} at step 4; a checkpoint was saved" in stderr
    (run,) = (tmp_path / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "interrupted" and "train/train_runtime" in summary
    assert checkpoints.problem(run / "checkpoints/checkpoint-4") is None
    if signum == signal.SIGTERM:
        proc = rerun(tmp_path)  # short answers again (eval.* may change on a resume): it only evaluates
        assert proc.returncode == 0 and "evaluating only" in proc.stderr
        assert_resumed_to_reference(run, completed, proc.stderr, from_step=4)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    proc = start(tmp_path, "trainer.max_steps=400")
    wait_for(proc, lambda: list(tmp_path.glob("runs/*/checkpoints/checkpoint-1")), "checkpoint-1")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "stopped at once by Ctrl-C; the last complete checkpoint, if any, is kept" in stderr


@pytest.mark.slow
def test_a_kill_9_during_the_final_evaluation_keeps_the_training_without_save_steps(completed, tmp_path):
    """The OOM killer while generating, or torchrun's SIGKILL 30 s after a SIGTERM in a long generation batch:
    the last step's checkpoint is written before the final evaluation, so the rerun only evaluates, and it is
    removed when the run completes, as no checkpoint was asked for."""
    slow_eval = ["trainer.save_steps=null", "eval.num_generations=4", "eval.max_new_tokens=400"]
    proc = start(tmp_path, *slow_eval)
    wait_for(proc, lambda: list(tmp_path.glob(f"runs/*/checkpoints/checkpoint-4/{rundir.MARKER}")),
              "the checkpoint of the trained model")
    proc.kill()
    proc.communicate(timeout=60)
    (run,) = (tmp_path / "runs").iterdir()
    proc = rerun(tmp_path, "trainer.save_steps=null")  # short answers again (eval.* may change on a resume)
    assert proc.returncode == 0 and "evaluating only" in proc.stderr, proc.stderr[-3000:]
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=4)
    assert not (run / rundir.CHECKPOINTS).exists()


def test_checkpoints_kept_for_a_rerun_go_only_once_the_summary_says_completed(tmp_path):
    """A kill, or a full disk that stops summary.json, after the final evaluation still finds the checkpoint."""
    checkpoint = tmp_path / rundir.CHECKPOINTS / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    files = rundir.RunFiles(tmp_path)
    pipeline.drop_unasked_checkpoints(compose_cfg("size=tiny"), files)  # no summary yet
    assert checkpoint.exists()
    files.finish("completed")
    pipeline.drop_unasked_checkpoints(compose_cfg("size=tiny", "trainer.save_steps=2"), files)  # asked for: kept
    assert checkpoint.exists()
    pipeline.drop_unasked_checkpoints(compose_cfg("size=tiny"), files)
    assert not checkpoint.exists()


def test_a_second_sigterm_while_the_stop_checkpoint_is_written_is_held(tmp_path, monkeypatch, caplog):
    """SIGTERM during the final evaluation, then SIGTERM again while the checkpoint for that stop is written
    (an impatient kill, a supervisor repeating its signal): the checkpoint completes, the rerun only evaluates."""
    real_save = pipeline.save_checkpoint

    def impatient_save(trainer):
        os.kill(os.getpid(), signal.SIGTERM)  # the second signal, at the start of the save
        real_save(trainer)
    monkeypatch.setattr(pipeline, "evaluate",
                        lambda run, stopper=None: os.kill(os.getpid(), signal.SIGTERM) or time.sleep(1))
    monkeypatch.setattr(pipeline, "save_checkpoint", impatient_save)
    cfg = compose_cfg(*BASE, "trainer.save_steps=null")
    with pytest.raises(signals.Interrupted) as stop:
        pipeline.run(cfg, rundir.RunFiles(tmp_path))
    assert str(stop.value) == "stopped by SIGTERM at step 4; a checkpoint was saved, rerun the same command to resume"
    assert "SIGTERM received while the stop's checkpoint is written: finishing it first" in caplog.text
    assert checkpoints.problem(tmp_path / "checkpoints" / "checkpoint-4") is None
    assert checkpoints.training_done(tmp_path / "checkpoints" / "checkpoint-4")


@pytest.mark.slow
def test_a_stop_to_a_parallel_sweep_reaches_its_jobs(completed, tmp_path):
    proc = start(tmp_path, "hydra/launcher=parallel", "seed=1,2", "trainer.max_steps=400", multirun=True)
    wait_for(proc, lambda: len(list(tmp_path.glob("multiruns/*/*/checkpoints/checkpoint-1"))) == 2,
              "both jobs' first checkpoints")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "2 job(s) were interrupted" in stderr and "Traceback" not in stderr
    (sweep,) = (tmp_path / "multiruns").iterdir()
    for job in (0, 1):
        summary = json.loads((sweep / str(job) / "summary.json").read_text())
        assert summary["status"] == "interrupted" and summary["step"] >= 1
        assert checkpoints.problem(sweep / str(job) / "checkpoints" / f"checkpoint-{summary['step']}") is None
    for child in psutil_children():
        assert "neftlab" not in " ".join(child.cmdline())  # no job goes on training as an orphan


def psutil_children():
    import psutil
    return psutil.Process().children(recursive=True)


@pytest.mark.slow
def test_a_killed_sweep_job_is_resumed_by_the_sweeps_rerun(completed, tmp_path):
    job = crashed(completed, tmp_path, at=2, where="multiruns/2026-01-01_00-00-00_1/0")
    proc = rerun(tmp_path, "seed=42", multirun=True)
    assert proc.returncode == 0
    assert_resumed_to_reference(job, completed, proc.stderr, from_step=2)


@pytest.mark.parametrize("extra", [["noise=uniform", "noise.schedule=linear", "noise.tokens=response"],
                                   ["noise=noisytune", "pruning=l1"], ["noise=freelb"], ["noise=noisefit"]],
                         ids=["linear_response", "noisytune_l1", "freelb", "noisefit"])
@pytest.mark.slow
def test_the_later_perturbations_resume_exactly(tmp_path, extra):
    """A schedule's position comes from the step, NoisyTune's perturbation from the checkpoint's weights, FreeLB's
    delta_0 and NoiseFiT's noise from the noise stream in the checkpoint, NoiseFiT's layers from its state there
    (not measured again: its SNR logged once): killed after step 2 and rerun, each run ends as its uninterrupted
    reference, alpha step for step."""
    outcome, summary = run(*BASE, *extra, out_dir=tmp_path / "reference")
    assert summary["status"] == "completed", outcome.message
    crash = crashed(tmp_path / "reference", tmp_path, at=2)
    proc = rerun(tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_resumed_to_reference(crash, tmp_path / "reference", proc.stderr, from_step=2)
    alphas = [[(e["step"], e["noise/alpha"]) for e in read_jsonl(r / "metrics.jsonl") if "noise/alpha" in e]
              for r in (crash, tmp_path / "reference")]
    assert alphas[0] == alphas[1]
    chosen = [e for e in read_jsonl(crash / "metrics.jsonl") if any(k.startswith("noise/noisefit_snr") for k in e)]
    assert len(chosen) == ("noise=noisefit" in extra)
    if "noise.schedule=linear" in extra:  # set before each step from the steps done: 5 (1 - (step - 1) / 4)
        assert alphas[0] == [(step, pytest.approx(5.0 * (1 - (step - 1) / 4))) for step in (1, 2, 3, 4)]


def test_answers_at_every_evaluation_survive_an_interruption(reference, tmp_path):
    """With eval.generate_every_eval: killed after the step-4 checkpoint, rerun: each evaluation's answers once."""
    run_dir = crashed(reference, tmp_path, at=4)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "again", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, answers = once_each(run_dir)
    assert steps == list(range(1, 7))
    assert sorted(answers) == sorted(once_each(reference)[1])  # steps 2 and 4 during training, 6 at the end


def working_since(root: Path, started: float) -> bool:
    """Whether a run under `root` has logged a training step (or, resumed past its training, an evaluation) since
    `started`: the process is past its start-up and at work."""
    return any(p.stat().st_mtime > started and ('"train/' in (text := p.read_text()) or '"eval/' in text)
               for p in root.glob(f"runs/*/{rundir.METRICS}"))


@pytest.mark.slow
def test_kills_at_any_moment_end_at_the_uninterrupted_result(reference, tmp_path):
    """SIGKILL at 6 moments drawn with a fixed seed over the run's working time (training, its checkpoints, the
    evaluations, the answers, the final evaluation, the model's save), the same command after each: the run ends
    with the uninterrupted metrics, every step once in metrics.jsonl, every answer once in samples.jsonl."""
    folder = reference
    command = neftlab_command(*CHAOS, f"output_root={tmp_path}")
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.time()
    while not working_since(tmp_path, started) and proc.poll() is None:
        time.sleep(0.01)
    working = time.time()
    assert proc.wait(timeout=600) == 0
    took = time.time() - working  # from the first metrics line to the end: where a kill can land in the work
    shutil.rmtree(tmp_path / "runs")
    kills = []
    for fraction in random.Random(32).sample(range(1, 100), 6):
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started = time.time()
        while not working_since(tmp_path, started) and proc.poll() is None:
            time.sleep(0.01)
        try:
            proc.wait(timeout=took * fraction / 100)
        except subprocess.TimeoutExpired:
            proc.kill()
            kills.append(fraction)
        proc.wait()
    assert len(kills) >= 4  # most draws land while the run works
    final = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr[-3000:]
    # A kill drawn after a run had completed finds it done (the next command starts another): each run that
    # completed did so as the uninterrupted one.
    runs = [r for r in (tmp_path / "runs").iterdir() if (r / rundir.SUMMARY).exists()]
    done = [r for r in runs if json.loads((r / rundir.SUMMARY).read_text())["status"] == "completed"]
    logs = "".join((r / "neftlab.log").read_text() for r in (tmp_path / "runs").iterdir() if (r / "neftlab.log").exists())
    assert done and "Resuming" in logs
    expected = json.loads((folder / rundir.SUMMARY).read_text())
    for run_dir in done:
        summary = json.loads((run_dir / rundir.SUMMARY).read_text())
        assert {k: summary[k] for k in EXACT} == pytest.approx({k: expected[k] for k in EXACT}, rel=1e-5)
        steps, answers = once_each(run_dir)
        assert steps == list(range(1, 7)) and sorted(answers) == sorted(once_each(folder)[1])


def test_the_judge_takes_the_last_complete_generation_and_says_which(reference, tmp_path, caplog):
    """`neftlab.evaluate RUN` killed -9 after appending its answers, before its measures: the judge passes the cut
    generation over, named, and judges the run's final answers."""
    folder = tmp_path / "run"
    shutil.copytree(reference, folder)
    files = rundir.RunFiles(folder, keep=lambda row: True, stage="reeval-1")
    files.append_samples([{"prompt_id": 0, "step": 6, "prompt": [{"role": "user", "content": "q"}],
                           "reference": "r", "generation": "cut", "tokens": 1, "stop": "eos"}])
    files.close()
    answers = final_answers(folder)
    assert (answers.step, answers.stage) == (6, "final") and len(answers.rows) == 2
    assert "the answers of step 6 (stage reeval-1) are incomplete" in caplog.text


@pytest.mark.slow
def test_report_and_export_killed_leave_nothing_torn_and_rerun_to_the_same_files(reference, tmp_path):
    sweep = tmp_path / "sweep"
    for n in range(2):
        shutil.copytree(reference, sweep / str(n))
    overrides = sweep / "1" / rundir.OVERRIDES  # the second job another seed, as in a sweep
    overrides.write_text(overrides.read_text() + "- seed=2\n")
    config = sweep / "1" / rundir.CONFIG
    config.write_text(config.read_text().replace("seed: 42", "seed: 2"))
    for tool, args in (("neftlab.report", []), ("neftlab.export", ["--format", "alpaca_eval"])):
        clean = tmp_path / f"clean-{tool}"
        shutil.copytree(sweep, clean)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", tool, str(clean), *args], cwd=ROOT, check=True, capture_output=True)
        took = time.perf_counter() - started
        for fraction in random.Random(3).sample(range(30, 100), 3):
            proc = subprocess.Popen([sys.executable, "-m", tool, str(sweep), *args], cwd=ROOT,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                proc.wait(timeout=took * fraction / 100)
            except subprocess.TimeoutExpired:
                proc.kill()
            proc.wait()
            for path in sweep.rglob("*.json"):
                json.loads(path.read_text())  # whatever is there is whole
        subprocess.run([sys.executable, "-m", tool, str(sweep), *args], cwd=ROOT, check=True, capture_output=True)
        assert not [p for p in sweep.rglob(".*.tmp*")]  # the killed writers' temporary files are gone
        ours = {k: v for k, v in tree(sweep).items() if not k.startswith(("0/", "1/")) or "alpaca_eval" in k}
        theirs = {k: v for k, v in tree(clean).items() if not k.startswith(("0/", "1/")) or "alpaca_eval" in k}
        assert set(ours) == set(theirs)
        assert {k: v for k, v in ours.items() if not k.endswith((".png", ".md", "generators.json"))} == \
            {k: v for k, v in theirs.items() if not k.endswith((".png", ".md", "generators.json"))}
        if tool == "neftlab.report":
            assert (sweep / "report.md").read_text() == (clean / "report.md").read_text().replace(str(clean), str(sweep))


@pytest.mark.slow
def test_a_dead_wandb_service_does_not_stop_the_training(tmp_path):
    import psutil
    folder = tmp_path / "run"
    proc = subprocess.Popen(neftlab_command("size=tiny", "trainer.max_steps=40", "logger=wandb", "logger.mode=offline",
                                    f"hydra.run.dir={folder}", f"output_root={tmp_path}"),
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            # a W&B run earlier in this pytest process leaves WANDB_SERVICE set: the child would
                            # use that process's service instead of starting its own
                            env={k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"})
    deadline = time.time() + 300
    while not ((folder / rundir.METRICS).exists() and "train/loss" in (folder / rundir.METRICS).read_text()):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it trained"
        time.sleep(0.05)
    service = [c for c in psutil.Process(proc.pid).children(recursive=True) if "wandb" in " ".join(c.cmdline())]
    assert service, "no W&B service process to kill"
    for child in service:
        child.kill()
    _, stderr = proc.communicate(timeout=600)
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    assert proc.returncode == 0 and summary["status"] == "completed", stderr[-3000:]
    assert once_each(folder)[0] == list(range(1, 41))
    assert "WandbRun failed" in stderr and "every number is in" in stderr

