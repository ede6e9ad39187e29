"""A one-node SLURM cluster on this machine, for the tests that submit jobs (tests/run/test_slurm.py): Debian's
`slurm-wlm` (`.ci/run` installs it as root), munge, `slurmctld` and `slurmd` with a config written to a temporary
directory, one `debug` partition holding this host. No slurmdbd: `sacct` does not answer, as on a cluster that
keeps no accounting. Started once per session, shared by every SLURM test, stopped at the end."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import psutil
import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
MUNGE_RUN = Path("/run/munge")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _config(folder: Path, host: str) -> str:
    cpus, memory = os.cpu_count() or 1, psutil.virtual_memory().total // 2**20 // 2
    return "\n".join([
        "ClusterName=neftlab-test", f"SlurmctldHost={host}", "SlurmUser=root", "AuthType=auth/munge",
        f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
        f"StateSaveLocation={folder}/state", f"SlurmdSpoolDir={folder}/spool",
        f"SlurmctldPidFile={folder}/slurmctld.pid", f"SlurmdPidFile={folder}/slurmd.pid",
        f"SlurmctldLogFile={folder}/slurmctld.log", f"SlurmdLogFile={folder}/slurmd.log",
        # no cgroups in a container: processes tracked by their parentage, tasks not bound
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core_Memory", "DefMemPerCPU=1024",
        "ReturnToService=2", "MpiDefault=none", "SchedulerType=sched/backfill",
        f"NodeName={host} CPUs={cpus} RealMemory={memory} State=UNKNOWN",
        f"PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP", ""])


class Cluster:
    """The running cluster: its config (SLURM_CONF for every command and job), its daemons, and what a test
    needs of it."""

    def __init__(self, folder: Path):
        self.folder, self.host = folder, socket.gethostname().split(".")[0]
        self.conf = folder / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        self.munged: int | None = None  # the pid of a munged this cluster started

    def start(self) -> None:
        for sub in ("state", "spool"):
            (self.folder / sub).mkdir()
        self.conf.write_text(_config(self.folder, self.host))
        os.environ["SLURM_CONF"] = str(self.conf)
        self._munge()
        for daemon in ("slurmctld", "slurmd"):  # in the foreground, as this process's children
            self.daemons.append(subprocess.Popen([daemon, "-D", "-f", str(self.conf)], stdout=subprocess.DEVNULL,
                                                 stderr=subprocess.DEVNULL, start_new_session=True))
        deadline = time.monotonic() + 30
        while "idle" not in self.sinfo():
            if time.monotonic() > deadline or any(d.poll() is not None for d in self.daemons):
                raise RuntimeError(f"the node did not come up: {self.sinfo()!r}; logs in {self.folder}")
            time.sleep(0.2)

    def _munge(self) -> None:
        """munged, as the munge user, unless one answers already."""
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        MUNGE_RUN.mkdir(exist_ok=True)
        shutil.chown(MUNGE_RUN, "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True, capture_output=True)
        self.munged = int((MUNGE_RUN / "munged.pid").read_text())

    def sinfo(self) -> str:
        return subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()

    def jobs(self) -> dict[str, str]:
        """Every job the controller knows (ended ones for a few minutes), its id and state."""
        out = subprocess.run(["squeue", "-h", "--states=all", "-o", "%i %T"], capture_output=True, text=True,
                             check=True).stdout
        return dict(line.split() for line in out.splitlines() if line.strip())

    def release(self, job: str, *changes: str) -> None:
        """A requeued job waits about 2 minutes (its BeginTime) before it runs again: now, for a test, with
        `changes` (timelimit=10, say)."""
        subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now", *changes], check=True,
                       capture_output=True)

    def stop(self) -> None:
        """Every job cancelled and gone (its slurmstepd would outlive slurmd), then the daemons this cluster
        started."""
        subprocess.run(["scancel", "--full", "--user=root"], capture_output=True)
        deadline = time.monotonic() + 60
        while self.daemons and time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "--states=RUNNING,COMPLETING,PENDING,SUSPENDED"], capture_output=True,
                text=True).stdout.strip():
            time.sleep(0.5)
        for daemon in reversed(self.daemons):
            daemon.terminate()
            try:
                daemon.wait(timeout=30)
            except subprocess.TimeoutExpired:
                daemon.kill()
        if self.munged is not None:
            os.kill(self.munged, signal.SIGTERM)
        os.environ.pop("SLURM_CONF", None)


def why_not() -> str | None:
    """Why this machine cannot run the cluster, or None."""
    if os.geteuid() != 0:
        return "a SLURM cluster needs root to start slurmctld and slurmd (run the tests as root, as CI does)"
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} not found): apt-get install slurm-wlm (.ci/run does)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster():
    """The session's one-node cluster; each test that asks for it is skipped, saying why, where it cannot be had."""
    if reason := why_not():
        pytest.skip(reason)
    cluster = Cluster(Path(tempfile.mkdtemp(prefix="neftlab-slurm-")))
    try:
        cluster.start()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        cluster.stop()
        pytest.skip(f"the SLURM cluster would not start: {e}")
    try:
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.folder, ignore_errors=True)
