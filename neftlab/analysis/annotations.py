"""AlpacaEval's own verdicts brought back: its annotations.json files, matched to the runs whose answers
`neftlab.export` wrote, as judgings paired by seed like neftlab's judge."""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from pathlib import Path

from ..core import stats
from ..core.files import read_json
from ..core.measures import is_number
from .runs import Run, generator_name

log = logging.getLogger(__name__)


def read_annotations(root: Path, runs: list[Run]) -> None:
    """AlpacaEval's annotations (every annotations.json under root) into the runs' judges, as the source
    "AlpacaEval <annotator>": each generator is matched to its run by `generators.json` (written by
    `neftlab.export`) or by its name, and each baseline to a run the same way, else it is the reference."""
    mapping = {}
    for path in root.rglob("generators.json"):
        mapping.update(read_json(path, root=root) or {})
    by_dir = {str(r.dir.resolve()): r for r in runs}
    by_name = {**{generator_name(r): r for r in runs}, **{g: by_dir[d] for g, d in mapping.items() if d in by_dir}}
    groups = defaultdict(list)
    for path in sorted(root.rglob("annotations.json")):
        records = read_json(path, root=root)
        if not isinstance(records, list):
            log.warning("%s is not a list of AlpacaEval annotations: ignored", path)
            continue
        for a in records:
            if isinstance(a, dict) and {"output_1", "output_2", "generator_2", "preference"} <= set(a):
                groups[a.get("annotator", "?"), a.get("generator_1", "reference"), a["generator_2"]].append(a)
    unmatched = sorted({g for _, _, g in groups if g not in by_name})
    if unmatched:
        log.warning("AlpacaEval annotations of %s match no run under the report's directory: ignored",
                    ", ".join(unmatched))
    for (annotator, baseline, generator), records in groups.items():
        if generator not in by_name:
            continue
        # alpaca_eval's preference: 1 = output_1 (the baseline) is better, 2 = output_2, 1.5 (or 0) a tie
        kept = [(float(a["preference"]), a) for a in records if is_number(a["preference"]) and
                not math.isnan(a["preference"])]
        prefs = [1.5 - 1 if p == 0 else p - 1 for p, _ in kept]
        summary = stats.preference_summary(prefs, [len(a["output_2"]) for _, a in kept],
                                           [len(a["output_1"]) for _, a in kept])
        against = str(by_name[baseline].dir.resolve()) if baseline in by_name else "reference"
        by_name[generator].judges.setdefault(f"AlpacaEval {annotator}", {})[against] = {
            **summary, "judge/reference": baseline}
