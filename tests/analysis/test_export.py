"""Answers out in AlpacaEval's format, its annotations back into the paired report: a round trip through
alpaca_eval's own loaders and its own evaluate(), with its judge replaced by a rule (no API is called)."""

import json
from unittest.mock import patch

import numpy as np
import pytest

from neftlab import export, report
from neftlab.analysis.annotations import read_annotations
from neftlab.analysis.alpaca_format import export as export_answers
from neftlab.analysis.runs import find_runs, label_judgings
from tests.evaluation.test_judge import ANSWERS_A, ANSWERS_B, sweep_run

alpaca_eval = pytest.importorskip("alpaca_eval.main", reason="alpaca-eval is not installed")


@pytest.fixture
def sweep(tmp_path):
    root = tmp_path / "sweep"
    for seed in (1, 2):
        sweep_run(root, f"plain_{seed}", "none", seed, ANSWERS_B)
        sweep_run(root, f"noisy_{seed}", "uniform", seed, ANSWERS_A[seed - 1:] + ANSWERS_A[:seed - 1])
    return root


def test_export_writes_what_alpaca_evals_loader_reads(sweep, capsys):
    from alpaca_eval import utils
    assert export.main([str(sweep), "--format", "alpaca_eval"]) == 0
    out = sweep / "alpaca_eval"
    generators = json.loads((out / "generators.json").read_text())
    assert sorted(generators) == ["noise=none,seed=1", "noise=none,seed=2", "noise=uniform,seed=1",
                                  "noise=uniform,seed=2"]
    assert generators["noise=uniform,seed=2"] == str((sweep / "noisy_2").resolve())
    df = utils.load_or_convert_to_dataframe(out / "noise=uniform,seed=1" / "model_outputs.json")
    assert list(df["output"]) == ANSWERS_A and set(df["generator"]) == {"noise=uniform,seed=1"}
    assert df["instruction"][0] == "Question 0: name a fruit and say why you like it."
    refs = utils.load_or_convert_to_dataframe(out / "noise=uniform,seed=1" / "reference_outputs.json")
    assert list(refs["output"]) == [f"Pears {i}." for i in range(4)]
    assert "alpaca_eval --model_outputs" in capsys.readouterr().out


def prefer_longer(self, df):
    """Stands in for AlpacaEval's judge: the longer output wins (2 = output_2)."""
    df = df.copy()
    df["preference"] = [2 if len(b) > len(a) else 1 for a, b in zip(df["output_1"], df["output_2"])]
    return df


def test_alpaca_eval_annotations_come_back_paired_by_seed(sweep, tmp_path):
    from alpaca_eval.annotators import SinglePairwiseAnnotator
    out, _ = export_answers(sweep)
    expected = []
    for seed in (1, 2):
        arm, base = out / f"noise=uniform,seed={seed}", out / f"noise=none,seed={seed}"
        with patch.object(SinglePairwiseAnnotator, "__call__", prefer_longer):
            board, _ = alpaca_eval.evaluate(
                model_outputs=str(arm / "model_outputs.json"), reference_outputs=str(base / "model_outputs.json"),
                annotators_config="test", output_path=str(arm), precomputed_leaderboard=None,
                fn_metric="get_winrate", sort_by="win_rate", is_return_instead_of_print=True,
                is_avoid_reannotations=False,
                caching_path=None)
        assert (arm / "test" / "annotations.json").is_file()  # <output_path>/<annotator>/, as alpaca_eval lays it
        expected.append(board["win_rate"].iloc[0] / 100)
    assert report.main([str(sweep), "--annotations", str(out)]) == 0
    text = (sweep / "report.md").read_text()
    mean = np.mean(expected)
    assert (f"| noise=uniform | AlpacaEval test win rate vs baseline | 2 | 0.500 | {mean:.3f} | {mean - 0.5:+.3f} |"
            in text)
    runs, _, _ = find_runs(sweep)
    read_annotations(out, runs)
    label_judgings(runs)
    judged = {r.dir.name: r.judges["AlpacaEval test"] for r in runs if "AlpacaEval test" in r.judges}
    assert sorted(judged) == ["noisy_1", "noisy_2"]
    summary = judged["noisy_1"][str((sweep / "plain_1").resolve())]
    assert summary["judge/win_rate"] == pytest.approx(expected[0]) and summary["judge/n_pairs"] == 4
    assert summary["judge/win_rate_ci_method"] == "95% BCa bootstrap interval, n = 4"


def test_unmatched_annotations_are_named_and_left_out(sweep, tmp_path, caplog):
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "annotations.json").write_text(json.dumps([{"instruction": "q", "output_1": "a", "output_2": "bb",
                                                          "generator_1": "gpt4", "generator_2": "someone_else",
                                                          "annotator": "x", "preference": 2}]))
    assert report.main([str(sweep), "--annotations", str(folder)]) == 0
    assert "AlpacaEval annotations of someone_else match no run" in caplog.text
    assert report.main([str(sweep), "--annotations", str(tmp_path / "missing")]) == 2
