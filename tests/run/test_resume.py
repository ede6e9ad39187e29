"""Resume: SIGTERM saves and a rerun resumes to the same result; runs are found, claimed and never taken over live."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from neftlab.config import ConfigError
from neftlab.core import claim, rundir
from neftlab.core.rank import started
from neftlab.run import resume
from neftlab.run.checkpoint import mark_complete
from neftlab.run.fingerprint import Identity
from tests.helpers import ROOT, TINY, cli, run, subprocess_run

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


@pytest.mark.slow
def test_sigterm_saves_and_rerunning_the_command_resumes_to_the_uninterrupted_result(tmp_path):
    _, reference = cli(*RESUMABLE, out_dir=tmp_path / "reference")
    assert reference["status"] == "completed"

    command = neftlab(*RESUMABLE, f"output_root={tmp_path}")  # runs in <output_root>/runs/<id>
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
    _, first = run(*TINY, "model=llama_tiny", "noise=uniform", "logger=none", out_dir=tmp_path / "a")
    _, second = run(*TINY, "model=llama_tiny", "noise=uniform", "logger=none", out_dir=tmp_path / "b")
    assert first["status"] == "completed" and comparable(first) == comparable(second)


def test_explicit_resume_settings(tmp_path):
    identity = Identity({"trainer": {}}, {"hub": None}, {"random_init": True})
    with pytest.raises(ConfigError, match="trainer.resume=true: no unfinished run"):
        resume.find_resume(True, identity, tmp_path / "run", tmp_path)
    with pytest.raises(ConfigError, match="no complete checkpoint there"):
        resume.find_resume(str(tmp_path), identity, tmp_path / "run", tmp_path)
    assert resume.find_resume(False, identity, tmp_path / "run", tmp_path) is None


@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    procs = [subprocess.Popen(neftlab("size=tiny", "method=original", "logger=none", "eval.num_generations=0"),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)


def interrupted_run(run_dir, config, data=None, step=5, holder=None):
    """A run directory as an interruption leaves it: config, fingerprint, a complete checkpoint, maybe a lock."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(json.dumps(config))
    Identity(config, data or DATA, MODEL).record(run_dir)
    checkpoint = run_dir / "checkpoints" / f"checkpoint-{step}"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    mark_complete(checkpoint, keep=None)
    (run_dir / "metrics.jsonl").write_text("")
    if holder is not None:
        (run_dir / rundir.LOCK).write_text(json.dumps(holder))
    return run_dir


CONFIG, DATA = {"seed": 1, "trainer": {"resume": "auto"}, "eval": {"max_new_tokens": 256}}, {"hub": None}
MODEL = {"random_init": True}


def identity(config=CONFIG):
    return Identity(config, DATA, MODEL)


def here():
    me = claim.owner()
    return {"host": me["host"], "boot": me["boot"], "ns": me["ns"]}


def test_a_run_still_in_progress_is_not_taken_over(tmp_path):
    sleeper = subprocess.Popen(["sleep", "30"])
    holder = {**here(), "pid": sleeper.pid, "started": started(sleeper.pid)}
    run = interrupted_run(tmp_path / "runs" / "0", CONFIG, holder=holder)  # a sweep job's directory: its name
    new = tmp_path / "runs" / "now"                                         # says nothing about its process
    assert resume.find_resume("auto", identity(), new, tmp_path) is None  # its process is alive
    sleeper.kill()
    sleeper.wait()
    found = resume.find_resume("auto", identity(), new, tmp_path)
    assert found.run_dir == run and found.step == 5 and found.lock.held
    assert json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    found.lock.release()
    assert not (run / rundir.LOCK).exists()


def test_a_reused_pid_is_another_process(tmp_path):
    """kill -9, then the rerun gets the dead run's pid (a container restart): the start time tells them apart."""
    holder = {**here(), "pid": os.getpid(), "started": started(os.getpid()) - 3600}
    run = interrupted_run(tmp_path / "runs" / "old", CONFIG, holder=holder)
    found = resume.find_resume("auto", identity(), tmp_path / "runs" / "new", tmp_path)
    assert found is not None and found.run_dir == run
    found.lock.release()


def test_a_lock_from_another_node_is_stale_once_its_heartbeat_stops(tmp_path, caplog):
    holder = {"host": "node-a-17", "boot": "elsewhere", "pid": 436, "started": 1.0}
    run = interrupted_run(tmp_path / "runs" / "old", CONFIG, holder=holder)
    new = tmp_path / "runs" / "new"
    assert resume.find_resume("auto", identity(), new, tmp_path) is None  # renewed just now: it may run
    assert f"Not resuming {run}: it is in use by pid 436 on node-a-17 (its lock renewed" in caplog.text
    assert f"trainer.resume={run} trainer.take_over=true" in caplog.text
    with pytest.raises(ConfigError, match=r"in use by pid 436 on node-a-17 .* take the run over with "
                                          rf"trainer.resume={run} trainer.take_over=true"):
        resume.find_resume(str(run), identity(), new, tmp_path)
    taken = resume.find_resume(str(run), identity(), new, tmp_path, take_over=True)
    assert taken.run_dir == run and json.loads((run / rundir.LOCK).read_text())["pid"] == os.getpid()
    taken.lock.release()
    (run / rundir.LOCK).write_text(json.dumps(holder))
    old = time.time() - claim.STALE_AFTER_S - 60
    os.utime(run / rundir.LOCK, (old, old))  # the node died: no heartbeat for over ten minutes
    found = resume.find_resume("auto", identity(), new, tmp_path)
    assert found.run_dir == run
    found.lock.release()


