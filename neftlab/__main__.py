"""`python -m neftlab [overrides]` — the Hydra app. `--help` lists the config groups and their options."""

import logging
import sys

import hydra

from .config import moved_training_arg, register

register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _app(cfg):
    from . import runner  # imported here so --help and --cfg stay fast

    return runner.main(cfg)


def main() -> None:
    logging.raiseExceptions = False  # a full disk must not turn each log line into a traceback
    moved = moved_training_arg(sys.argv[1:])
    if moved:
        print(moved, file=sys.stderr)
        sys.exit(2)
    try:
        _app()  # a failed run, or a sweep with failed jobs, exits non-zero from within (runner)
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (startup, between sweep jobs)
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
