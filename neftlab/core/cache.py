"""On-disk caches built once, safely when several processes (parallel sweeps, torchrun ranks, nodes sharing a
filesystem) want the same one at the same time."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import shutil
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from filelock import FileLock

from .errors import NeftlabError, disk_full

log = logging.getLogger(__name__)
T = TypeVar("T")


class CacheError(NeftlabError):
    """A cache that cannot be built or read; the message names it and the cause."""


def cache_root() -> Path:
    """Where converted models and tokenized datasets live: $NEFTLAB_CACHE, else ~/.cache/neftlab."""
    return Path(os.environ.get("NEFTLAB_CACHE", Path.home() / ".cache" / "neftlab"))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, hashed once per process for a given path, size and mtime (the data file is
    hashed for the run's fingerprint and again for the tokenized cache's key)."""
    stat = Path(path).stat()
    return _sha256(str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


@contextlib.contextmanager
def locked(target: Path) -> Iterator[None]:
    """An exclusive lock on `<target>.lock` (filelock's flock): one process at a time builds or extends `target`;
    released when the block ends, also when the process dies. Across nodes this needs a filesystem that honours
    flock (NFSv4; Lustre mounted with -o flock)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.with_name(target.name + ".lock"))):
        yield


def build_once(target: Path, build: Callable[[Path], None]) -> Path:
    """`target`, made by `build(directory)` unless some process has finished it already.

    The lock (`locked`) lets one process build while the others wait and then find the finished target. `build`
    writes into a sibling directory that is renamed into place when complete, so a target that exists is complete;
    it is never removed or replaced, since another process may be reading it.
    """
    if target.exists():
        return target
    with locked(target):
        if target.exists():  # built by the process that held the lock before us
            return target
        partial = target.with_name(target.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # left by a builder that was killed: none runs while we hold the lock
        partial.mkdir()
        try:
            build(partial)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        partial.rename(target)
    return target


def load_or_rebuild(target: Path, build: Callable[[Path], None], load: Callable[[Path], T], what: str) -> T:
    """`load(target)`, building the target first when it is absent. A target that exists but cannot be loaded (a
    truncated file, a half-copied cache) is moved aside, named, and built again once; a build that fails on a full
    disk says so. `load` raises whatever the damaged files make its library raise."""
    for attempt in (1, 2):
        try:
            path = build_once(target, build)
        except Exception as e:  # noqa: BLE001 - mapped to one line when the disk is full, else re-raised
            if disk_full(e, target.parent):
                raise CacheError(f"{what} {target} could not be built: no space left on device under "
                                 f"{target.parent}; free some, or set NEFTLAB_CACHE to another disk") from None
            raise
        try:
            return load(path)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file raises
            problem = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if attempt == 2:
            raise CacheError(f"{what} {target} cannot be read even after a rebuild ({problem})")
        # Set aside, not deleted: another job may be reading it. The rebuild goes where it was.
        aside = target.with_name(f"{target.name}.unreadable-{os.getpid()}")
        log.warning("%s %s cannot be read (%s): moved to %s and built again", what, target, problem, aside.name)
        try:
            target.rename(aside)
        except FileNotFoundError:  # another job moved it first
            pass
    raise AssertionError("unreachable")
