"""The offline report: one row per run, seeds folded into mean ± std, arms paired by seed against the baseline
arm with t intervals, sign-flip p-values and Holm's adjustment, the judges' win rates, plots, a clear error
without runs."""

import json

import pytest
import yaml
from scipy import stats as st

from neftlab import report
from neftlab.analysis import plots
from neftlab.analysis.runs import find_runs
from neftlab.core import measures


def fake_run(root, name, overrides, alpha, seed, eval_loss, status="completed", noise="uniform", pruning="off",
             max_steps=4):
    """A run as neftlab wrote it before `pruning.method` was renamed `pruning.kind` (and, in `study_run`, before the
    method group was gone): the report reads it in today's names."""
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(
        {"seed": seed, "noise": {"kind": noise, "alpha": alpha}, "pruning": {"method": pruning, "ratio": 0.3},
         "trainer": {"max_steps": max_steps, "learning_rate": 1e-4}}))
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
    bar = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if line.startswith("Reading runs")]
    assert bar and "5/5" in bar[-1]  # a progress bar over the 5 runs, which ended full


def test_report_on_a_directory_without_runs_fails_clearly(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert f"no neftlab run under {tmp_path}" in capsys.readouterr().err
    assert report.main([str(tmp_path / "missing")]) == 2


ARMS = {"finetune": dict(noise="none"), "neftune": dict(noise="uniform"), "original": dict(noise="none", max_steps=0),
        "pruning": dict(noise="none", pruning="l1")}


def study_run(root, method, seed, length, loss=2.0, wins=None):
    """A run of the baselines study: summary measures, answers at two steps, and judge files."""
    name = f"{method}_{seed}"
    fake_run(root, name, ["experiment=baselines", f"method={method}", f"seed={seed}"], 5, seed, loss, **ARMS[method])
    run = root / name
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "eval/response_length": length}))
    rows = [{"prompt_id": i, "step": step, "prompt": [], "reference": "", "generation": "", "tokens": tokens}
            for step, lengths in ((2, [1, 1]), (4, [length - 5, length + 5])) for i, tokens in enumerate(lengths)]
    (run / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for baseline, win in (wins or {}).items():
        against = "reference" if baseline == "reference" else str((root / baseline).resolve())
        (run / f"judge_{baseline}.json").write_text(json.dumps(
            {"baseline": against, "summary": {"judge/win_rate": win, "judge/lc_win_rate": win - 0.1}, "pairs": []}))


def make_study(root):
    for seed, (base, noisy, win) in enumerate([(50, 60, 0.6), (60, 75, 0.7), (70, 80, 0.8)], 1):
        study_run(root, "finetune", seed, base, loss=2.0 + seed / 10, wins={"reference": 0.3})
        study_run(root, "neftune", seed, noisy, loss=2.0 + seed / 10,
                  wins={f"finetune_{seed}": win, "reference": 0.4 + seed / 100})
        study_run(root, "original", seed, 20, loss=3.0)
    study_run(root, "pruning", 1, 55)
    return root


@pytest.fixture
def study(tmp_path):
    return make_study(tmp_path)


def t_interval(diffs, fmt):
    ci = st.ttest_1samp(diffs, 0).confidence_interval(0.95)
    return f"[{fmt.format(ci.low)}, {fmt.format(ci.high)}] | t"


def test_report_pairs_arms_by_seed_against_plain_finetuning(study):
    assert report.main([str(study)]) == 0
    text = (study / "report.md").read_text()
    assert "## Paired differences against `method=finetune`" in text
    assert "An interval that contains 0 is no evidence of a difference" in text
    assert ("| arm | measure | n | baseline | arm | arm − baseline | 95% interval | interval method | p (sign-flip) "
            "| p (Holm) |") in text
    # neftune's answers are 10, 15, 10 tokens longer: a t interval over 3 pairs, the exact sign-flip p of 3
    # positive differences (2 of 8 sign patterns as extreme), Holm over the two arms with answer lengths
    assert ("| method=neftune | answer length (tokens) | 3 | 60.0 | 71.7 | +11.7 | "
            f"{t_interval([10, 15, 10], '{:+.1f}')} | 0.250 | 0.500 |") in text
    assert "| method=neftune | eval loss | 3 | 2.2000 | 2.2000 | +0.0000 | [+0.0000, +0.0000] | t | 1.000 |" in text
    assert ("| method=neftune | judge win rate vs baseline | 3 | 0.500 | 0.700 | +0.200 | "
            f"{t_interval([0.1, 0.2, 0.3], '{:+.3f}')} | 0.250 |") in text
    assert "| method=neftune | judge LC win rate vs baseline | 3 | 0.500 | 0.600 | +0.100 |" in text
    assert "| method=neftune | judge win rate vs reference | 3 | 0.300 | 0.420 | +0.120 |" in text
    assert "| method=original | answer length (tokens) | 3 | 60.0 | 20.0 | -40.0 |" in text
    assert "| method=pruning | answer length (tokens) | 1 | 50.0 | 55.0 | +5.0 | — | none (one pair) | — | — |" in text
    assert "win vs method=finetune" in text and "win vs reference" in text  # the judges' columns per run
    assert "| method=neftune,seed=2 | neftune_2 | 2.2000 | 0.5000 | 75.0 | 0.700 | 0.420 | completed |" in text
    for png in ("answer_lengths.png", "win_rate_vs_length.png"):
        assert f"({png})" in text and (study / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_users_measure_is_reported_from_the_runs_own_declaration(study):
    """Runs that computed a user's measure (eval.measures) keep its declaration in summary.json: the report shows
    it as a column and a paired row in its own label and format without importing the user's code."""
    declared = {"label": "answers asking back", "direction": "minimize", "fmt": "{:.2f}", "stage": "answers",
                "column": True, "paired": True, "curve": False, "headline": False, "absent": None}
    for path in study.glob("*/summary.json"):
        method, seed = path.parent.name.split("_")
        summary = json.loads(path.read_text())
        value = 0.1 * int(seed) + (0.25 if method == "neftune" else 0.0)
        path.write_text(json.dumps({**summary, "eval/questions": value, "measures": {"eval/questions": declared}}))
    assert measures.get("eval/questions") is None  # not declared in this process
    assert report.main([str(study)]) == 0
    text = (study / "report.md").read_text()
    assert "| method=neftune,seed=2 | neftune_2 | 2.2000 | 0.5000 | 75.0 | 0.45 | 0.700 | 0.420 | completed |" in text
    assert "| run | dir | eval loss | accuracy | answer length (tokens) | answers asking back |" in text
    assert ("| method=neftune | answers asking back | 3 | 0.20 | 0.45 | +0.25 | [+0.25, +0.25] | t | 0.250 | "
            "0.500 |") in text
    assert measures.get("eval/questions") == measures.Measure("eval/questions", **declared)


def test_a_declaration_that_contradicts_a_known_measure_is_named_and_left_out(study, caplog):
    path = study / "finetune_1" / "summary.json"
    summary = json.loads(path.read_text())
    path.write_text(json.dumps({**summary, "measures": {"eval/loss": {"label": "loss", "stage": "answers"}}}))
    assert report.main([str(study)]) == 0
    assert f"{path}: its measure eval/loss is not reported (measure eval/loss is declared twice" in caplog.text
    assert measures.get("eval/loss") == measures.EVAL_LOSS


def test_an_unreliable_judge_is_shown_but_draws_no_conclusion(study):
    for seed in (1, 2, 3):
        path = study / f"neftune_{seed}" / f"judge_finetune_{seed}.json"
        data = json.loads(path.read_text())
        data["summary"]["judge/reliable"] = False
        path.write_text(json.dumps(data))
    assert report.main([str(study)]) == 0
    text = (study / "report.md").read_text()
    assert ("| method=neftune | judge win rate vs baseline | 3 | 0.500 | 0.700 | +0.200 | — | judge failed its "
            "controls: no conclusion | — | — |") in text
    assert "| method=neftune | judge win rate vs reference | 3 | 0.300 | 0.420 | +0.120 | [" in text  # another judge


def test_report_baseline_arm_can_be_chosen(study, capsys):
    assert report.main([str(study), "--baseline", "method=neftune"]) == 0
    text = (study / "report.md").read_text()
    assert "| method=finetune | answer length (tokens) | 3 | 71.7 | 60.0 | -11.7 | [-18.8, -4.5] | t | 0.250 |" in text
    assert "judge win rate vs baseline" not in text  # no finetune run was judged against a neftune run
    assert report.main([str(study), "--baseline", "method=dpo"]) == 2
    err = capsys.readouterr().err
    assert "--baseline method=dpo: no completed runs of that arm; the arms are 'method=finetune'" in err


def test_report_without_a_single_plain_arm_has_no_paired_section(sweep, tmp_path_factory):
    report.main([str(sweep)])
    assert "Paired differences" not in (sweep / "report.md").read_text()  # every arm has noise
    study = make_study(tmp_path_factory.mktemp("study"))
    study_run(study, "finetune", 4, 50)
    (study / "finetune_4" / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(["lr=1", "seed=4"]))
    report.main([str(study)])
    assert "Several arms are plain fine-tuning" in (study / "report.md").read_text()


def test_report_adds_paired_differences_to_wandb_summaries(study, monkeypatch, capsys):
    from tests.wandb_records import offline_run
    monkeypatch.setenv("WANDB_MODE", "offline")
    for run in study.glob("*/.hydra"):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["logger"] = {"kind": "wandb", "mode": "offline", "project": "test"}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
        (run.parent / "wandb-run-id").write_text(run.parent.name)
    assert report.main([str(study), "--wandb"]) == 0
    assert "paired differences added to the summaries of 7 runs" in capsys.readouterr().out  # 3 + 3 + 1 pairs
    logged = offline_run(study / "neftune_2")
    assert logged["run"].run_id == "neftune_2"
    summary = {k: json.loads(v) for k, v in logged["summary"].items()}
    assert summary["paired/answer_length_tokens"] == 15.0 and summary["paired/baseline"] == "method=finetune"
    assert summary["paired/judge_win_rate_vs_baseline"] == pytest.approx(0.2)
    assert summary["paired/answer_length_tokens_arm_mean"] == pytest.approx(35 / 3)  # the arm's, over 3 seeds
    assert summary["paired/answer_length_tokens_ci_method"] == "95% t interval, n = 3"
    assert summary["paired/answer_length_tokens_p"] == pytest.approx(0.25)
    assert summary["paired/answer_length_tokens_p_holm"] == pytest.approx(0.5)
    assert not list((study / "finetune_1").glob("wandb"))  # the baseline's own runs are not paired with themselves


def test_plots_keep_apart_what_a_sweep_varied(tmp_path):
    """An alpha x ratio grid: vs_alpha has one curve per ratio (not their average), a heat map shows both, and
    numeric labels sort by value."""
    for i, (alpha, ratio, seed) in enumerate((a, r, s) for a in (1, 5, 10) for r in (0.1, 0.3) for s in (1, 2)):
        fake_run(tmp_path, str(i), [f"noise.alpha={alpha}", f"pruning.ratio={ratio}", f"seed={seed}"], alpha, seed,
                 2.0 + alpha / 100 + ratio, pruning="l1")
        config = yaml.safe_load((tmp_path / str(i) / ".hydra" / "config.yaml").read_text())
        config["pruning"]["ratio"] = ratio
        (tmp_path / str(i) / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    runs, _, _ = find_runs(tmp_path)
    points, joined = plots.curves(runs, "noise.alpha", lambda r: True)
    assert joined and sorted(points["eval/loss"]) == ["pruning.ratio=0.1", "pruning.ratio=0.3"]
    assert points["eval/loss"]["pruning.ratio=0.3"][10] == pytest.approx([2.4, 2.4])  # two seeds, not averaged
    assert plots.swept_pair(runs) == ("noise.alpha", "pruning.ratio")
    assert report.main([str(tmp_path)]) == 0
    assert "(heatmap.png)" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(["noise.alpha=10", "noise.alpha=5", "noise.alpha=1"], key=plots.natural) == [
        "noise.alpha=1", "noise.alpha=5", "noise.alpha=10"]


def test_arms_of_several_sweeps_under_one_root_are_paired_and_told_apart(tmp_path):
    """A confirmation: each arm its own sweep (`ROOT/OPTION/N`), paired by seed; the runs named by their place."""
    for arm, noise, losses in (("none", "none", (2.0, 2.2)), ("uniform", "uniform", (1.9, 2.0))):
        for job, (seed, loss) in enumerate(zip((1, 2), losses)):
            fake_run(tmp_path, f"{arm}/{job}", ["experiment=overfit", f"seed={seed}", f"noise={noise}"], 5, seed,
                     loss, noise=noise)
    assert report.main([str(tmp_path)]) == 0
    text = (tmp_path / "report.md").read_text()
    assert "| seed=2,noise=uniform | uniform/1 | 2.0000 |" in text and "| seed=2,noise=none | none/1 | 2.2000 |" in text
    assert "| noise=uniform | eval loss | 2 | 2.1000 | 1.9500 | -0.1500 |" in text