def test_the_heartbeat_renews_a_held_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(claim, "HEARTBEAT_S", 0.05)
    lock = claim.RunLock(tmp_path)
    assert lock.acquire() is None
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    time.sleep(0.3)
    assert claim.age(lock.path) < 5
    lock.release()
    assert not lock.path.exists()


def test_keys_that_do_not_shape_training_do_not_block_a_resume(tmp_path):
    run = interrupted_run(tmp_path / "runs" / "old", CONFIG)
    changed = {**CONFIG, "eval": {"max_new_tokens": 16}, "logger": {"kind": "none"}}
    found = resume.find_resume("auto", identity(changed), tmp_path / "runs" / "new", tmp_path)
    assert found is not None and found.run_dir == run
    found.lock.release()
    assert resume.find_resume("auto", identity({**CONFIG, "seed": 2}), tmp_path / "runs" / "new", tmp_path) is None


def test_auto_resume_looks_under_the_output_root_only(tmp_path):
    """hydra.run.dir=/scratch/me/run1 must not scan /scratch/*/*: other people's runs, other studies."""
    elsewhere = interrupted_run(tmp_path / "scratch" / "someone" / "run", CONFIG)
    root = tmp_path / "outputs"
    root.mkdir()
    assert resume.find_resume("auto", identity(), tmp_path / "scratch" / "me" / "run1", root) is None
    found = resume.find_resume("auto", identity(), elsewhere, root)  # the job's own directory is looked at
    assert found.run_dir == elsewhere
    found.lock.release()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a directory to another user")
def test_a_run_of_another_user_is_never_taken_over(tmp_path):
    run = interrupted_run(tmp_path / "outputs" / "runs" / "theirs", CONFIG)
    for path in [run, *run.rglob("*")]:
        os.chown(path, 4321, 4321)
    assert resume.find_resume("auto", identity(), tmp_path / "outputs" / "runs" / "mine", tmp_path / "outputs") is None
    with pytest.raises(ConfigError, match="that run belongs to the user 4321"):
        resume.find_resume(str(run), identity(), tmp_path / "mine", tmp_path / "outputs")


OLD_TRAINER_ARGS = {  # what trainer.args held in every config neftlab wrote before round three
    "num_train_epochs": 1.0, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "optim": "adamw_torch", "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
    "activation_checkpointing": False, "bf16": False, "logging_steps": 1, "dataloader_num_workers": 0,
    "ddp_backend": None}


def test_a_run_written_before_round_three_still_resumes(tmp_path):
    """Its checkpoint of format 1 (neftlab_state.pt with alpha and threshold beside rank files of rng and masks), its
    config listing every TrainingArguments default, its fingerprint without the base model: resumed, to the
    uninterrupted result."""
    import shutil

    import torch
    import yaml
    overrides = ["size=tiny", "logger=none", "noise=dynamic", "noise.stability_threshold=auto", "pruning=l1",
                 "trainer.save_steps=2", "trainer.save_total_limit=null"]
    outcome, reference = run(*overrides, out_dir=tmp_path / "reference")
    assert reference["status"] == "completed", outcome.message
    old = tmp_path / "runs" / "old"
    shutil.copytree(tmp_path / "reference", old)
    (old / "summary.json").unlink()
    shutil.rmtree(old / "checkpoints" / "checkpoint-4")
    events = [json.loads(line) for line in (old / "metrics.jsonl").read_text().splitlines()]
    (old / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events if e["step"] <= 2))
    checkpoint = old / "checkpoints" / "checkpoint-2"
    states = torch.load(checkpoint / "neftlab_rank0.pt", weights_only=True)["states"]
    torch.save({"noise_rng": states["noise"]["rng"], "pruning_masks": states["pruning"]["masks"]},
               checkpoint / "neftlab_rank0.pt")
    torch.save({"noise_alpha": states["noise_control"]["alpha"],
                "noise_threshold": states["noise_control"]["dynamic"]["threshold"]}, checkpoint / "neftlab_state.pt")
    mark_complete(checkpoint, keep=None)
    config = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    config["trainer"]["args"] = {**OLD_TRAINER_ARGS, **config["trainer"]["args"]}
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    fingerprint = json.loads((old / "fingerprint.json").read_text())
    del fingerprint["model"]
    (old / "fingerprint.json").write_text(json.dumps(fingerprint))
    again = subprocess_run(*overrides, out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert again.returncode == 0 and f"Resuming {old} from checkpoint-2" in again.stderr, again.stderr[-3000:]
    assert "Restored the state of noise, noise_control, pruning from checkpoint-2" in again.stderr
    resumed = json.loads((old / "summary.json").read_text())
    assert comparable(resumed) == pytest.approx(comparable(reference), rel=1e-5, abs=1e-6)
