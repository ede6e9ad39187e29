"""Each folder under examples/ is a plugin a user keeps outside neftlab: copied out of the repository, its run.sh
runs it at size=tiny with nothing in neftlab/ or conf/ naming it."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

EXAMPLES = sorted(p.name for p in (ROOT / "examples").iterdir() if (p / "run.sh").is_file())


def test_no_file_of_neftlab_names_an_example():
    for name in EXAMPLES:
        stems = {p.stem for p in (ROOT / "examples" / name).rglob("*.py")} | {
            p.stem for p in (ROOT / "examples" / name).rglob("*.yaml")}
        for path in [*(ROOT / "neftlab").rglob("*.py"), *(ROOT / "conf").rglob("*.yaml")]:
            text = path.read_text()
            assert not any(stem in text for stem in stems if len(stem) > 6), f"{path} names {name}'s files"


def run_example(name: str, tmp_path: Path) -> Path:
    folder = shutil.copytree(ROOT / "examples" / name, tmp_path / name)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "WANDB_SERVICE")}
    proc = subprocess.run(["bash", str(folder / "run.sh"), str(out)], cwd=tmp_path, env={**env, "PYTHON": sys.executable},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


@pytest.mark.slow
def test_a_users_noise_kind_trains_is_searched_and_reported(tmp_path):
    out = run_example("student_t_noise", tmp_path)
    run = out / "run"
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    noise = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["noise"]
    assert (noise["kind"], noise["dof"], noise["_target_"]) == ("student_t", 5, "student_t_noise.StudentT")
    report = (out / "experiments" / "perturbation_search_tiny" / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| noise=student_t,noise.alpha=")]
    assert rows and all(",noise.dof=" in row and "| completed |" in row for row in rows)  # its own space, drawn
