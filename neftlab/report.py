"""`python -m neftlab.report <a run, a sweep, or outputs/> [--out DIR] [--baseline ARM] [--wandb] [--annotations DIR]`:
the offline comparison report of every run under a directory (`analysis.comparison`)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .analysis.comparison import write_report
from .analysis.runs import ReportError
from .core.errors import NeftlabError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run, multirun or outputs/ directory")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: ROOT)")
    parser.add_argument("--baseline", metavar="ARM", help="the arm (runs' overrides less the seed, e.g. "
                        "method=finetune) the others are paired against (default: the only arm without noise or "
                        "pruning that trains, if there is exactly one)")
    parser.add_argument("--wandb", action="store_true", help="also add each run's paired differences to its W&B "
                        "run's summary (paired/<measure>), for runs that logged to W&B")
    parser.add_argument("--annotations", type=Path, metavar="DIR", help="AlpacaEval's annotations.json files under "
                        "DIR (of answers written by python -m neftlab.export), paired by seed like neftlab's judge")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    try:
        if args.annotations is not None and not args.annotations.is_dir():
            raise ReportError(f"--annotations {args.annotations}: not a directory")
        path = write_report(args.root, args.out, args.baseline, args.wandb, args.annotations)
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
