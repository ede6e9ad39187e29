"""Run files that other processes read: written atomically, read tolerantly.

A crash, kill -9 or full disk can stop a write at any byte. Whole files (summary.json, checkpoint
state, report.md) are therefore written to a temporary file beside the target and renamed over it,
so a reader sees the old file or the new one, never half of one. metrics.jsonl is appended a whole
line per write; its readers skip a torn last line and say so. Every reader names the file it could
not use instead of failing on it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Optional

log = logging.getLogger(__name__)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it into place (same filesystem)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Optional[Any]:
    """The file's JSON, or None (with a warning naming it) when it is empty, cut off or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s): ignored", path, type(e).__name__ if isinstance(e, OSError) else e)
        return None


def read_jsonl(path: Path) -> list[dict]:
    """The events of a metrics.jsonl; a torn last line (a crash or a full disk mid-write) is skipped and
    reported, a corrupt line elsewhere is skipped and reported with its number."""
    events = []
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return events
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            event = None
        if isinstance(event, dict) and "step" in event:
            events.append(event)
        else:
            where = "its last line, cut off" if number == len(lines) else f"line {number}, not a JSON event"
            log.warning("%s: skipped %s", path, where)
    return events


def last_step_samples(path: Path) -> tuple[Optional[int], dict[int, dict]]:
    """samples.jsonl is appended at every generation: (its last step, that step's rows by prompt id)."""
    rows = [r for r in read_jsonl(path) if isinstance(r.get("prompt_id"), int) and isinstance(r.get("step"), int)]
    step = max((r["step"] for r in rows), default=None)
    return step, {r["prompt_id"]: r for r in rows if r["step"] == step}
