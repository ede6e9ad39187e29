"""W&B's service process (wandb-core) killed mid-run, as a job's cleanup may kill it: training goes on and completes,
the process ends with one line about W&B rather than W&B's own traceback, and the rerun reuses the completed run."""

import json
import os
import subprocess
import sys

import psutil
import pytest

from tests.helpers import ROOT


def _command(out):
    return [sys.executable, "-m", "neftlab", "size=tiny", "logger=wandb", "trainer.max_steps=8",
            "trainer.save_steps=4", f"hydra.run.dir={out}", f"output_root={out}"]


@pytest.mark.slow
def test_a_killed_wandb_service_ends_in_one_line_after_a_completed_run(tmp_path):
    # Without WANDB_SERVICE: an in-process W&B test earlier in this pytest leaves it set, and the child would use
    # that test's service instead of starting the wandb-core this test kills.
    env = {**{k: v for k, v in os.environ.items() if k != "WANDB_SERVICE"}, "WANDB_MODE": "offline"}
    proc = subprocess.Popen(_command(tmp_path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    metrics, killed = tmp_path / "metrics.jsonl", []
    while not killed:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if metrics.exists() and any(json.loads(line).get("step", 0) >= 5 for line in metrics.read_text().splitlines()
                                    if line.strip().endswith("}")):
            killed = [p.kill() or p.pid for p in psutil.Process(proc.pid).children(recursive=True)
                      if "wandb-core" in " ".join(p.cmdline())]
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"
    assert "Traceback" not in out, out[-3000:]
    assert out.count("W&B's service process had ended before this one (ConnectionResetError") == 1
    again = subprocess.run(_command(tmp_path), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "Traceback" not in again.stderr, again.stderr[-3000:]
    assert f"neftlab: reused: {tmp_path}\n" in again.stderr, again.stderr[-3000:]
