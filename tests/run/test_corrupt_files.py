"""Corrupt, truncated or crafted files in a run's directory: each is named, passed over, and the run resumes from
what is whole, to the uninterrupted result; the report reads around them. Crash states are cut back from the
session's completed runs (tests/run/crashes.py)."""

import json
import os
import shutil

import pytest

from neftlab import report
from neftlab import judge as judge_cli
from neftlab.core import rundir
from neftlab.run import checkpoint as checkpoints
from tests.helpers import subprocess_run
from tests.run.crashes import CHAOS, assert_resumed_to_reference, crashed, rerun


def test_a_kill_during_a_save_resumes_from_the_previous_complete_checkpoint(completed, tmp_path):
    run = crashed(completed, tmp_path, at=3)
    (run / "checkpoints/checkpoint-3" / rundir.rank_state(0)).unlink()  # killed after the Trainer's part
    (run / "checkpoints/checkpoint-3" / rundir.MARKER).unlink()
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert "checkpoint-3 is incomplete" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_rotation_keeps_the_last_complete_checkpoint_until_a_newer_one_is(tmp_path):
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
def test_a_truncated_file_names_itself_and_resume_falls_back(completed, tmp_path, name):
    run = crashed(completed, tmp_path, at=3)
    path = run / "checkpoints/checkpoint-3" / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert f"{path} is corrupt" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_a_checkpoint_whose_optimizer_no_longer_loads_is_skipped(reference, tmp_path):
    run_dir = crashed(reference, tmp_path, at=4)
    optimizer = run_dir / "checkpoints" / "checkpoint-4" / "optimizer.pt"
    data = bytearray(optimizer.read_bytes())
    data[-1024:] = bytes(1024)  # the zip's central directory zeroed, the size unchanged
    optimizer.write_bytes(bytes(data))
    assert "optimizer.pt is corrupt" in checkpoints.problem(optimizer.parent)
    proc = subprocess_run(*CHAOS, out_dir=tmp_path / "runs" / "again", root=tmp_path)
    assert proc.returncode == 0 and f"Resuming {run_dir} from checkpoint-2" in proc.stderr


class Payload:
    """A pickle that runs code when loaded: it creates the marker file."""
    marker = None

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickles_in_a_run_that_would_run_code_are_refused(reference, tmp_path):
    import torch
    marker = tmp_path / "ran"
    Payload.marker = marker
    run_dir = crashed(reference, tmp_path, at=4)
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


def test_a_torn_last_metrics_line_is_skipped_and_named(completed, tmp_path):
    run = crashed(completed, tmp_path, at=2)
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "train/lo')
    proc = rerun(tmp_path)
    assert proc.returncode == 0
    assert f"{run / 'metrics.jsonl'}: skipped its last line, cut off" in proc.stderr
    assert_resumed_to_reference(run, completed, proc.stderr, from_step=2)


def test_a_corrupt_sibling_summary_blocks_nothing(completed, tmp_path):
    sibling = crashed(completed, tmp_path, at=2)
    (sibling / "summary.json").write_text("")
    proc = rerun(tmp_path, "trainer.max_steps=1")
    assert proc.returncode == 0 and "summary.json is unreadable" in proc.stderr
    (new,) = [p for p in (tmp_path / "runs").iterdir() if p != sibling]
    assert json.loads((new / "summary.json").read_text())["status"] == "completed"


def test_the_report_names_corrupt_files_and_goes_on(completed, tmp_path):
    shutil.copytree(completed, tmp_path / "good")
    shutil.copytree(completed, tmp_path / "bad")
    (tmp_path / "bad" / "summary.json").write_text("{")
    with (tmp_path / "good" / "metrics.jsonl").open("a") as f:
        f.write('{"step": 9, "tr')
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "1 runs, 1 completed" in text and f"`{tmp_path / 'bad' / 'summary.json'}`: not valid JSON" in text

