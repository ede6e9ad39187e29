"""Answers in the field's formats: `python -m neftlab.export RUN_DIR|SWEEP_DIR --format alpaca_eval [--out DIR]`.

Published win rates come from the field's own evaluators (AlpacaEval with GPT-4 as its judge), not from a local
judge. This writes each completed run's final answers as AlpacaEval's `model_outputs.json` (`instruction`,
`output`, `generator` = the run's arm and seed), which `alpaca_eval --model_outputs` reads, with the prompts'
reference answers beside it as `reference_outputs.json` where they have them, and `generators.json`, which maps
each generator back to its run. `python -m neftlab.report ROOT --annotations DIR` then reads AlpacaEval's
annotations.json files back and pairs them by seed like neftlab's own judge.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from . import report, rundir
from .errors import NeftlabError
from .judge import final_answers, instruction_text

FORMATS = ("alpaca_eval",)


def alpaca_eval_records(run_dir: Path, generator: str) -> tuple[list[dict], list[dict]]:
    """(the run's final answers, the prompts' reference answers) as AlpacaEval's records, in prompt order."""
    _, rows = final_answers(run_dir)
    answers = [{"instruction": instruction_text(r["prompt"]), "output": r["generation"], "generator": generator,
                "dataset": "neftlab", "prompt_id": i} for i, r in sorted(rows.items())]
    references = [{**a, "output": str(rows[a["prompt_id"]].get("reference") or ""), "generator": "reference"}
                  for a in answers]
    return answers, references if all(r["output"].strip() for r in references) else []


def export(root: Path, out: Path | None = None) -> tuple[Path, dict[str, Path]]:
    """Write every completed run's answers under `out` (default ROOT/alpaca_eval): <out>/<generator>/
    model_outputs.json and reference_outputs.json, and <out>/generators.json. Returns out and the generators."""
    runs, _, _ = report.find_runs(root)
    done = [r for r in runs if r.summary.get("status") == "completed" and (r.dir / rundir.SAMPLES).is_file()]
    if not done:
        raise report.ReportError(f"no completed run with answers (samples.jsonl) under {root}")
    out = out or root / "alpaca_eval"
    written = {}
    for run in done:
        generator = report.generator_name(run)
        if generator in written:
            raise report.ReportError(f"{run.dir} and {written[generator]} would both be named {generator!r} in "
                                     "AlpacaEval's files: export them separately")
        answers, references = alpaca_eval_records(run.dir, generator)
        folder = out / generator
        folder.mkdir(parents=True, exist_ok=True)
        rundir.write_json(folder / "model_outputs.json", answers)
        if references:
            rundir.write_json(folder / "reference_outputs.json", references)
        written[generator] = run.dir
    rundir.write_json(out / "generators.json", {g: str(d.resolve()) for g, d in written.items()})
    return out, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.export", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run or sweep directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the evaluator's file format")
    parser.add_argument("--out", type=Path, help="where the files go (default: ROOT/alpaca_eval)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    try:
        out, written = export(args.root, args.out)
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    example = next(iter(written))
    print(f"wrote the answers of {len(written)} run(s) under {out}; evaluate one with AlpacaEval (it calls its judge's "
          f"API), against the prompts' references or another run's answers, e.g.:\n"
          f"  alpaca_eval --model_outputs {out / example / 'model_outputs.json'} --reference_outputs "
          f"{out / example / 'reference_outputs.json'} --output_path {out / example}\n"
          f"then pair its annotations by seed: python -m neftlab.report {args.root} --annotations {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
