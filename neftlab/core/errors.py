"""neftlab's one error family. Every error neftlab expects (a bad config value, bad data, a model, cache or judge
that cannot be had here, a file it will not trust) is a `NeftlabError` whose message is the one line the user sees,
naming the key or file and what to do; every entry point catches exactly this. Anything else is a bug, and its
traceback goes to the run's log."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

NEARLY_FULL_BYTES = 64 * 2**20


class NeftlabError(Exception):
    """An expected failure, told in one line."""


class ConfigError(NeftlabError, ValueError):
    """A config value outside its allowed range; the message names key, value and what is allowed."""


def first_line(error: BaseException, limit: int = 200) -> str:
    """`Type: the first line of the message`, cut to `limit` characters: another library's error in one line."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0][:limit]}" if text else type(error).__name__


def disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` came from a full disk under `path`: ENOSPC reaches Python as an OSError, inside another
    library's error (a SafetensorError's message, datasets' DatasetGenerationError wrapping it) or as torch.save's
    bare RuntimeError; so the chain of causes is searched, and the disk itself is asked too."""
    seen = error
    while seen is not None:
        if (isinstance(seen, OSError) and seen.errno == errno.ENOSPC) or "No space left on device" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    try:
        return shutil.disk_usage(path).free < NEARLY_FULL_BYTES
    except OSError:
        return False
