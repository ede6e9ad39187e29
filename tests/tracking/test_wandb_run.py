"""W&B: one run per sweep job, shared group, distinct names, full config, failures marked."""

import json

import pytest

from neftlab.tracking.recorder import namespaced
from neftlab.core.measures import Measure, register
from neftlab.tracking.wandb_run import best_values, summaries, wandb_mode
from tests.helpers import TINY, cli, run
from tests.wandb_records import offline_run


def test_trainer_keys_are_namespaced_like_the_wandb_callback():
    assert namespaced({"loss": 2.0, "eval_loss": 0.0, "train_loss": 1.5, "epoch": 1}) == {
        "train/loss": 2.0, "eval/loss": 0.0, "train/train_loss": 1.5, "train/epoch": 1, "eval/perplexity": 1.0}


def test_every_measure_with_a_direction_shows_its_best_a_users_too(tmp_path):
    register(Measure("eval/questions", "answers asking back", "minimize", "{:.2f}"))
    best = summaries()
    assert {k: best[k] for k in ("train/loss", "eval/loss", "eval/accuracy", "eval/questions", "judge/win_rate",
                                 "judge_vs_baseline/win_rate", "judge_vs_baseline/lc_win_rate")} == {
        "train/loss": "min", "eval/loss": "min", "eval/accuracy": "max", "eval/questions": "min",
        "judge/win_rate": "max", "judge_vs_baseline/win_rate": "max", "judge_vs_baseline/lc_win_rate": "max"}
    assert "eval/response_length" not in best  # a diagnostic has no best
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in (
        {"step": 1, "eval/questions": 0.5, "eval/response_length": 3.0}, {"step": 2, "eval/questions": 0.25},
        {"step": 3, "eval/questions": 0.75})))
    assert best_values(tmp_path) == {"eval/questions": {"min": 0.25}}


@pytest.mark.parametrize("env, mode, expected", [
    ({"WANDB_MODE": "disabled"}, "auto", "disabled"),
    ({"WANDB_API_KEY": "x"}, "auto", "online"),
    ({}, "auto", "offline"),
    ({"WANDB_MODE": "online"}, "offline", "offline"),
])
def test_auto_mode(monkeypatch, tmp_path, env, mode, expected):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    for key in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert wandb_mode(mode) == expected


@pytest.mark.slow
def test_sweep_makes_one_offline_wandb_run_per_job_in_one_group(tmp_path):
    proc, _ = cli("-m", "model=llama_tiny", "logger=wandb", "logger.mode=offline", "noise=none,uniform",
                  "seed=1,2", *TINY, f"hydra.sweep.dir={tmp_path}/sweep", out_dir=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = [offline_run(tmp_path / "sweep" / str(i)) for i in range(4)]
    assert {r["run"].run_group for r in runs} == {"sweep"}
    names = [r["run"].display_name for r in runs]
    assert len(set(names)) == 4 and "noise=uniform,seed=2" in names[3]
    assert all(r["exit_code"] == 0 and r["run"].job_type == "train" for r in runs)
    assert "noise:uniform" in runs[3]["run"].tags and "model:llama_tiny" in runs[3]["run"].tags
    config = {i.key: json.loads(i.value_json) for i in runs[3]["run"].config.update}
    assert config["noise"]["kind"] == "uniform" and config["seed"] == 2 and config["trainer"]["max_steps"] == 2
    assert set(config) <= {"seed", "output_root", "model", "data", "noise", "pruning", "trainer", "logger", "eval",
                           "search", "_wandb"}  # neftlab's config only: not the Trainer's options beside it
    keys = set().union(*runs[3]["history"])
    assert {"train/loss", "eval/loss", "eval/perplexity", "noise/alpha", "train/global_step"} <= keys
    assert "answers/final/_type" in keys  # the answers as a W&B Table, to compare runs answer by answer
    assert json.loads(runs[3]["summary"]["status"]) == "completed"


def test_failed_job_marks_its_wandb_run_failed(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": 7}\n')  # fails once the run has started
    outcome, summary = run("model=llama_tiny", "logger=wandb", "logger.mode=offline", "data=alpaca",
                           f"data.path={tmp_path}/bad.jsonl", *TINY, out_dir=tmp_path / "run")
    assert outcome.exit_code == 1 and summary["status"] == "failed"
    record = offline_run(tmp_path / "run")
    assert record["exit_code"] == 1 and json.loads(record["summary"]["status"]) == "failed"


def test_a_resumed_runs_summary_holds_the_best_value_of_the_whole_run(tmp_path):
    """W&B's own min/max summaries see only what the resumed process logged (wandb/wandb#9684): here the lowest
    training loss is step 1's, logged before the interruption, and the rising loss after it must not replace it."""
    from tests.run.crashes import crashed
    overrides = ["model=llama_tiny", *TINY, "trainer.max_steps=6", "trainer.save_steps=2",
                 "trainer.save_total_limit=null", "trainer.learning_rate=0.3", "logger=wandb", "logger.mode=offline"]
    outcome, reference = run(*overrides, out_dir=tmp_path / "reference")
    assert reference["status"] == "completed", outcome.message
    interrupted = crashed(tmp_path / "reference", tmp_path, at=2)
    outcome, _ = run(*overrides, out_dir=tmp_path / "runs" / "new", root=tmp_path)
    assert json.loads((interrupted / "summary.json").read_text())["status"] == "completed", outcome.message
    losses = {e["step"]: e["train/loss"] for e in map(json.loads, (interrupted / "metrics.jsonl").open())
              if "train/loss" in e}
    resumed = offline_run(interrupted, session=-1)
    after = [row["train/loss"] for row in resumed["history"] if "train/loss" in row]
    assert len(after) == 4 and min(map(float, after)) > min(losses.values())  # the best came before the resume
    assert json.loads(resumed["summary"]["train/loss"]) == {"min": pytest.approx(min(losses.values()))}
