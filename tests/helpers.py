"""What the tests share: the repository's paths, the tiny sizes, and three ways to run neftlab: in this process
(`run`, the default), as the command line in a subprocess (`cli`, where the process boundary is the subject:
signals, launchers, exit codes), and as torchrun's ranks (`spawn`)."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir

from neftlab.config import compose as compose_cfg  # noqa: F401 - the config `python -m neftlab` runs with
from neftlab.config import register
from neftlab.config.compose import CONF as CONF_DIR
from neftlab.run.job import JobContext, Outcome, run_job

__all__ = ["CONF", "ROOT", "TINY", "Ran", "cli", "compose_cfg", "run", "spawn", "subprocess_run", "sweep"]
ROOT = Path(__file__).resolve().parents[1]
CONF = str(CONF_DIR)
# Small enough for seconds per run on 2 cores.
TINY = ["data.max_samples=48", "data.eval_size=8", "data.max_length=64", "trainer.max_steps=2",
        "trainer.per_device_train_batch_size=2", "eval.num_generations=2", "eval.max_new_tokens=8"]


def run(*overrides: str, out_dir: Path, root: Optional[Path] = None, sweep_dir: Optional[Path] = None,
        number: int = 0) -> tuple[Outcome, dict]:
    """One job of `python -m neftlab *overrides` in this process, its output directory `out_dir` and its output
    root `root` (default: out_dir, so that auto-resume looks nowhere else); returns its outcome and its
    summary.json (or {})."""
    register()
    overrides = [*overrides, f"output_root={root or out_dir}"]
    with initialize_config_dir(config_dir=CONF):
        cfg = hydra_compose(config_name="config", overrides=overrides)
    outcome = run_job(cfg, JobContext(Path(out_dir), overrides, sweep_dir=sweep_dir, number=number))
    summary = Path(out_dir) / "summary.json"
    return outcome, json.loads(summary.read_text()) if summary.exists() else {}


def cli(*overrides: str, out_dir: Path, env: dict | None = None, timeout: int = 600):
    """Run `python -m neftlab` in a subprocess; returns (CompletedProcess, summary dict or None)."""
    flags = [o for o in overrides if o.startswith("-")]  # Hydra's argparse wants flags before overrides
    overrides = [o for o in overrides if not o.startswith("-")]
    proc = subprocess.run([sys.executable, "-m", "neftlab", *flags, f"hydra.run.dir={out_dir}",
                           f"output_root={out_dir}", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    summary = out_dir / "summary.json"
    return proc, json.loads(summary.read_text()) if summary.exists() else None


def spawn(fn, *args, nprocs: int = 2, timeout: float = 240):
    """`mp.spawn(fn, args=(nprocs, *args))`, bounded: a rank that dies or hangs fails the test within `timeout`
    instead of leaving the others waiting in a collective (gloo waits 30 minutes by default)."""
    import torch.multiprocessing as mp
    ctx = mp.start_processes(fn, args=(nprocs, *args), nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: ranks still running after {timeout:.0f} s")
    finally:
        for proc in ctx.processes:
            if proc.is_alive():
                proc.kill()


def sweep(*overrides: str, grid: dict[str, list], out_dir: Path) -> list[tuple[Outcome, dict]]:
    """The jobs a basic sweep makes of `grid` (every combination, in Hydra's order), each run in this process into
    out_dir/<job number>, as `python -m neftlab -m` would lay them out."""
    import itertools
    points = list(itertools.product(*grid.values()))
    return [run(*overrides, *(f"{k}={v}" for k, v in zip(grid, point)), out_dir=Path(out_dir) / str(n),
                root=out_dir, sweep_dir=Path(out_dir), number=n) for n, point in enumerate(points)]


class Ran:
    """A job run in this process, read as a finished command line: its exit code, and its log lines with its one
    closing line as `stderr`."""

    def __init__(self, outcome: Outcome, log: str):
        self.outcome, self.returncode = outcome, outcome.exit_code
        self.stderr = log + ("\n" + outcome.message if outcome.message else "")


def subprocess_run(*overrides: str, out_dir: Path, root: Optional[Path] = None) -> Ran:
    """`run`, with every log line of neftlab's at INFO and above captured, as the command line's terminal shows."""
    import io
    import logging
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("neftlab")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    try:
        outcome, _ = run(*overrides, out_dir=out_dir, root=root)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return Ran(outcome, stream.getvalue())
