"""Links and names that lead out of a run or its output root, and secrets that could be written down: nothing is
written outside, nothing outside is read as the run's own, and the W&B key is in no file."""

import os
import shutil
import subprocess

import pytest

from neftlab import export, report
from neftlab.config.resolvers import run_id
from neftlab.core import rundir
from neftlab.core.files import UnsafePath
from tests.helpers import TINY, run, subprocess_run
from tests.run.crashes import CHAOS, crashed, neftlab_command, tree


def test_links_where_the_report_and_the_export_write_lead_nowhere(reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "victim.txt").write_text("untouched")
    sweep = tmp_path / "sweep"
    shutil.copytree(reference, sweep / "0")
    (sweep / "report.md").symlink_to(outside / "victim.txt")
    (sweep / "loss_curves.png").symlink_to(outside / "victim.txt")
    (sweep / "alpaca_eval").symlink_to(outside, target_is_directory=True)
    assert report.main([str(sweep)]) == 0
    assert (outside / "victim.txt").read_text() == "untouched"
    assert not (sweep / "report.md").is_symlink() and (sweep / "report.md").read_text().startswith("# neftlab")
    assert export.main([str(sweep), "--format", "alpaca_eval"]) == 2
    assert sorted(p.name for p in outside.iterdir()) == ["victim.txt"]
    with pytest.raises(UnsafePath, match="alpaca_eval is a symbolic link"):
        from neftlab.analysis.alpaca_format import export as export_answers
        export_answers(sweep)


def test_links_inside_an_interrupted_run_lead_nowhere(reference, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("log.txt", "samples.txt"):
        (outside / name).write_text("untouched")
    other = tmp_path / "runs" / "other"  # a completed run of the same config, its checkpoints kept
    shutil.copytree(reference, other)
    run_dir = crashed(reference, tmp_path, at=2, where="runs/victim")
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
    linked = crashed(reference, tmp_path, at=2, where="runs/linked")
    shutil.rmtree(linked / rundir.CHECKPOINTS)
    (linked / rundir.CHECKPOINTS).symlink_to(other / rundir.CHECKPOINTS, target_is_directory=True)
    before = tree(other)
    proc = subprocess_run(*CHAOS, f"trainer.resume={linked}", out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert proc.returncode == 1 and "no complete checkpoint there" in proc.stderr
    assert tree(other) == before


def test_the_wandb_key_is_in_no_file(tmp_path, monkeypatch):
    key = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", key)
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=wandb", "logger.mode=offline", out_dir=tmp_path / "run")
    assert summary["status"] == "completed", outcome.message
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file() and key.encode() in p.read_bytes()]


@pytest.mark.slow
def test_names_in_paths_stay_under_the_output_root(tmp_path):
    """A run id, a job name and an override value that climb out (`../../x`), in one command line: every file it
    writes is under its output root."""
    root = tmp_path / "a" / "b" / "out"
    root.mkdir(parents=True)
    proc = subprocess.run(neftlab_command("size=tiny", "logger=none", "eval.num_generations=0", f"output_root={root}",
                                  "hydra.job.name=../../x", "+data.columns.output=../../x"), cwd=root,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "NEFTLAB_RUN_ID": "../../x"})
    assert "Traceback" not in proc.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file() and root not in p.parents] == []
    assert list(root.glob("runs/*/summary.json"))  # it wrote its run, inside


def test_a_run_id_made_of_dots_stays_a_name(monkeypatch):
    for value, name in (("..", "_"), ("../../x", "_.._x"), ("a/b", "a_b")):
        monkeypatch.setenv("NEFTLAB_RUN_ID", value)
        run_id.cache_clear()
        assert run_id() == name and "/" not in run_id()
    run_id.cache_clear()


def test_a_judge_baseline_ending_in_dotdot_writes_inside_the_run(reference, tmp_path):
    from neftlab.core.rundir import judge_file
    path = judge_file(tmp_path / "run", str(tmp_path / "run" / "sub" / ".."))
    assert path.parent == tmp_path / "run"

