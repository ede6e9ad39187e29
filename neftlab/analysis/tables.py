"""The report's tables: one row per run, runs that differ only by seed folded into mean ± std, and the judges
with their controls."""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path

from ..core import measures
from ..evaluation.llm_judge.controls import CONTROLS
from ..core.measures import is_number
from .runs import JUDGE, Run


def columns() -> list[tuple[str, str, str]]:
    """The runs table's measures: (summary key, column title, format) of every declared measure that is a column,
    a user's (from eval.measures, or a finished run's summary) included."""
    return [(m.key, m.label, m.fmt) for m in measures.declared() if m.column]


def cell(value, fmt: str) -> str:
    if value is None:
        return ""
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _used_columns(runs: list[Run]):
    judged = sorted({title for r in runs for title in r.extra})
    return ([c for c in columns() if any(isinstance(r.summary.get(c[0]), (int, float)) for r in runs)]
            + [(title, title, "{:.3f}") for title in judged])


def where(run: Run, root: Path) -> str:
    """A run's directory as the report names it: relative to the report's root, so that runs of several sweeps
    under one root (a search's processes, a confirmation's arms) are told apart."""
    return str(run.dir.relative_to(root)) if run.dir.is_relative_to(root) else str(run.dir)


def runs_table(runs: list[Run], root: Path) -> str:
    cols = _used_columns(runs)
    rows = [[r.label, where(r, root), *(cell(r.value(k), f) for k, _, f in cols), r.summary.get("status", "")]
            for r in runs]
    return markdown_table(["run", "dir", *(t for _, t, _ in cols), "status"], rows)


def seeds_table(runs: list[Run]) -> str | None:
    """Runs that differ only by seed, folded into mean ± std over their completed runs."""
    groups = defaultdict(list)
    for r in runs:
        if r.summary.get("status") == "completed":
            groups[r.label_without_seed].append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return None
    cols = _used_columns(runs)
    rows = []
    for label, members in groups.items():
        cells = []
        for key, _, fmt in cols:
            values = [m.value(key) for m in members if isinstance(m.value(key), (int, float))]
            cells.append("" if not values else
                         f"{cell(statistics.fmean(values), fmt)} ± {cell(statistics.pstdev(values), fmt)}")
        rows.append([label, str(len(members)), *cells])
    return markdown_table(["config", "seeds", *(t for _, t, _ in cols)], rows)


def judges_section(runs: list[Run]) -> list[str]:
    """Each judge used, with its controls averaged over the runs it judged and its verdict."""
    used = defaultdict(list)
    for r in runs:
        for source, judged in r.judges.items():
            for summary in judged.values():
                if source == JUDGE:
                    used[f"`{Path(str(summary.get('judge/model'))).name}` ({summary.get('judge/template')} prompt)"
                         ].append(summary)
    if not used:
        return []
    rows = []
    for name, summaries in used.items():
        cells = []
        for control in CONTROLS:
            values = [s[f"judge/control_{control}"] for s in summaries if is_number(s.get(f"judge/control_{control}"))]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "—")
        verdicts = {s.get(measures.RELIABLE.key) for s in summaries}
        verdict = ("reliable" if verdicts == {True} else
                   "**unreliable**: failed its controls; no conclusion is drawn from its win rates")
        rows.append([name, str(len(summaries)), *cells, verdict])
    what = "; ".join(f"{name}: {a} against {b} (needs {rule})" for name, (a, b, _, rule) in CONTROLS.items())
    return ["## Judges", "", f"Controls, built from the judged prompts and averaged over the judgings: {what}.", "",
            markdown_table(["judge", "judgings", *CONTROLS, "verdict"], rows), ""]
