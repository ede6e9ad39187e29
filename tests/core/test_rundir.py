"""The run directory's files: stages that tell evaluations apart, JSONL split on "\n" only, duplicates counted,
what a resume keeps."""

import json

from neftlab.core import rundir
from neftlab.core.files import read_jsonl


def test_events_carry_their_stage_and_survive_non_finite_values(tmp_path):
    files = rundir.RunFiles(tmp_path)
    files.log(3, {"train/loss": float("nan")})
    files.stage = rundir.FINAL
    files.log(3, {"eval/loss": 1.5})
    summary = files.finish("failed", "boom")
    lines = (tmp_path / rundir.METRICS).read_text().splitlines()
    assert [json.loads(line) for line in lines] == [{"step": 3, "stage": "train", "train/loss": "nan"},
                                                  {"step": 3, "stage": "final", "eval/loss": 1.5}]
    assert summary["status"] == "failed" and json.loads((tmp_path / rundir.SUMMARY).read_text())["error"] == "boom"
    assert "stage" not in summary


def test_line_separators_inside_strings_do_not_split_rows(tmp_path, caplog):
    """U+2028, U+2029 and U+0085 are valid inside a JSON string, and common in scraped text."""
    files = rundir.RunFiles(tmp_path)
    texts = ["one\u2028two", "three\u0085four", "five\u2029six"]
    files.append_samples({"prompt_id": i, "step": 2, "generation": t} for i, t in enumerate(texts))
    step, rows = rundir.last_generation(tmp_path / rundir.SAMPLES)
    assert step == 2 and [rows[i]["generation"] for i in range(3)] == texts and not caplog.records


def test_the_last_generation_is_the_last_step_and_stage_and_duplicates_are_named(tmp_path, caplog):
    files = rundir.RunFiles(tmp_path)
    files.stage = rundir.FINAL
    files.append_samples([{"prompt_id": 0, "step": 8, "generation": "a"}, {"prompt_id": 1, "step": 8, "generation": "b"}])
    files.stage = "reeval-1"  # a re-evaluation of one prompt at the same step: not merged with the final answers
    files.append_samples([{"prompt_id": 0, "step": 8, "generation": "new"}, {"prompt_id": 0, "step": 8, "generation": "again"}])
    step, rows = rundir.last_generation(tmp_path / rundir.SAMPLES)
    assert step == 8 and list(rows) == [0] and rows[0]["generation"] == "again"
    assert "1 prompt id(s) occur more than once in its generation at step 8 (stage reeval-1)" in caplog.text


def test_a_resume_keeps_what_its_checkpoint_accounts_for_in_both_files(tmp_path):
    files = rundir.RunFiles(tmp_path)
    for step in (1, 2, 3):
        files.log(step, {"train/loss": 1.0 / step})
        files.append_samples([{"prompt_id": 0, "step": step, "generation": str(step)}])
    files.stage = rundir.FINAL
    files.log(3, {"eval/loss": 0.5})
    files.close()
    again = rundir.RunFiles(tmp_path, keep=lambda row: row["step"] <= 2 and row.get("stage") == rundir.TRAIN)
    # each step's answers marked, in metrics.jsonl, as written by a stage that had not finished yet; no marker is
    # a metric of the summary
    assert [(e["step"], e.get("answers_finished")) for e in read_jsonl(tmp_path / rundir.METRICS)] == [
        (1, None), (1, False), (2, None), (2, False)]
    assert [r["step"] for r in read_jsonl(tmp_path / rundir.SAMPLES)] == [1, 2]  # no step-3 rows twice
    assert again.summary == {"train/loss": 0.5} and again.train_losses == [(1, 1.0), (2, 0.5)]


def test_a_torn_last_line_is_skipped_and_named(tmp_path, caplog):
    (tmp_path / rundir.METRICS).write_text('{"step": 1, "a": 1}\n{"step": 2, "a"')
    assert read_jsonl(tmp_path / rundir.METRICS) == [{"step": 1, "a": 1}]
    assert "skipped its last line, cut off" in caplog.text


def test_the_best_evaluation_during_training_is_in_the_summary_resumed_or_not(tmp_path):
    """A search's objective in the overfitting regime (search.objectives=[eval/best_loss]): the lowest held-out loss
    of the evaluations during training, merged per step with its epoch; the final evaluation is not one of them."""
    files = rundir.RunFiles(tmp_path)
    for step, epoch, loss in ((6, 1.0, 1.79), (12, 2.0, 1.77), (18, 3.0, 1.88)):
        files.log(step, {"train/loss": 1.0, "train/epoch": epoch})
        files.log(step, {"eval/loss": loss})
        if step == 12:  # killed here, resumed with both evaluations kept
            files.close()
            files = rundir.RunFiles(tmp_path, keep=lambda row: True)
    files.stage = rundir.FINAL
    files.log(18, {"eval/loss": 1.5})
    summary = files.finish("completed")
    assert (summary["eval/best_loss"], summary["eval/best_epoch"]) == (1.77, 2.0)
    assert json.loads((tmp_path / rundir.SUMMARY).read_text())["eval/best_loss"] == 1.77
    once = rundir.RunFiles(tmp_path / "once")
    once.log(6, {"eval/loss": 1.0})
    assert "eval/best_loss" not in once.finish("completed")  # one evaluation: no best to speak of
