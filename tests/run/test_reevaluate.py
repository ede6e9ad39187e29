"""`python -m neftlab.evaluate`: a finished run evaluated again from its saved weights, its training files untouched."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from neftlab import evaluate
from neftlab.core.files import read_jsonl
from neftlab.evaluation import generation
from neftlab.evaluation.llm_judge.answers import final_answers
from neftlab.run import reevaluate
from neftlab.run.reevaluate import evaluate_run, load_config
from tests.helpers import ROOT, TINY, run


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finished") / "run"
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=wandb", "logger.mode=offline", out_dir=folder)
    assert (folder / "model").is_dir()  # kept by default
    assert summary["status"] == "completed", outcome.message
    return folder


def test_reevaluation_appends_events_and_leaves_the_training_files(finished, capsys):
    training_files = {p: p.read_bytes() for p in [finished / "summary.json", *(finished / "model").iterdir()]}
    events = read_jsonl(finished / "metrics.jsonl")
    samples = (finished / "samples.jsonl").read_text().splitlines()
    assert evaluate.main([str(finished), "eval.max_new_tokens=3", "eval.num_generations=1"]) == 0
    assert {p: p.read_bytes() for p in training_files} == training_files
    after = read_jsonl(finished / "metrics.jsonl")
    assert after[: len(events)] == events
    assert len({e["stage"] for e in after[len(events):]}) == 1  # its own stage: told apart from any other
    assert after[-1]["stage"].startswith("reeval-") and events[-1]["stage"] == "final"
    new = {k: v for e in after[len(events):] for k, v in e.items()}
    summary = json.loads((finished / "summary.json").read_text())
    assert new["step"] == 2 and new["eval/loss"] == pytest.approx(summary["eval/loss"], rel=1e-6)  # the same weights
    assert (finished / "samples.jsonl").read_text().splitlines()[: len(samples)] == samples
    assert f"eval/loss: {new['eval/loss']}" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["noise.alpha=3"], "noise.alpha=3: only eval.* keys can change on re-evaluation"),
    (["eval.max_new_tokens=0"], "eval.max_new_tokens=0 is not allowed"),
])
def test_reevaluation_refuses_other_keys_and_bad_values(finished, capsys, args, message):
    assert evaluate.main([str(finished), *args]) == 2
    assert message in capsys.readouterr().err


MINIMAL = ("model: {arch: llama, name_or_path: x}\ndata: {format: alpaca, path: data.jsonl}\nnoise: {}\npruning: {}\n"
           "trainer: {}\nlogger: {}\n")


def test_a_run_without_saved_weights_is_named(tmp_path, capsys):
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(MINIMAL)
    assert evaluate.main([str(tmp_path)]) == 2
    assert "no trained model to evaluate" in capsys.readouterr().err


def test_a_relative_data_path_is_the_file_the_run_read(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(MINIMAL)
    read = tmp_path / "started_here" / "data.jsonl"
    (run / "fingerprint.json").write_text(json.dumps({"data": {"path": str(read), "size": 1, "sha256": "x"}}))
    monkeypatch.chdir(tmp_path)  # another directory than the run's
    assert load_config(run, []).data.path == str(read)


@pytest.mark.slow
def test_a_default_run_is_evaluated_again_from_the_command_line_without_wandb(finished, tmp_path):
    """The README's own example on a default run: no W&B run is started (no key configured here), no stray
    ./wandb in the working folder, and a tied output layer loads without a missing-keys warning."""
    offline_runs = sorted(finished.glob("wandb/offline-run-*"))
    from neftlab.core import cache
    env = {**os.environ, "HOME": str(tmp_path), "NETRC": str(tmp_path / "none"),
           "NEFTLAB_CACHE": str(cache.cache_root())}  # no W&B settings, the converted tokenizer still cached
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-m", "neftlab.evaluate", str(finished), "eval.max_new_tokens=3"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env={**env, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "missing keys" not in proc.stderr
    assert "eval/loss:" in proc.stdout
    assert sorted(finished.glob("wandb/offline-run-*")) == offline_runs and not (tmp_path / "wandb").exists()


class Killed(BaseException):
    """kill -9 in this process: nothing catches it, nothing after it runs."""


def test_a_reevaluation_killed_after_its_answers_and_measures_is_not_judged(finished, tmp_path, monkeypatch, caplog):
    """Issue 39's case: `neftlab.evaluate RUN eval.max_new_tokens=2` killed after it wrote its answers and their
    measures (here in its latency stage): the judge reads the final answers and names the unfinished stage."""
    run_dir = shutil.copytree(finished, tmp_path / "run")
    before = len(read_jsonl(run_dir / "metrics.jsonl"))  # the training's, and any earlier re-evaluation's

    def killed(*args, **kwargs):
        raise Killed
    monkeypatch.setattr(generation, "decoding_latency", killed)
    monkeypatch.setattr(reevaluate, "run_id", lambda: "killed")  # this process's run id is an earlier test's too
    with pytest.raises(Killed):
        evaluate_run(run_dir, ["eval.max_new_tokens=2"])
    events = read_jsonl(run_dir / "metrics.jsonl")[before:]
    assert {e["stage"] for e in events} == {"reeval-killed"}
    assert [e["answers_finished"] for e in events if "answers_finished" in e] == [False]
    assert any("eval/response_length" in e for e in events)  # its measures were logged
    last_finished = final_answers(finished)  # what the judge read before this re-evaluation
    found = final_answers(run_dir)
    assert (found.step, found.stage) == (last_finished.step, last_finished.stage) != (2, "reeval-killed")
    assert "the answers of step 2 (stage reeval-killed) are incomplete: their stage never finished" in caplog.text
