"""Nothing lost: SIGTERM saves and a rerun resumes to the same result; NaNs stop runs; bad output dirs fail early."""

import json
import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, TINY, cli
from neftlab import safety
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
    with pytest.raises(ConfigError, match="trainer.resume=true: no interrupted run"):
        safety.find_resume(True, {"trainer": {}}, tmp_path / "run")
    with pytest.raises(ConfigError, match="no checkpoint there"):
        safety.find_resume(str(tmp_path), {"trainer": {}}, tmp_path / "run")
    assert safety.find_resume(False, {"trainer": {}}, tmp_path / "run") is None


def test_nan_loss_stops_the_run_with_its_step(tmp_path):
    proc, summary = cli("size=tiny", "trainer.learning_rate=1e30", "logger=none", out_dir=tmp_path)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert summary["status"] == "failed"
    assert summary["error"].startswith("train loss is nan at step ") and "stopping" in summary["error"]


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def test_skip_mode_drops_the_batch_without_moving_any_weight():
    model = tiny_llama()
    events = []
    guard = safety.NonFiniteGuard(model, "skip", max_skipped=1, log_event=lambda step, m: events.append((step, m)))
    model.register_forward_hook(lambda m, a, out: out.__setitem__("loss", out["loss"] * float("nan")))
    guard.on_train_begin(None, None, None)
    guard.on_step_begin(None, SimpleNamespace(global_step=6), None)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    before = [p.clone() for p in model.parameters()]
    ids = torch.randint(0, 100, (2, 8))
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert events == [(7, {"train/skipped_batches": 1})]
    with pytest.raises(safety.NonFiniteError, match=r"train loss is nan at step 7 after 1 skipped batches"):
        model(input_ids=ids, labels=ids)
    guard.remove()


def test_nan_weights_are_never_saved():
    model = tiny_llama()
    guard = safety.NonFiniteGuard(model, "fail", 0, lambda step, m: None)
    guard.on_step_end(None, SimpleNamespace(global_step=3), SimpleNamespace(should_save=True))  # finite: fine
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("inf")
    with pytest.raises(safety.NonFiniteError, match="lm_head.weight holds NaN/inf at step 4; not saving it"):
        guard.on_step_end(None, SimpleNamespace(global_step=4), SimpleNamespace(should_save=True))
    guard.on_step_end(None, SimpleNamespace(global_step=5), SimpleNamespace(should_save=False))  # no save, no check


def test_unwritable_output_dir_fails_before_anything_loads(tmp_path):
    (tmp_path / "file").write_text("")
    proc, _ = cli("size=tiny", out_dir=tmp_path / "file" / "run")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"output directory {tmp_path}/file/run is not writable: Not a directory" in proc.stderr


def test_full_output_dir_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(safety.shutil, "disk_usage", lambda path: SimpleNamespace(free=10 * 2**20))
    with pytest.raises(ConfigError, match="has 10 MiB free, less than the 200 MiB"):
        safety.check_output_dir(tmp_path)


def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    procs = [subprocess.Popen(neftlab("size=tiny", "method=original", "logger=none", "eval.num_generations=0"),
                              cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    runs = list((tmp_path / "outputs" / "runs").iterdir())
    assert len(runs) == 2 and all((r / "summary.json").exists() for r in runs)


def test_a_run_still_in_progress_is_not_taken_over(tmp_path):
    config = {"seed": 1, "trainer": {"resume": "auto"}}
    sleeper = subprocess.Popen(["sleep", "30"])
    run = tmp_path / "runs" / f"2026-01-01_00-00-00_{sleeper.pid}"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(json.dumps(config))
    (run / "checkpoints" / "checkpoint-5").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-5" / "trainer_state.json").write_text("{}")
    here = tmp_path / "runs" / "now"
    assert safety.find_resume("auto", config, here) is None  # its process is alive
    sleeper.kill()
    sleeper.wait()
    found = safety.find_resume("auto", config, here)
    assert found.run_dir == run and found.step == 5
