"""Answers in the field's formats: each completed run's final answers as AlpacaEval's `model_outputs.json`
(`instruction`, `output`, `generator` = the run's arm and seed), which `alpaca_eval --model_outputs` reads, with the
prompts' reference answers beside it as `reference_outputs.json` where they have them, and `generators.json`,
which maps each generator back to its run."""

from __future__ import annotations

from pathlib import Path

from ..core import rundir
from ..core.files import write_json
from ..evaluation.llm_judge.answers import final_answers, instruction_text
from .runs import ReportError, find_runs, generator_name

FORMATS = ("alpaca_eval",)


def alpaca_eval_records(run_dir: Path, generator: str) -> tuple[list[dict], list[dict]]:
    """(the run's final answers, the prompts' reference answers) as AlpacaEval's records, in prompt order."""
    rows = final_answers(run_dir).rows
    answers = [{"instruction": instruction_text(r["prompt"]), "output": r["generation"], "generator": generator,
                "dataset": "neftlab", "prompt_id": i} for i, r in sorted(rows.items())]
    references = [{**a, "output": str(rows[a["prompt_id"]].get("reference") or ""), "generator": "reference"}
                  for a in answers]
    return answers, references if all(r["output"].strip() for r in references) else []


def export(root: Path, out: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """Write every completed run's answers under `out` (default ROOT/alpaca_eval): <out>/<generator>/
    model_outputs.json and reference_outputs.json, and <out>/generators.json. Returns out and the generators."""
    runs, _, _ = find_runs(root)
    done = [r for r in runs if r.summary.get("status") == "completed" and (r.dir / rundir.SAMPLES).is_file()]
    if not done:
        raise ReportError(f"no completed run with answers (samples.jsonl) under {root}")
    base = out or root  # the default folder is checked from ROOT down: a link named alpaca_eval is not followed
    out = out or root / "alpaca_eval"
    written = {}
    for run in done:
        generator = generator_name(run)
        if generator in written:
            raise ReportError(f"{run.dir} and {written[generator]} would both be named {generator!r} in "
                                     "AlpacaEval's files: export them separately")
        answers, references = alpaca_eval_records(run.dir, generator)
        folder = out / generator
        write_json(folder / "model_outputs.json", answers, root=base)
        if references:
            write_json(folder / "reference_outputs.json", references, root=base)
        written[generator] = run.dir
    write_json(out / "generators.json", {g: str(d.resolve()) for g, d in written.items()}, root=base)
    return out, written
