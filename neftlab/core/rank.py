"""Which process this is within its job: the rank, the world size, and the job's own process (the launcher's,
under torchrun, which every rank of one job shares). Nothing here imports torch: a rank is asked of
torch.distributed only once some module has started it, so reading a run directory stays light."""

from __future__ import annotations

import os
import sys
from typing import Optional

import psutil


def _distributed():
    """torch.distributed once it has been imported and initialised, else None."""
    dist = sys.modules.get("torch.distributed")
    return dist if dist is not None and dist.is_available() and dist.is_initialized() else None


def rank() -> int:
    """This process's rank: the process group's once there is one (also when no launcher set $RANK, as under
    `torch.multiprocessing.spawn`), else the launcher's $RANK, which torchrun and accelerate set before it."""
    dist = _distributed()
    return dist.get_rank() if dist is not None else int(os.environ.get("RANK", 0))


def world() -> tuple[int, int]:
    """(rank, world size) of torch.distributed, (0, 1) without it."""
    dist = _distributed()
    return (dist.get_rank(), dist.get_world_size()) if dist is not None else (0, 1)


def launched_ranks() -> int:
    """How many ranks the launcher started for this job ($WORLD_SIZE), known before any process group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def job_pid() -> int:
    """The job's process: torchrun's for each of its ranks (they share it), else this one."""
    return os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()


def started(pid: int) -> Optional[float]:
    """When the process `pid` started (seconds since the epoch), or None when there is none."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None
