"""The offline report: one row per run, seeds folded into mean ± std, plots, a clear error without runs."""

import json

import pytest
import yaml

from neftlab import report


def fake_run(root, name, overrides, alpha, seed, eval_loss, status="completed"):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "noise": {"kind": "uniform", "alpha": alpha}, "pruning": {"method": "off", "ratio": 0.3}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "train/loss": 3.0 - s / 10}) + "\n"
                                               for s in range(1, 4)) + json.dumps({"step": 3, "eval/loss": eval_loss}))
    summary = {"status": status, "eval/loss": eval_loss, "eval/accuracy": 0.5}
    if status != "completed":
        summary["error"] = "trainer.learning_rate=0.0 is not allowed"
    (run / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def sweep(tmp_path):
    for i, (alpha, seed, loss) in enumerate([(1, 1, 2.0), (1, 2, 2.2), (5, 1, 1.8), (5, 2, 1.6)]):
        fake_run(tmp_path, str(i), ["size=tiny", f"noise.alpha={alpha}", f"seed={seed}"], alpha, seed, loss)
    fake_run(tmp_path, "4", ["size=tiny", "noise.alpha=10", "seed=1"], 10, 1, 9.9, status="failed")
    return tmp_path


def test_report_rows_folding_and_plots(sweep, capsys):
    assert report.main([str(sweep)]) == 0
    text = (sweep / "report.md").read_text()
    assert "5 runs, 4 completed, 1 not completed" in text
    assert "Overrides common to all runs: `size=tiny`" in text
    assert "| noise.alpha=5,seed=2 | 3 | 1.6000 |" in text
    assert "| noise.alpha=1 | 2 | 2.1000 ± 0.1000 |" in text  # mean ± population std over the two seeds
    assert "trainer.learning_rate=0.0 is not allowed" in text
    for png in ("loss_curves.png", "vs_alpha.png"):
        assert (sweep / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "vs_pruning_ratio.png" not in text  # no pruned runs, no plot
    assert "Reading runs" in capsys.readouterr().err  # a progress bar


def test_report_on_a_directory_without_runs_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert f"no runs under {tmp_path}" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2
