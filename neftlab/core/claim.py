"""The claim of a run directory: `run.lock`, which names the job working in it, taken atomically.

Two jobs pointed at one directory (the same command started twice, two reruns of an interrupted run, two
containers that got the same run id) must not both work in it. `RunLock.acquire` creates run.lock with its
content in one step (`os.link` of a finished temporary file: it fails if the lock exists, on local disks and on
NFS alike), so of two jobs exactly one wins. A lock whose job is gone is stale; it is moved aside by `os.rename`,
which only one of several contenders can do, and the winner then creates its own.

A job is named by its host, the machine's boot id, its PID namespace (two containers on one kernel share the
host name and boot id, and each may be pid 1), its pid and its process's start time (a reused pid is another
process). Under torchrun every rank of one job shares the launcher's identity, so the ranks share one claim. A
job is gone when, on this machine and namespace, no process with that pid and start time is alive; from another
machine or namespace it cannot be asked, and its heartbeat decides: the holder renews the lock every
`HEARTBEAT_S`, and one not renewed for `STALE_AFTER_S` is stale. `take_over` takes a lock that still looks alive
(its node died, its container was replaced).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Optional

from .files import confined, read_json
from .rank import job_pid, rank, started
from .rundir import LOCK

log = logging.getLogger(__name__)

HEARTBEAT_S = 30  # the holder renews run.lock this often
STALE_AFTER_S = 600  # a lock from another machine or namespace not renewed for this long is stale


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _namespace() -> Optional[int]:
    """This process's PID namespace (its inode): another container on the same kernel has another one."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def owner() -> dict:
    """This job's identity, as a lock records it."""
    pid = job_pid()
    return {"host": socket.gethostname(), "boot": _boot_id(), "ns": _namespace(), "pid": pid, "started": started(pid)}


def same_job(holder: dict, other: dict) -> bool:
    a, b = holder.get("started"), other.get("started")
    return all(holder.get(k) == other.get(k) for k in ("host", "boot", "ns", "pid")) \
        and a is not None and b is not None and abs(a - b) < 1.0


def age(path: Path) -> float:
    """Seconds since the lock was last renewed."""
    try:
        return max(0.0, time.time() - path.stat().st_mtime)
    except OSError:
        return float("inf")


def alive(holder: dict, seconds: float) -> bool:
    """Whether the job named in a lock may still work in the run: asked of this machine's processes when it runs in
    this namespace (a pid reused after kill -9 or a container restart is another process), else told by its
    heartbeat."""
    me = owner()
    here = (holder.get("host"), holder.get("boot", me["boot"]), holder.get("ns", me["ns"]))  # older locks lack some
    if here == (me["host"], me["boot"], me["ns"]):
        start = started(int(holder.get("pid") or -1))
        return start is not None and (holder.get("started") is None or abs(start - holder["started"]) < 1.0)
    return seconds < STALE_AFTER_S


def describe(holder: dict, seconds: float) -> str:
    return f"pid {holder.get('pid')} on {holder.get('host')} (its lock renewed {seconds:.0f} s ago)"


class RunLock:
    """`run.lock` in a run directory: claimed by the job working in it, renewed every HEARTBEAT_S by a thread,
    removed when it ends."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.held = False
        self._beat: Optional[threading.Event] = None

    @property
    def path(self) -> Path:
        return self.run_dir / LOCK

    def _create(self, me: dict) -> bool:
        """run.lock created whole, or False when one exists."""
        confined(self.path, self.run_dir)
        tmp = self.run_dir / f".{LOCK}.{uuid.uuid4().hex}"
        tmp.write_text(json.dumps(me))
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def acquire(self, take_over: bool = False, purpose: str = "run") -> Optional[tuple[dict, float]]:
        """Claim the run; None on success, else the holder that may still be alive and its lock's age. `purpose`
        (run, resume, evaluate) is recorded for whoever finds the lock held."""
        me = {**owner(), "purpose": purpose}
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create(me):
                break
            holder, seconds = read_json(self.path, root=self.run_dir), age(self.path)
            if isinstance(holder, dict) and same_job(holder, me):
                break  # this job's own claim: another rank of it made the lock
            if holder is None and seconds < 5:
                time.sleep(0.2)  # a link is whole when it appears, so this one is being moved aside: look again
                continue
            if isinstance(holder, dict) and alive(holder, seconds):
                if not take_over:
                    return holder, seconds
                log.warning("Taking %s over from %s (trainer.take_over=true)", self.run_dir, describe(holder, seconds))
            aside = self.run_dir / f".{LOCK}.stale-{uuid.uuid4().hex}"
            try:  # only one contender can move this lock aside; the others find it gone, and look again
                os.rename(self.path, aside)
                aside.unlink()
            except FileNotFoundError:
                pass
        else:
            holder = read_json(self.path, root=self.run_dir) or {}
            return holder, age(self.path)
        self.held = True
        if rank() == 0:
            self._beat = threading.Event()
            threading.Thread(target=self._heartbeat, args=(self._beat,), daemon=True, name=LOCK).start()
        return None

    def _heartbeat(self, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path, follow_symlinks=False)
            except OSError:
                return

    def release(self) -> None:
        if self._beat is not None:
            self._beat.set()
            self._beat = None
        if self.held and rank() == 0:
            holder = read_json(self.path, root=self.run_dir)
            if isinstance(holder, dict) and same_job(holder, owner()):  # not a lock taken over from us meanwhile
                self.path.unlink(missing_ok=True)
        self.held = False
