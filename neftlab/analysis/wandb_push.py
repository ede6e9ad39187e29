"""The paired differences into each run's W&B summary, so the dashboard groups them by config."""

from __future__ import annotations

import re

from ..tracking.wandb_run import update_summary
from .paired import _paired_values, paired_measures
from .runs import Run, paired_runs


def paired_key(title: str) -> str:
    """The W&B summary key of a paired measure's difference: `paired/<its title, slugged>`."""
    return "paired/" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")


def push_paired(groups: dict[str, list[Run]], baseline: str) -> int:
    """Each paired run's differences from its baseline run into its W&B summary (`paired/<measure>`), with its
    arm's estimate over seeds (`paired/<measure>_ci_low`, `_ci_high`, `_ci_method` with n, `_p`, `_p_holm`), so
    the dashboard can group them by config; returns how many runs took them."""
    arm_level = {(row.arm, row.title): row for row in paired_measures(groups, baseline)}
    pushed = 0
    for run, base in paired_runs(groups, baseline):
        values = {"paired/baseline": baseline}
        for title, (ours, theirs) in _paired_values(run, base)[0].items():
            key = paired_key(title)
            row = arm_level[run.label_without_seed, title]
            values.update({**row.estimate.fields(key), key: ours - theirs, f"{key}_arm_mean": row.estimate.value})
            if row.p_holm is not None:
                values[f"{key}_p_holm"] = row.p_holm
            if row.unreliable:
                values[f"{key}_unreliable_judge"] = True
        pushed += len(values) > 1 and update_summary(run.dir, values)
    return pushed
