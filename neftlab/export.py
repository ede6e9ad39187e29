"""Answers in the field's formats: `python -m neftlab.export RUN_DIR|SWEEP_DIR --format alpaca_eval [--out DIR]`.

Published win rates come from the field's own evaluators (AlpacaEval with GPT-4 as its judge), not from a local
judge. This writes each completed run's final answers in AlpacaEval's format (`analysis.alpaca_format`);
`python -m neftlab.report ROOT --annotations DIR` then reads AlpacaEval's annotations.json files back and pairs
them by seed like neftlab's own judge.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .analysis.alpaca_format import FORMATS, export
from .core.errors import NeftlabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.export", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run or sweep directory")
    parser.add_argument("--format", required=True, choices=FORMATS, help="the evaluator's file format")
    parser.add_argument("--out", type=Path, help="where the files go (default: ROOT/alpaca_eval)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
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
