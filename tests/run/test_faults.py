"""The fault matrix (issue 11): one test per way a run used to be lost, corrupted or misled.

Each ends the way a user needs: the run completes with the metrics of an uninterrupted run, or stops with
one clear line and nothing lost. Crash states are made from a real completed run, cut back to what a crash
at that point leaves (no summary, the checkpoints up to that step, a lock of a process that is gone).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neftlab import data, models, report
from neftlab.config import ConfigError, DataConfig
from neftlab.core import rundir
from neftlab.core.files import read_jsonl
from neftlab.run import checkpoint as checkpoints
from neftlab.run import pipeline, signals
from tests.helpers import ROOT, compose_cfg, run, subprocess_run

BASE = ["size=tiny", "logger=none", "trainer.save_steps=1", "trainer.save_total_limit=null"]
# Numbers that do not depend on the clock (the Trainer's train_loss is a per-session mean).
EXACT = ("eval/loss", "eval/accuracy", "train/loss", "train/epoch", "efficiency/nonzero_params")


def command(tmp_path, *extra, multirun=False):
    """Runs go to <tmp_path>/runs/<id>, sweeps to <tmp_path>/multiruns/<id>: tmp_path is the output root."""
    return [sys.executable, "-m", "neftlab", *(["-m"] if multirun else []), *BASE, *extra, f"output_root={tmp_path}"]


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


@pytest.fixture(scope="module")
def completed(tmp_path_factory):
    """One uninterrupted 4-step run that keeps every checkpoint: the reference and the source of crash states."""
    tmp = tmp_path_factory.mktemp("reference")
    outcome, summary = run(*BASE, out_dir=tmp / "run")
    assert summary["status"] == "completed", outcome.message
    return tmp / "run"


def crashed(completed, tmp_path, at: int, where: str = "runs/2026-01-01_00-00-00_1") -> "os.PathLike":
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


def assert_resumed_to_reference(run, completed, stderr, from_step):
    assert f"Resuming {run} from checkpoint-{from_step}" in stderr
    summary = json.loads((run / "summary.json").read_text())
    reference = json.loads((completed / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert {k: summary[k] for k in EXACT} == pytest.approx({k: reference[k] for k in EXACT}, rel=1e-5)
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if "train/loss" in e] == [1, 2, 3, 4]
    assert [e["step"] for e in events if "eval/loss" in e] == [4]
    assert not (run / "run.lock").exists()


# ---------------------------------------------------------------- resume can lose the run

def test_01_kill_during_a_save_resumes_from_the_previous_complete_checkpoint(completed, tmp_path):
    run = crashed(completed, tmp_path, at=3)
    (run / "checkpoints/checkpoint-3" / rundir.rank_state(0)).unlink()  # killed after the Trainer's part
    (run / "checkpoints/checkpoint-3" / rundir.MARKER).unlink()
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert "checkpoint-3 is incomplete" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_01b_rotation_keeps_the_last_complete_checkpoint_until_a_newer_one_is(tmp_path):
    folder = tmp_path / "checkpoints"
    for step in (2, 3, 4):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "weights").write_text("w" * step)
    checkpoints.mark_complete(folder / "checkpoint-2", keep=1)
    # checkpoint-3 is a save still in progress (or cut off): 2 stays, the only complete one
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
    checkpoints.mark_complete(folder / "checkpoint-4", keep=1)
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-4"]


@pytest.mark.parametrize("name", [rundir.rank_state(0), "model.safetensors"])
def test_02_a_truncated_file_names_itself_and_resume_falls_back(completed, tmp_path, name):
    run = crashed(completed, tmp_path, at=3)
    path = run / "checkpoints/checkpoint-3" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert f"{path} is corrupt" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_03_a_torn_last_metrics_line_is_skipped_and_named(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert f"{run / 'metrics.jsonl'}: skipped its last line, cut off" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_04_a_corrupt_sibling_summary_blocks_nothing(completed, tmp_path):
    sibling = crashed(completed, tmp_path, at=2)
    (sibling / "summary.json").write_text("")
    proc = rerun(tmp_path, "trainer.max_steps=1")
    assert proc.returncode == 0 and "summary.json is unreadable" in proc.stderr
    (new,) = [p for p in (tmp_path / "runs").iterdir() if p != sibling]
    assert json.loads((new / "summary.json").read_text())["status"] == "completed"


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    yield mount
    subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.slow
def test_05_disk_full_ends_in_one_line_and_the_rerun_resumes(small_disk):
    # 300 MiB, 200 of them free at the start check, 41 MiB a checkpoint: full within a few saves.
    proc = rerun(small_disk, "trainer.max_steps=12")
    assert proc.returncode == 1
    assert "no space left on device" in proc.stderr and "rerun the same command to resume" in proc.stderr
    (run,) = (small_disk / "runs").iterdir()
    assert not (run / "summary.json").exists() or json.loads((run / "summary.json").read_text())
    complete = [c for c in checkpoints.checkpoints(run) if checkpoints.problem(c) is None]
    assert complete, "no complete checkpoint was kept"
    subprocess.run(["mount", "-o", "remount,size=2g", str(small_disk)], check=True)  # space freed
    proc = rerun(small_disk, "trainer.max_steps=12")
    assert proc.returncode == 0
    assert f"Resuming {run} from {complete[0].name}" in proc.stderr
    events = read_jsonl(run / "metrics.jsonl")
    assert [e["step"] for e in events if "train/loss" in e] == list(range(1, 13))


@pytest.mark.slow
def test_06_a_killed_sweep_job_is_resumed_by_the_sweeps_rerun(completed, tmp_path):
    job = crashed(completed, tmp_path, at=2, where="multiruns/2026-01-01_00-00-00_1/0")
    proc = rerun(tmp_path, "seed=42", multirun=True)
    assert proc.returncode == 0
    assert_resumed_to_reference(job, completed, proc.stderr, from_step=2)


# ------------------------------------------------------- resume can corrupt or mislabel results

@pytest.mark.slow
def test_07_two_reruns_started_together_resume_the_run_once(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    procs = [subprocess.Popen(command(tmp_path), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    resumed = [o for o in outputs if f"Resuming {run}" in o]
    assert len(resumed) == 1, outputs[0][-2000:] + outputs[1][-2000:]
    loser = procs[1 - outputs.index(resumed[0])]
    other = outputs[1 - outputs.index(resumed[0])]
    assert procs[outputs.index(resumed[0])].returncode == 0
    # issue 32, case 6: the other says in one line that the run is being resumed, and starts nothing of its own
    assert loser.returncode == 1 and f"{run}, this config's interrupted run, is being resumed by pid" in other
    assert "Traceback" not in other and len(list((tmp_path / "runs").iterdir())) == 1
    assert_resumed_to_reference(run, completed, resumed[0], from_step=2)
    for path in (tmp_path / "runs").glob("*/metrics.jsonl"):  # every line whole, in both runs
        assert all(json.loads(line) for line in path.read_text().splitlines())


def test_08_a_completed_run_is_never_written_into(completed, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(completed, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    proc = rerun(tmp_path, f"trainer.resume={run}/checkpoints/checkpoint-2", "noise=uniform", "noise.alpha=15")
    assert proc.returncode == 1
    assert "that run is completed, and a completed run is never written into again" in proc.stderr
    # An explicit resume of an interrupted run with another config names the keys that differ.
    interrupted = crashed(completed, tmp_path, at=2)
    proc = rerun(tmp_path, f"trainer.resume={interrupted}", "noise=uniform", "noise.alpha=15")
    assert proc.returncode == 1 and "that run's config differs in noise.alpha: 5.0 -> 15.0" in proc.stderr
    assert "noise.kind: 'none' -> 'uniform'" in proc.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_09_changed_data_is_never_resumed(tmp_path):
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


def _start(tmp_path, *extra, multirun=False):
    return subprocess.Popen(command(tmp_path, *extra, multirun=multirun), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(proc, condition, what):
    deadline = time.time() + 300
    while not condition():
        assert proc.poll() is None and time.time() < deadline, f"the run ended before {what}"
        time.sleep(0.01)


def test_10_every_stop_signal_takes_the_same_path():
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
def test_10_a_signal_at_the_last_step_ends_there(completed, tmp_path, signum):
    proc = _start(tmp_path)
    _wait_for(proc, lambda: list(tmp_path.glob("runs/*/checkpoints/checkpoint-3")), "checkpoint-3")
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
def test_11_a_signal_during_the_final_evaluation_keeps_the_training(completed, tmp_path, signum):
    slow_eval = ["eval.num_generations=4", "eval.max_new_tokens=400"]  # seconds of generation to land in
    proc = _start(tmp_path, *slow_eval)
    _wait_for(proc, lambda: any("train/train_runtime" in p.read_text() for p in tmp_path.glob("runs/*/metrics.jsonl")),
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
        proc = rerun(tmp_path, *slow_eval)
        assert proc.returncode == 0 and "evaluating only" in proc.stderr
        assert_resumed_to_reference(run, completed, proc.stderr, from_step=4)


@pytest.mark.slow
def test_11b_a_second_ctrl_c_stops_at_once_in_one_line(tmp_path):
    proc = _start(tmp_path, "trainer.max_steps=400")
    _wait_for(proc, lambda: list(tmp_path.glob("runs/*/checkpoints/checkpoint-1")), "checkpoint-1")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130 and "Traceback" not in stderr
    assert "stopped at once by Ctrl-C; the last complete checkpoint, if any, is kept" in stderr


@pytest.mark.slow
def test_11c_a_kill_9_during_the_final_evaluation_keeps_the_training_without_save_steps(completed, tmp_path):
    """The OOM killer while generating, or torchrun's SIGKILL 30 s after a SIGTERM in a long generation batch:
    the last step's checkpoint is written before the final evaluation, so the rerun only evaluates, and it is
    removed when the run completes, as no checkpoint was asked for."""
    slow_eval = ["trainer.save_steps=null", "eval.num_generations=4", "eval.max_new_tokens=400"]
    proc = _start(tmp_path, *slow_eval)
    _wait_for(proc, lambda: list(tmp_path.glob(f"runs/*/checkpoints/checkpoint-4/{rundir.MARKER}")),
              "the checkpoint of the trained model")
    proc.kill()
    proc.communicate(timeout=60)
    (run,) = (tmp_path / "runs").iterdir()
    proc = rerun(tmp_path, *slow_eval)
    assert proc.returncode == 0 and "evaluating only" in proc.stderr, proc.stderr[-3000:]
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=4)
    assert not (run / rundir.CHECKPOINTS).exists()


def test_11d_checkpoints_kept_for_a_rerun_go_only_once_the_summary_says_completed(tmp_path):
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


# ------------------------------------------------------------ bad input that passes or misleads

def test_12_report_names_corrupt_files_and_goes_on(completed, tmp_path):
    shutil.copytree(completed, tmp_path / "good")
    shutil.copytree(completed, tmp_path / "bad")
    (tmp_path / "bad" / "summary.json").write_text("{")
    with (tmp_path / "good" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "tr')
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "1 runs, 1 completed" in text and f"`{tmp_path / 'bad' / 'summary.json'}`: not valid JSON" in text


def test_13_lengths_dtype_and_seed_are_checked_before_loading(tmp_path):
    cfg = compose_cfg("model=llama_tiny", "eval.max_new_tokens=100000")
    with pytest.raises(ConfigError, match=r"eval.max_new_tokens=100000 is not allowed: less than 2048"):
        cfg.validate_context(models.context_length(cfg.model))
    cfg = compose_cfg("model=bert_tiny", "data=classification", "data.path=x.csv", "data.max_length=2048")
    with pytest.raises(ConfigError, match=r"data.max_length=2048 is not allowed: at most 512, the model's context"):
        cfg.validate_context(models.context_length(cfg.model))
    for seed in (-1, 2**32):
        with pytest.raises(ConfigError, match=rf"seed={seed} is not allowed: an integer in \[0, 2\*\*32\)"):
            compose_cfg(f"seed={seed}")
    import torch
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="model.dtype='float16' is not allowed: float32 or bfloat16 on a CPU"):
            compose_cfg("model.dtype=float16")
    outcome, _ = run("size=tiny", "logger=none", "eval.max_new_tokens=100000", out_dir=tmp_path)
    assert outcome.exit_code == 1 and outcome.message.startswith("eval.max_new_tokens=100000 is not allowed")


def test_14_degenerate_data_is_named(tmp_path, bert_tokenizer, llama_tokenizer, caplog):
    cfg = lambda path, fmt: DataConfig(path=str(path), format=fmt, max_samples=None, eval_size=2)  # noqa: E731
    one_class = tmp_path / "one.csv"
    one_class.write_text("text,label\n" + "".join(f"text {i},pos\n" for i in range(8)) + " ,pos\n\t,pos\n")
    data.prepare(cfg(one_class, "classification"), bert_tokenizer, False, seed=0)
    assert "every row has label pos: accuracy and macro-F1 will be 1.0" in caplog.text
    assert "dropped 2 of 10 rows with blank text" in caplog.text
    empty = tmp_path / "empty.jsonl"
    empty.write_text("".join(json.dumps({"instruction": f"q{i % 3}", "output": ""}) + "\n" for i in range(8)))
    data.prepare(cfg(empty, "alpaca"), llama_tokenizer, True, seed=0)
    assert "all of 8 examples have an empty answer: the model can only learn to stop at once" in caplog.text
    assert "held-out examples have an input that also occurs in the training split" in caplog.text


def test_15_byte_order_marks_are_read_and_bad_bytes_are_placed(tmp_path, bert_tokenizer):
    bom = b"\xef\xbb\xbf"
    (tmp_path / "a.json").write_bytes(bom + json.dumps([{"text": "hi", "label": 1}, {"text": "yo", "label": 0}]).encode())
    (tmp_path / "a.csv").write_bytes(bom + b"text,label\nhi,1\nyo,0\n")
    for name in ("a.json", "a.csv"):
        records = data.locate(DataConfig(path=str(tmp_path / name), format="classification")).records()
        assert [r["text"] for r in records] == ["hi", "yo"] and "\ufeff" not in json.dumps(records)
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "fine", "label": 1}\n' * 3000 + b'{"text": "\xff", "label": 1}\n')
    offset = 29 * 3000 + len(b'{"text": "')
    with pytest.raises(data.DataError, match=rf"bad.jsonl: not UTF-8 text \(invalid start byte at byte {offset} of"):
        data.locate(DataConfig(path=str(bad), format="classification")).records()


# ---------------------------------------------------------------- issue 19: nothing lost, round two

@pytest.mark.parametrize("extra", [["noise=uniform", "noise.schedule=linear", "noise.tokens=response"],
                                   ["noise=noisytune", "pruning=l1"], ["noise=freelb"]],
                         ids=["linear_response", "noisytune_l1", "freelb"])
@pytest.mark.slow
def test_16b_the_later_perturbations_resume_exactly(tmp_path, extra):
    """A schedule's position comes from the step, NoisyTune's perturbation from the checkpoint's weights, FreeLB's
    delta_0 from the noise stream in the checkpoint: killed after step 2 and rerun, each run ends as its
    uninterrupted reference, alpha step for step."""
    outcome, summary = run(*BASE, *extra, out_dir=tmp_path / "reference")
    assert summary["status"] == "completed", outcome.message
    crash = crashed(tmp_path / "reference", tmp_path, at=2)
    proc = rerun(tmp_path, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_resumed_to_reference(crash, tmp_path / "reference", proc.stderr, from_step=2)
    alphas = [[(e["step"], e["noise/alpha"]) for e in read_jsonl(r / "metrics.jsonl") if "noise/alpha" in e]
              for r in (crash, tmp_path / "reference")]
    assert alphas[0] == alphas[1]
    if "noise.schedule=linear" in extra:  # set before each step from the steps done: 5 (1 - (step - 1) / 4)
        assert alphas[0] == [(step, pytest.approx(5.0 * (1 - (step - 1) / 4))) for step in (1, 2, 3, 4)]


def test_19_01_a_second_sigterm_while_the_stop_checkpoint_is_written_is_held(tmp_path, monkeypatch, caplog):
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


def _tree(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_19_03_a_completed_runs_directory_is_reused_or_refused_without_a_write(completed, tmp_path):
    run = tmp_path / "done"
    shutil.copytree(completed, run)
    before = _tree(run)
    proc = rerun(tmp_path, "noise=uniform", "noise.alpha=15", "seed=7", f"hydra.run.dir={run}")
    assert proc.returncode == 1 and _tree(run) == before  # .hydra/ and neftlab.log included
    assert (f"output directory {run} already holds a completed run with another config (noise.alpha: 5.0 -> 15.0; "
            "noise.kind: 'none' -> 'uniform'; seed: 42 -> 7)") in proc.stderr
    proc = rerun(tmp_path, f"hydra.run.dir={run}", "eval.max_new_tokens=3")
    assert proc.returncode == 0 and _tree(run) == before
    assert f"{run} is already completed with this config: its result is reused" in proc.stderr
    assert f"evaluate it again with python -m neftlab.evaluate {run}" in proc.stderr
    # a sweep rerun into a fixed sweep directory: the completed job is reused, its log untouched (case 21)
    shutil.copytree(completed, tmp_path / "sweep" / "0")
    job = _tree(tmp_path / "sweep" / "0")
    proc = rerun(tmp_path, f"hydra.sweep.dir={tmp_path / 'sweep'}", "seed=42", multirun=True)
    assert proc.returncode == 0 and _tree(tmp_path / "sweep" / "0") == job
    assert "1 job(s) were already completed: their results are reused" in proc.stderr


def test_19_04_an_interrupted_runs_directory_keeps_its_run_resumable(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    before = _tree(run)
    proc = rerun(tmp_path, "noise=uniform", "noise.alpha=15", f"hydra.run.dir={run}")
    assert proc.returncode == 1 and _tree(run) == before
    assert f"output directory {run} already holds an unfinished run with another config" in proc.stderr
    # a key that does not shape training: the run is resumed, and records the new value (cases 4 and 12)
    proc = rerun(tmp_path, f"hydra.run.dir={run}", "eval.num_generations=1")
    assert proc.returncode == 0
    assert "with new values of keys that do not shape training: eval.num_generations: 2 -> 1" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)
    assert "num_generations: 1" in (run / ".hydra" / "config.yaml").read_text()


def _jobs(sweep):
    return {r["job"]: r for r in read_jsonl(sweep / rundir.SWEEP_JOBS, required="sweep") if "job" in r}


@pytest.mark.slow
def test_19_05_a_stop_to_a_parallel_sweep_reaches_its_jobs(completed, tmp_path):
    proc = _start(tmp_path, "hydra/launcher=parallel", "seed=1,2", "trainer.max_steps=400", multirun=True)
    _wait_for(proc, lambda: len(list(tmp_path.glob("multiruns/*/*/checkpoints/checkpoint-1"))) == 2,
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
def test_19_06_a_parallel_sweep_has_one_directory_an_exit_code_and_finishes_on_rerun(tmp_path):
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
    first = _tree(sweep / "0")
    proc = rerun(tmp_path, "hydra/launcher=parallel", "data=alpaca", paths, multirun=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Continuing the unfinished sweep {sweep}" in proc.stderr
    assert "1 job(s) were already completed: their results are reused" in proc.stderr
    assert list((tmp_path / "multiruns").iterdir()) == [sweep] and _tree(sweep / "0") == first
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "completed"
    proc = rerun(tmp_path, "hydra/launcher=parallel", "data=alpaca", paths, multirun=True)
    assert len(list((tmp_path / "multiruns").iterdir())) == 2  # a finished sweep is not continued: a new one
