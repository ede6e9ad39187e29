"""The `search` schema: what a job returns to an optimizing sweeper, and which way is better.

A job's return value is its objective, read from its summary.json by the keys of `search.objectives`. `quality` is
the judge's win rate when a judge is configured (`eval.judge.model`), else the held-out loss. The sweeper's
directions come from the same keys (`hydra.sweeper.direction: ${search_directions:}`), so the two never disagree.
A failed job, or one without the metric, returns None: Optuna records the trial as failed, not as a value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, List

from ..core import measures
from .checks import check, check_choice
from .evaluation import user_measures

QUALITY = "quality"


@dataclass
class SearchConfig:
    """What the job returns to an optimizing sweeper (hparams_search=...), read from its summary.json."""

    # quality: judge/win_rate when eval.judge.model is set, else eval/loss; several keys: a multi-objective search
    objectives: List[str] = field(default_factory=lambda: [QUALITY])

    def validate(self, key: str) -> None:
        allowed = (QUALITY, *measures.objectives())  # the measures with a direction, a user's (eval.measures) too
        check(len(self.objectives) >= 1, f"{key}.objectives", self.objectives, "at least one of " + ", ".join(allowed))
        for i, name in enumerate(self.objectives):
            check_choice(f"{key}.objectives[{i}]", name, allowed)
        check(len(set(self.objectives)) == len(self.objectives), f"{key}.objectives", self.objectives,
              "each objective once")


def objective_keys(objectives: list[str], judged: bool) -> list[str]:
    """The summary keys of `search.objectives`, with `quality` resolved."""
    quality = measures.WIN_RATE.key if judged else measures.EVAL_LOSS.key
    return [quality if o == QUALITY else o for o in objectives]


def directions_of(keys: list[str]) -> list[str]:
    known = measures.objectives()
    return [known.get(k, "minimize") for k in keys]  # an unknown key fails validation, before any trial


def _absent(key: str) -> float | None:
    """A measure's value where its stage did not run (a run without pruning: no sparsity, no reduction)."""
    m = measures.get(key)
    return m.absent if m is not None else None


def values(summary: dict, keys: list[str]) -> list[float] | None:
    """The run's value of each objective; None when it did not complete or lacks a finite value."""
    if summary.get("status") != "completed":
        return None
    found = [summary.get(k, _absent(k)) for k in keys]
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in found):
        return None
    return [float(v) for v in found]


def objective(summary: dict, keys: list[str]) -> float | list[float] | None:
    """The job's return value: one float, a list for several objectives, None (Optuna then fails the trial)."""
    found = values(summary, keys)
    return found[0] if found is not None and len(found) == 1 else found


def directions(*, _root_: Any) -> list[str]:
    """`${search_directions:}`: the sweeper's directions, one per objective of the composed config (a user's
    measure among them is declared by its `eval.measures` entry)."""
    user_measures(_root_.eval.measures, "eval.measures")
    return directions_of(objective_keys(list(_root_.search.objectives), _root_.eval.judge.model is not None))
