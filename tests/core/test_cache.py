"""On-disk caches are built once when several processes want them at once, and a finished one is never removed."""

import functools
import multiprocessing
import os
import time
from pathlib import Path

import pytest

from neftlab.core import cache


def slow_build(log: Path, out: Path) -> None:
    with open(log, "a") as f:
        f.write(f"{os.getpid()}\n")
    for i in range(3):  # slow enough that the other processes arrive while it builds
        time.sleep(0.3)
        (out / f"part{i}").write_text(str(i))


def build_and_read(target: Path, log: Path, start, results) -> None:
    start.wait()
    built = cache.build_once(target, functools.partial(slow_build, log))
    results.put(sorted(p.name for p in built.iterdir()))


def test_processes_starting_together_build_once_and_all_read_the_whole_cache(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    target, log, start, results = tmp_path / "cache" / "model", tmp_path / "builds", ctx.Barrier(3), ctx.Queue()
    procs = [ctx.Process(target=build_and_read, args=(target, log, start, results)) for _ in range(3)]
    for p in procs:
        p.start()
    seen = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(log.read_text().splitlines()) == 1
    assert seen == [["part0", "part1", "part2"]] * 3
    assert sorted(p.name for p in target.parent.iterdir()) == ["model", "model.lock"]


def test_a_failed_or_killed_build_leaves_no_cache_and_a_finished_one_is_kept(tmp_path):
    target = tmp_path / "model"
    (tmp_path / "model.partial").mkdir()
    (tmp_path / "model.partial" / "stale").write_text("")  # a builder killed half-way

    def fail(out):
        (out / "half").write_text("")
        raise OSError("No space left on device")
    with pytest.raises(OSError):
        cache.build_once(target, fail)
    assert not target.exists() and not (tmp_path / "model.partial").exists()
    assert cache.build_once(target, lambda out: (out / "done").write_text("")) == target
    assert [p.name for p in target.iterdir()] == ["done"]
    cache.build_once(target, lambda out: pytest.fail("rebuilt a finished cache"))


def test_an_unreadable_cache_is_moved_aside_named_and_built_again(tmp_path, caplog):
    target = tmp_path / "cache" / "thing"
    builds = []

    def build(out):
        builds.append(out)
        (out / "value").write_text("42")

    def load(path):
        return int((path / "value").read_text())
    assert cache.load_or_rebuild(target, build, load, "test cache") == 42
    (target / "value").write_text("")  # emptied, as by a disk that lost the tail of the file
    assert cache.load_or_rebuild(target, build, load, "test cache") == 42 and len(builds) == 2
    assert f"test cache {target} cannot be read (ValueError" in caplog.text
    assert len(list(target.parent.glob("thing.unreadable-*"))) == 1


def test_a_cache_that_a_full_disk_stops_says_so(tmp_path):
    import errno

    def build(out):
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise RuntimeError("DatasetGenerationError: An error occurred while generating the dataset") from e
    with pytest.raises(cache.CacheError, match="could not be built: no space left on device under"):
        cache.load_or_rebuild(tmp_path / "cache" / "thing", build, lambda path: path, "tokenized cache")
    assert not list((tmp_path / "cache").glob("*.unreadable-*"))  # nothing to move aside: it was never built
