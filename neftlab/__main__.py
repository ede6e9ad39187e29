"""`python -m neftlab [overrides]`: one fine-tuning run, or a sweep of them with -m (the Hydra app). `--help` lists
the groups a user picks and their options.

A command line that names an option that does not exist, or spells a run the old way (`arm=uniform_5`, now
`noise=uniform`), stops in one line before Hydra reads it. Each job decides and claims its run's directory and runs
the pipeline there (`run.job`); the run ends with a few lines: how it ended, its headline numbers, what next.
"""

import logging
import os
import sys
from typing import Any

import hydra
from omegaconf import DictConfig

from .config import register
from .config.compose import check_command_line
from .core import measures

register()


def task(dict_cfg: DictConfig) -> Any:
    """Hydra's task function: one job of a run or a sweep. Returns the job's objective (`search.objectives`) for an
    optimizing sweeper, None when the run did not complete. Outside a sweep, and for a stop in a sweep's own
    process, it exits with the run's exit code."""
    # Imported here, not above, for speed alone: --help, --cfg and a refused command line need no torch (5 s).
    from .run.job import JobContext, run_job
    from .core.ledger import LAUNCHER_PID_ENV
    from .sweep.slurm import stopped
    ctx = JobContext.from_hydra()
    outcome = run_job(dict_cfg, ctx)
    if ctx.multirun:
        if outcome.status == "interrupted" and os.environ.get(LAUNCHER_PID_ENV) == str(os.getpid()):
            raise SystemExit(outcome.exit_code)  # a stop of the sweep's own process ends the sweep
        if outcome.status == "interrupted":
            stopped(outcome.exit_code)  # a job in SLURM leaves no result: the sweep waits for its next run
        return outcome.objective  # None for a failed job: an optimizing sweeper records a failed trial, and goes on
    if text := closing(outcome):
        print(text, file=sys.stderr)
    if outcome.exit_code:
        raise SystemExit(outcome.exit_code)
    return outcome.objective


def closing(outcome) -> str:
    """The few lines that end a run on the terminal: how it ended, its headline numbers, where it is, what next."""
    run, s = outcome.run_dir, outcome.summary
    if outcome.status in ("refused", "failed") or run is None:
        return ""  # its one line is logged already; the traceback, if any, is in the run's log
    head = []
    for m in measures.declared():  # the declared headline measures the run has
        if m.headline and measures.is_number(s.get(m.key)):
            unreliable = m == measures.WIN_RATE and not s.get(measures.RELIABLE.key)
            head.append(f"{m.label} {m.format(s[m.key])}"
                        + (" (the judge failed its controls: no evidence)" if unreliable else ""))
    lines = [f"neftlab: {outcome.status}" + (f" ({outcome.message})" if outcome.status == "interrupted" else "") +
             f": {run}"]
    if head:
        lines.append("  " + ", ".join(head))
    if outcome.status == "interrupted":
        lines.append("  next: rerun the same command to resume it")
    else:
        lines += ["  next: python -m neftlab.report " + str(run),
                  f"        python -m neftlab.judge {run} --baseline reference",
                  f"        python -m neftlab.evaluate {run} eval.max_new_tokens=512"]
    return "\n".join(lines)


# What a config may name as a `_target_` for Hydra to build: neftlab's callbacks and search spaces, Hydra's plugins
# (sweeper, launchers) and Optuna's samplers and storages, and the logging handlers of Hydra's job logging.
TARGETS = ["neftlab.*", "hydra_plugins.*", "optuna.*", "logging.*", "hydra.*"]
_app = hydra.main(config_path="../conf", config_name="config", execution_whitelist=TARGETS)(task)


def main() -> None:
    logging.raiseExceptions = False  # a full disk must not turn each log line into a traceback
    moved = check_command_line([a for a in sys.argv[1:] if not a.startswith("-")])
    if moved:
        print(f"Error: {moved}", file=sys.stderr)
        sys.exit(2)
    from hydra.core.plugins import Plugins
    from .sweep.slurm import SlurmLauncher
    Plugins.instance().register(SlurmLauncher)  # hydra/launcher=slurm: Hydra builds a launcher only from a plugin
    try:
        _app()  # a failed run, or a sweep with failed jobs, exits non-zero from within (task)
    except KeyboardInterrupt:  # Ctrl-C outside a run's own handling (startup, between sweep jobs)
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
