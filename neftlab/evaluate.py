"""`python -m neftlab.evaluate RUN_DIR [eval.KEY=VALUE ...] [--wandb]`: evaluate a finished run again, without
retraining (`run.reevaluate`): other prompts, more tokens, a judge. It logs to the run's files only; with --wandb it
also adds its numbers to the run's own W&B record (`reeval/…`)."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from omegaconf.errors import OmegaConfBaseException

from .core.errors import NeftlabError
from .run.reevaluate import evaluate_run
from .run.signals import Interrupted
from .tracking.wandb_run import update_summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory")
    parser.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.max_new_tokens=512")
    parser.add_argument("--wandb", action="store_true", help="also add the numbers to the run's own W&B record "
                        "(reeval/<key>), for a run that logged to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        metrics = evaluate_run(args.run_dir, args.overrides)
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"stopped by {signal.Signals(e.signum).name}; what it logged so far is in metrics.jsonl", file=sys.stderr)
        return 128 + e.signum
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value}")
    if args.wandb:
        added = update_summary(args.run_dir, {"reeval/" + k.split("/", 1)[-1] if "/" in k else k: v
                                              for k, v in metrics.items()})
        print("W&B: added to the run's record" if added else "W&B: the run logged no W&B record; nothing added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
