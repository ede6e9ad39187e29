"""What a job returns to an optimizing sweeper, and the Pareto front of a multi-objective search.

`python -m neftlab -m hydra/sweeper=optuna experiment=neftune_search` runs Optuna trials as jobs; each job's
return value is its objective, read from its summary.json by the keys of `search.objectives`. `quality` is the
judge's win rate when a judge is configured (`eval.judge.model`), else the held-out loss. The sweeper's
directions come from the same keys (`hydra.sweeper.direction: ${search_directions:}`), so the two never
disagree. A failed job, or one without the metric, returns None: Optuna records the trial as failed, not as a
value, and the search goes on (`max_failure_rate: 1.0`).
"""

from __future__ import annotations

import contextlib
import math
import sqlite3
from pathlib import Path
from typing import Any

# The metrics a search can optimize, and which way is better.
DIRECTIONS = {
    "eval/loss": "minimize", "eval/perplexity": "minimize", "eval/accuracy": "maximize",
    "eval/train_loss_noise_off": "minimize", "eval/diversity": "maximize", "eval/response_words": "maximize",
    "judge/win_rate": "maximize", "judge/lc_win_rate": "maximize",
    "pruning/sparsity": "maximize", "efficiency/param_reduction": "maximize",
}
QUALITY = "quality"


def objective_keys(objectives: list[str], judged: bool) -> list[str]:
    """The summary keys of `search.objectives`, with `quality` resolved."""
    quality = "judge/win_rate" if judged else "eval/loss"
    return [quality if o == QUALITY else o for o in objectives]


def directions_of(keys: list[str]) -> list[str]:
    return [DIRECTIONS.get(k, "minimize") for k in keys]  # an unknown key fails validation, before any trial


def directions(*, _root_: Any) -> list[str]:
    """`${search_directions:}`: the sweeper's directions, one per objective of the composed config."""
    return directions_of(objective_keys(list(_root_.search.objectives), _root_.eval.judge.model is not None))


def values(summary: dict, keys: list[str]) -> list[float] | None:
    """The run's value of each objective; None when it did not complete or lacks a finite value."""
    if summary.get("status") != "completed":
        return None
    found = [summary.get(k) for k in keys]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in found):
        return None
    return [float(v) for v in found]


def objective(summary: dict, keys: list[str]) -> float | list[float] | None:
    """The job's return value: one float, a list for several objectives, None (Optuna then fails the trial)."""
    found = values(summary, keys)
    return found[0] if found is not None and len(found) == 1 else found


def pareto_front(points: list[list[float]], directions: list[str]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [[s * v for s, v in zip(signs, p)] for p in points]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, p) for other in scored) for p in scored]


def check_study_file(path: Path) -> None:
    """A study's SQLite file, if there is one, must be readable before the search starts: a damaged one would
    otherwise end the search in a traceback from deep inside Optuna."""
    from .config import ConfigError
    if not path.exists():
        return
    try:
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
            result = db.execute("PRAGMA quick_check").fetchone()[0]
    except sqlite3.DatabaseError as e:
        result = str(e)
    if result != "ok":
        raise ConfigError(f"the study database {path} is damaged ({result}): move it aside to start a new study "
                          "there, or point hydra.sweeper.storage elsewhere")
