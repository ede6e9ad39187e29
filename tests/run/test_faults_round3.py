"""Nothing lost, nothing let in, round three (issue 32): one test per case, numbered as the issue numbers them.

A case runs in this process unless a kill, a race or a process limit is its subject. Crash states are made from
real runs, cut back to what the crash leaves (`tests/run/test_faults.py::crashed`).
"""

import errno
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neftlab import export, report
from neftlab import judge as judge_cli
from neftlab.config import ConfigError, DataConfig
from neftlab.config.resolvers import run_id
from neftlab.core import rundir
from neftlab.core.files import UnsafePath, read_jsonl
from neftlab.data import DataError, locate, prepare
from neftlab.evaluation.judge.answers import final_answers
from neftlab.run import checkpoint as checkpoints
from neftlab.run import pipeline
from tests.helpers import ROOT, TINY, compose_cfg, run, subprocess_run
from tests.run.test_faults import EXACT, crashed

# checkpoints every 2 steps, an evaluation at step 2 and 4 with answers, the final evaluation, the model saved
CHAOS = ["size=tiny", "logger=none", "trainer.max_steps=6", "trainer.save_steps=2", "trainer.eval_steps=2",
         "trainer.save_total_limit=null", "eval.generate_every_eval=true"]


def neftlab(*args):
    return [sys.executable, "-m", "neftlab", *args]


def tree(folder):
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def once_each(run_dir):
    """Every training step's loss once, and every prompt's answer once per generation."""
    events = read_jsonl(run_dir / rundir.METRICS)
    steps = [e["step"] for e in events if "train/loss" in e]
    answers = [(r["step"], r.get("stage"), r["prompt_id"]) for r in read_jsonl(run_dir / rundir.SAMPLES)]
    return steps, answers


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of CHAOS, and how long it took."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    start = time.perf_counter()
    outcome, summary = run(*CHAOS, out_dir=folder)
    assert summary["status"] == "completed", outcome.message
    return folder, time.perf_counter() - start


# ---------------------------------------------------------------- kills at any moment

def working_since(root: Path, started: float) -> bool:
    """Whether a run under `root` has logged a training step (or, resumed past its training, an evaluation) since
    `started`: the process is past its start-up and at work."""
    return any(p.stat().st_mtime > started and ('"train/' in (text := p.read_text()) or '"eval/' in text)
               for p in root.glob(f"runs/*/{rundir.METRICS}"))


@pytest.mark.slow
def test_01_chaos_kills_end_at_the_uninterrupted_result(reference, tmp_path):
    """SIGKILL at 6 moments drawn with a fixed seed over the run's working time (training, its checkpoints, the
    evaluations, the answers, the final evaluation, the model's save), the same command after each: the run ends
    with the uninterrupted metrics, every step once in metrics.jsonl, every answer once in samples.jsonl."""
    folder, _ = reference
    command = neftlab(*CHAOS, f"output_root={tmp_path}")
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


def test_02_the_judge_takes_the_last_complete_generation_and_says_which(reference, tmp_path, caplog):
    """`neftlab.evaluate RUN` killed -9 after appending its answers, before its measures: the judge passes the cut
    generation over, named, and judges the run's final answers."""
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    files = rundir.RunFiles(folder, keep=lambda row: True, stage="reeval-1")
    files.append_samples([{"prompt_id": 0, "step": 6, "prompt": [{"role": "user", "content": "q"}],
                           "reference": "r", "generation": "cut", "tokens": 1, "stop": "eos"}])
    files.close()
    answers = final_answers(folder)
    assert (answers.step, answers.stage) == (6, "final") and len(answers.rows) == 2
    assert "the answers of step 6 (stage reeval-1) are incomplete" in caplog.text


@pytest.mark.slow
def test_03_report_and_export_killed_leave_nothing_torn_and_rerun_to_the_same_files(reference, tmp_path):
    sweep = tmp_path / "sweep"
    for n in range(2):
        shutil.copytree(reference[0], sweep / str(n))
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


# ---------------------------------------------------------------- runs that race

