"""A sweep's ledger, jobs.jsonl in its directory: each job appends how it ended, the launching process when it
started and ended and which signal stopped it. Written by the jobs (`run.job`) and read by the launching process
(`sweep.launch`), whatever the launcher; each line whole (`files.append_line`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from . import rundir
from .files import append_line, jsonl_line, read_jsonl

SWEEP_ENV, LAUNCHER_PID_ENV = "NEFTLAB_SWEEP", "NEFTLAB_SWEEP_PID"  # set by RunGuard for the sweep's jobs


def append(ledger: Path, row: dict) -> None:
    """One whole line appended to a sweep's jobs.jsonl."""
    append_line(ledger, jsonl_line(row), root=ledger.parent)


def ledger_rows(ledger: Path) -> list[dict]:
    return read_jsonl(ledger, required="sweep", root=ledger.parent)


def record_job(sweep_dir: Path, number: int, out_dir: Path, status: str, run_dir: Optional[Path] = None,
               message: str = "") -> None:
    """Append how this job ended to the sweep's jobs.jsonl, one whole line."""
    append(sweep_dir / rundir.SWEEP_JOBS, {
        "sweep": os.environ.get(SWEEP_ENV, ""), "job": number, "dir": str(out_dir), "status": status,
        "run": str(run_dir or ""), "error": message[:1000], "pid": os.getpid()})


def job_statuses(sweep_dir: Path) -> dict[int, str]:
    """How each job of this process's sweep ended (or "running"), by its number."""
    sweep = os.environ.get(SWEEP_ENV, "")
    return {r["job"]: r["status"] for r in ledger_rows(sweep_dir / rundir.SWEEP_JOBS)
            if r["sweep"] == sweep and "job" in r}


def sweep_stopped(sweep_dir: Optional[Path]) -> Optional[int]:
    """The signal that stopped this job's sweep before the job started, if one did."""
    sweep = os.environ.get(SWEEP_ENV)
    if not sweep or sweep_dir is None:
        return None
    return next((r["stop"] for r in ledger_rows(sweep_dir / rundir.SWEEP_JOBS) if r["sweep"] == sweep and "stop" in r),
                None)