@pytest.mark.slow
def test_04_the_same_sweep_started_twice_trains_each_job_once(tmp_path):
    sweep = tmp_path / "sweep"
    command = neftlab("-m", "size=tiny", "logger=none", "seed=1,2", f"hydra.sweep.dir={sweep}",
                      f"output_root={tmp_path}")
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    for job in (0, 1):
        summary = json.loads((sweep / str(job) / rundir.SUMMARY).read_text())
        assert summary["status"] == "completed"
        assert once_each(sweep / str(job))[0] == [1, 2, 3, 4]  # trained once: no step twice
    for proc, err in zip(procs, outputs):
        assert "Traceback" not in err
        if proc.returncode:  # the other sweep was running some of its jobs: said so, naming them, and how to go on
            assert "job(s) were being run by another process" in err and "is in use by pid" in err, err[-2000:]
            assert "rerun the same command once it has ended: their results are then reused" in err


@pytest.mark.slow
def test_05_the_same_run_directory_started_twice_trains_once(tmp_path):
    folder = tmp_path / "run"
    command = neftlab("size=tiny", "logger=none", f"hydra.run.dir={folder}", f"output_root={tmp_path}")
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)]
    time.sleep(0.05)
    procs.append(subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    codes = [p.returncode for p in procs]
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    assert summary["status"] == "completed" and once_each(folder)[0] == [1, 2, 3, 4]
    if 1 in codes:  # the second started while the first worked: one line, and the first's files untouched
        loser = outputs[codes.index(1)]
        assert f"output directory {folder} is in use by pid" in loser and "Traceback" not in loser
    else:  # the second came after the first had completed: its result reused
        assert any("is already completed with this config" in o for o in outputs)


def test_06_an_interrupted_run_resumed_twice_at_once_is_resumed_once():
    """tests/run/test_faults.py::test_07_two_reruns_started_together_resume_the_run_once"""


def test_07_the_judge_refuses_a_run_that_is_still_training(reference, tmp_path, capsys):
    folder = tmp_path / "run"
    shutil.copytree(reference[0], folder)
    (folder / rundir.SUMMARY).unlink()  # no summary yet: it works, and its process holds the lock
    sleeper = subprocess.Popen(["sleep", "30"])
    from neftlab.core import claim
    from neftlab.core.rank import started
    holder = {**{k: claim.owner()[k] for k in ("host", "boot", "ns")}, "pid": sleeper.pid,
              "started": started(sleeper.pid)}
    (folder / rundir.LOCK).write_text(json.dumps(holder))
    try:
        assert judge_cli.main([str(folder), "--baseline", "reference", "--judge", "anything"]) == 2
        err = capsys.readouterr().err
        assert f"{folder} is still running (pid {sleeper.pid}): its answers are not its final ones" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    assert judge_cli.main([str(folder), "--baseline", "reference", "--judge", "anything"]) == 2
    assert "is not completed (status: killed)" in capsys.readouterr().err


@pytest.mark.slow
def test_08_two_containers_in_the_same_second_get_two_run_directories(tmp_path):
    """Each python is pid 1 in its own PID namespace (`unshare`), one host name and boot id between them."""
    if subprocess.run(["unshare", "-fp", "--mount-proc", "true"], capture_output=True).returncode:
        pytest.skip("unshare cannot make a PID namespace here")
    command = ["unshare", "-fp", "--mount-proc", sys.executable, "-m", "neftlab", "size=tiny", "logger=none",
               "method=original", "eval.num_generations=0", f"output_root={tmp_path}"]
    procs = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and all(r.name.split("_")[2].startswith("1-") for r in runs)  # pid 1, two tags
    assert all(json.loads((r / rundir.SUMMARY).read_text())["status"] == "completed" for r in runs)


# ---------------------------------------------------------------- crafted files and paths

class Payload:
    """A pickle that runs code when loaded: it creates the marker file."""
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_09_pickles_in_a_run_that_would_run_code_are_refused(reference, tmp_path):
    import torch
    marker = tmp_path / "ran"
    Payload.marker = marker
    run_dir = crashed(reference[0], tmp_path, at=4)
    newest = run_dir / "checkpoints" / "checkpoint-4"
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", rundir.rank_state(0)):
        torch.save({"state": Payload()}, newest / name)
    checkpoints.mark_complete(newest, keep=None)  # as if saved so: sizes match, the structure is sound
    assert "would run code when loaded" in checkpoints.problem(newest)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "again", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Skipping {newest}" in proc.stderr and f"Resuming {run_dir} from checkpoint-2" in proc.stderr
    assert report.main([str(tmp_path / "runs")]) == 0 and judge_cli.main(
        [str(run_dir), "--baseline", "reference", "--judge", "/nowhere"]) == 2
    assert not marker.exists()


def test_10_links_where_the_report_and_the_export_write_lead_nowhere(reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    sweep = tmp_path / "sweep"
    shutil.copytree(reference[0], sweep / "0")
    (sweep / "report.md").symlink_to(outside / "victim.txt")
    (sweep / "loss_curves.png").symlink_to(outside / "victim.txt")
    (sweep / "alpaca_eval").symlink_to(outside, target_is_directory=True)
    assert report.main([str(sweep)]) == 0
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (sweep / "report.md").is_symlink() and (sweep / "report.md").read_text().startswith("# neftlab")
    assert export.main([str(sweep), "--format", "alpaca_eval"]) == 2
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    with pytest.raises(UnsafePath, match="alpaca_eval is a symbolic link"):
        from neftlab.analysis.export import export as export_answers
        export_answers(sweep)


def test_11_links_inside_an_interrupted_run_lead_nowhere(reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("log.txt", "samples.txt"):
        (outside / name).write_text("untouched")
    other = tmp_path / "runs" / "other"  # a completed run of the same config, its checkpoints kept
    shutil.copytree(reference[0], other)
    run_dir = crashed(reference[0], tmp_path, at=2, where="runs/victim")
    (run_dir / "neftlab.log").unlink(missing_ok=True)
    (run_dir / "neftlab.log").symlink_to(outside / "log.txt")
    (run_dir / rundir.SAMPLES).unlink()
    (run_dir / rundir.SAMPLES).symlink_to(outside / "samples.txt")
    proc = subprocess_run(*CHAOS, out_dir=run_dir, root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"Resuming {run_dir} from checkpoint-2" in proc.stderr
    assert all((outside / n).read_text() == "untouched" for n in ("log.txt", "samples.txt"))
    assert not (run_dir / rundir.SAMPLES).is_symlink()
    # The command line's log file (Hydra's handler, held until the directory is decided) replaces the link.
    import logging
    from neftlab.run.job import HeldLog
    handler = logging.FileHandler(tmp_path / "job" / "neftlab.log", delay=True)
    logging.getLogger().addHandler(handler)
    try:
        held = HeldLog()
        logging.getLogger("neftlab").warning("a line for the run's log")
        held.release(run_dir)
        handler.flush()
    finally:
        logging.getLogger().removeHandler(handler)
        handler.close()
    assert not (run_dir / "neftlab.log").is_symlink() and "a line for" in (run_dir / "neftlab.log").read_text()
    assert (outside / "log.txt").read_text() == "untouched"
    # A run whose checkpoints are another run's (a link): never resumed, nor the other run's checkpoint taken.
    linked = crashed(reference[0], tmp_path, at=2, where="runs/linked")
    shutil.rmtree(linked / rundir.CHECKPOINTS)
    (linked / rundir.CHECKPOINTS).symlink_to(other / rundir.CHECKPOINTS, target_is_directory=True)
    before = tree(other)
    proc = subprocess_run(*CHAOS, f"trainer.resume={linked}", out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert proc.returncode == 1 and "no complete checkpoint there" in proc.stderr
    assert tree(other) == before


def test_12_the_wandb_key_is_in_no_file(tmp_path, monkeypatch):
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=wandb", "logger.mode=offline", out_dir=tmp_path / "run")
    assert summary["status"] == "completed", outcome.message
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


@pytest.mark.slow
def test_13_names_in_paths_stay_under_the_output_root(tmp_path):
    """A run id, a job name and an override value that climb out (`../../x`), in one command line: every file it
    writes is under its output root."""
    root = tmp_path / "a" / "b" / "out"
    root.mkdir(parents=True)
    proc = subprocess.run(neftlab("size=tiny", "logger=none", "eval.num_generations=0", f"output_root={root}",
                                  "hydra.job.name=../../x", "+data.columns.output=../../x"), cwd=root,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NEFTLAB_RUN_ID": "../../x"})
    assert "Traceback" not in proc.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents] == []
    assert list(root.glob("runs/*/summary.json"))  # it wrote its run, inside


def test_13_a_run_id_made_of_dots_stays_a_name(monkeypatch):
    for value, name in (("..", "_"), ("../../x", "_.._x"), ("a/b", "a_b")):
        monkeypatch.setenv("NEFTLAB_RUN_ID", value)
        run_id.cache_clear()
        assert run_id() == name and "/" not in run_id()
    run_id.cache_clear()


def test_13_a_judge_baseline_ending_in_dotdot_writes_inside_the_run(reference, tmp_path):
    from neftlab.core.rundir import judge_file
    path = judge_file(tmp_path / "run", str(tmp_path / "run" / "sub" / ".."))
    assert path.parent == tmp_path / "run"


# ---------------------------------------------------------------- runs that fail late, directories reused

def test_14_a_judge_that_cannot_be_had_stops_before_training(tmp_path):
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", "eval.judge.model=/nowhere/judge",
                           out_dir=tmp_path / "run")
    assert outcome.exit_code == 1 and "eval.judge.model=/nowhere/judge: no such directory" in outcome.message
    assert "train/loss" not in summary  # found before training, not after


def test_14_a_run_that_fails_after_training_is_only_evaluated_by_the_fixed_command(tmp_path, monkeypatch):
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


def test_15_16_a_failed_runs_directory_reused_by_another_config(reference, tmp_path):
    """A failed run that kept a checkpoint is refused to another config; one that kept nothing is replaced, and the
    new run is the one a rerun resumes."""
    run_dir = crashed(reference[0], tmp_path, at=4, where="runs/shared")
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


def test_17_a_checkpoint_whose_optimizer_no_longer_loads_is_skipped(reference, tmp_path):
    run_dir = crashed(reference[0], tmp_path, at=4)
    optimizer = run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[-1024:] = bytes(1024)  # the zip's central directory zeroed, the size unchanged
    optimizer.write_bytes(bytes(data))
    assert "optimizer.pt is corrupt" in checkpoints.problem(optimizer.parent)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "again", root=tmp_path)
    assert proc.returncode == 0 and f"Resuming {run_dir} from checkpoint-2" in proc.stderr


def test_18_out_of_memory_in_the_final_generation_keeps_the_model_and_names_the_key(tmp_path, monkeypatch):
    from neftlab.evaluation import generation
    with monkeypatch.context() as m:
        m.setattr(generation, "generate", lambda *a, **k: (_ for _ in ()).throw(
            RuntimeError("[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory")))
        first = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "a",
                               root=tmp_path)
    assert first.returncode == 1
    assert "out of memory while generating the answers (eval.batch_size=16): lower it" in first.stderr
    again = subprocess_run(*TINY, "model=llama_tiny", "logger=none", "eval.batch_size=1",
                           out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert again.returncode == 0 and "evaluating only" in again.stderr


def test_19_a_full_disk_during_the_model_save_leaves_nothing_torn(tmp_path, monkeypatch):
    from transformers import Trainer
    real = Trainer.save_model

    def full(self, folder=None, *args, **kwargs):
        if not str(folder).endswith("model.partial"):  # a checkpoint's save: whole
            return real(self, folder, *args, **kwargs)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(Trainer, "save_model", full)
        first = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "a",
                               root=tmp_path)
    run_dir = tmp_path / "runs" / "a"
    assert first.returncode == 1 and "no space left on device" in first.stderr
    assert not (run_dir / rundir.MODEL).exists()
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == "interrupted"
    assert Trainer.save_model is real
    again = subprocess_run(*TINY, "model=llama_tiny", "logger=none", out_dir=tmp_path / "runs" / "b", root=tmp_path)
    assert again.returncode == 0 and "evaluating only" in again.stderr
    assert (run_dir / rundir.MODEL / "model.safetensors").stat().st_size > 1000


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


def test_20_a_read_only_interrupted_run_is_passed_over_or_refused_in_one_line(reference, tmp_path, read_only):
    run_dir = crashed(reference[0], tmp_path, at=2)
    read_only(run_dir)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert proc.returncode == 0 and f"Not resuming {run_dir}: {run_dir} is read-only" in proc.stderr
    refused = subprocess_run(*CHAOS, out_dir=run_dir, root=tmp_path)
    assert refused.returncode == 1 and "is read-only (Read-only file system): a run there cannot be resumed in " \
                                      "place; copy it to a writable place and pass trainer.resume=" in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("limit, extra", [(16, []), (32, ["-m", "hydra/launcher=parallel", "seed=1,2"])],
                         ids=["run", "parallel_sweep"])
def test_21_a_low_open_files_limit(tmp_path, limit, extra):
    proc = subprocess.run(neftlab(*extra, "size=tiny", "logger=none", f"output_root={tmp_path}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)))
    if proc.returncode:  # one line naming the limit
        assert "Too many open files" in proc.stderr and "ulimit -n" in proc.stderr, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
    else:
        summaries = [json.loads(p.read_text()) for p in tmp_path.rglob(rundir.SUMMARY)]
        assert summaries and all(s["status"] == "completed" for s in summaries)


@pytest.mark.slow
def test_22_a_dead_wandb_service_does_not_stop_the_training(tmp_path):
    import psutil
    folder = tmp_path / "run"
    proc = subprocess.Popen(neftlab("size=tiny", "trainer.max_steps=40", "logger=wandb", "logger.mode=offline",
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


def test_23_a_changed_base_model_is_never_resumed(tmp_path):
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


# ---------------------------------------------------------------- data and models as they come

def test_24_files_as_people_save_them(tmp_path, llama_tokenizer, bert_tokenizer):
    latin = tmp_path / "latin.csv"
    latin.write_bytes("text,label\ncafé,pos\nthé,neg\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin.csv: not UTF-8 text \(invalid continuation byte at byte 14 of the "
                                        r"file\); if it is Latin-1 or another 8-bit encoding, save it as UTF-8"):
        locate(DataConfig(path=str(latin), format="classification")).records()
    utf16 = tmp_path / "rows.jsonl"
    utf16.write_bytes("".join(json.dumps({"text": f"texte {i} é", "label": i % 2}) + "\n" for i in range(6))
                      .encode("utf-16"))
    assert [r["text"] for r in locate(DataConfig(path=str(utf16), format="classification")).records()][0] == "texte 0 é"
    mixed = tmp_path / "mixed.json"
    mixed.write_text(json.dumps([{"instruction": "a", "output": "b"}] * 3 + [{"conversations": [
        {"from": "human", "value": "a"}, {"from": "gpt", "value": "b"}]}]))
    with pytest.raises(DataError, match=r"mixed.json: mixes record formats, Alpaca \(first at row 0\), ShareGPT "
                                        r"\(first at row 3\); one format per file"):
        prepare(DataConfig(path=str(mixed), format="alpaca", eval_size=1), llama_tokenizer, True, seed=0)
    quoted = tmp_path / "quoted.csv"
    quoted.write_text("instruction,output\n" + "".join(f'"line one {i}\nline two",answer {i}\n' for i in range(12)))
    data = prepare(DataConfig(path=str(quoted), format="alpaca", eval_size=2), llama_tokenizer, True, seed=0)
    assert any("line one" in m["content"] and "\nline two" in m["content"] for p, _ in data.prompts for m in p)


def test_25_a_sharegpt_file_without_an_exchange_says_so(tmp_path, llama_tokenizer):
    path = tmp_path / "monologue.json"
    path.write_text(json.dumps([{"conversations": [{"from": "gpt", "value": f"hello {i}"}]} for i in range(10)]))
    with pytest.raises(DataError, match="no record has a user turn followed by an assistant reply"):
        prepare(DataConfig(path=str(path), eval_size=2), llama_tokenizer, True, seed=0)


@pytest.mark.slow
def test_26_one_huge_record_is_skipped_counted_and_costs_no_memory(tmp_path):
    path = tmp_path / "big.jsonl"
    with path.open("w") as f:
        for i in range(48):
            f.write(json.dumps({"instruction": f"Say {i}", "output": f"{i} it is"}) + "\n")
        f.write(json.dumps({"instruction": "Read this", "output": "word " * 10_000_000}) + "\n")  # 50 MB
    folder = tmp_path / "run"
    start = time.perf_counter()
    proc = subprocess.run(neftlab("size=tiny", "logger=none", "data=alpaca", f"data.path={path}",
                                  f"hydra.run.dir={folder}", f"output_root={tmp_path}"), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped 1 record(s) of more than 1000000 characters" in proc.stderr
    summary = json.loads((folder / rundir.SUMMARY).read_text())
    assert summary["efficiency/peak_memory_mb"] < 2500 and time.perf_counter() - start < 180


def test_27_a_data_path_that_is_not_a_file_says_what_it_is(tmp_path):
    pipe = tmp_path / "pipe.jsonl"
    os.mkfifo(pipe)
    for path, what in ((tmp_path, "a directory"), (pipe, "a named pipe")):
        with pytest.raises(DataError, match=f"data.path={path} is {what}; expected a .json, .jsonl or .csv file"):
            locate(DataConfig(path=str(path), format="alpaca"))


@pytest.mark.parametrize("override, allowed", [
    ("+trainer.args.gradient_accumulation_steps=0", "an integer >= 1"),
    ("+trainer.args.per_device_eval_batch_size=0", "an integer >= 1"),
    ("+trainer.args.dataloader_num_workers=-1", "an integer >= 0"),
])
def test_29_training_arguments_the_trainer_cannot_use_are_refused_before_loading(override, allowed):
    key = override.removeprefix("+").split("=")[0]
    with pytest.raises(ConfigError, match=f"{key}=.* is not allowed: {allowed}"):
        compose_cfg(override)


def test_30_the_tools_pointed_at_the_wrong_thing_say_so_in_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("x")
    other = tmp_path / "other_tool" / "exp1"
    other.mkdir(parents=True)
    (other / "summary.json").write_text(json.dumps({"accuracy": 0.9}))
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    for target in ("empty", "file.txt", "other_tool", "loop"):
        assert report.main([str(tmp_path / target)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and ("no neftlab run under" in err[0] or "is not a directory" in err[0]), err


# ---------------------------------------------------------------- found in other checks

def test_33_answers_at_every_evaluation_survive_an_interruption(reference, tmp_path):
    """With eval.generate_every_eval: killed after the step-4 checkpoint, rerun: each evaluation's answers once."""
    run_dir = crashed(reference[0], tmp_path, at=4)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "again", root=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps, answers = once_each(run_dir)
    assert steps == list(range(1, 7))
    assert sorted(answers) == sorted(once_each(reference[0])[1])  # steps 2 and 4 during training, 6 at the end


def test_run_ids_differ_between_namespaces(monkeypatch):
    """Case 8's mechanism, in this process: the tag hashes the PID namespace, so pid 1 in two containers differs."""
    import neftlab.config.resolvers as resolvers
    names = set()
    for namespace in (111, 222):
        monkeypatch.setattr(resolvers.os, "stat", lambda path, ns=namespace: type("S", (), {"st_ino": ns})())
        monkeypatch.setattr(resolvers, "job_pid", lambda: 1)
        monkeypatch.setattr(resolvers, "started", lambda pid: 1_700_000_000.0)
        run_id.cache_clear()
        names.add(run_id())
    run_id.cache_clear()
    assert len(names) == 2 and all("_1-" in n for n in names)
