"""Each arm against the baseline arm: per measure, the mean paired difference over seeds with its interval and
p-values (`stats`), Holm-adjusted over the arms; harness scores paired by item."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass

from ..core import measures, stats
from ..core.measures import is_number
from .runs import Run, judged_titles, paired_runs
from .tables import cell, markdown_table

WIN, LC_WIN, RELIABLE = measures.WIN_RATE.key, measures.LC_WIN_RATE.key, measures.RELIABLE.key


def paired() -> list[measures.Measure]:
    """The measures paired against the baseline arm, a user's included, in the order they were declared."""
    return [m for m in measures.declared() if m.paired]


def _paired_values(run: Run, base: Run) -> tuple[dict[str, tuple[float, float]], set[str]]:
    """(the run's value, the baseline run's value) of each measure both have, and the measures that come from a
    judge that failed its controls."""
    out = {m.label: (run.summary[m.key], base.summary[m.key]) for m in paired()
           if is_number(run.summary.get(m.key)) and is_number(base.summary.get(m.key))}
    out.update({"harness " + key.removeprefix("harness/").replace("/", " "): (run.summary[key], base.summary[key])
                for key in run.summary if key.startswith("harness/") and not key.endswith("_stderr")
                and is_number(run.summary[key]) and is_number(base.summary.get(key))})
    unreliable = set()
    for source in {**run.judges, **base.judges}:
        vs_baseline, lc_vs_baseline, vs_reference = judged_titles(source)
        judged = run.judges.get(source, {}).get(str(base.dir.resolve()), {})
        for key, title in ((WIN, vs_baseline), (LC_WIN, lc_vs_baseline)):
            if is_number(judged.get(key)):
                out[title] = (judged[key], 0.5)  # the baseline's answers against themselves
                if judged.get(RELIABLE) is False:
                    unreliable.add(title)
        ours, theirs = (r.judges.get(source, {}).get("reference", {}) for r in (run, base))
        if is_number(ours.get(WIN)) and is_number(theirs.get(WIN)):
            out[vs_reference] = (ours[WIN], theirs[WIN])
            if False in (ours.get(RELIABLE), theirs.get(RELIABLE)):
                unreliable.add(vs_reference)
    return out, unreliable


@dataclass
class Paired:
    """One arm's paired measure: the pairs, the estimate of their mean difference, its Holm-adjusted p-value."""
    arm: str
    title: str
    pairs: list[tuple[float, float]]
    estimate: stats.Estimate
    unreliable: bool  # from a judge that failed its controls: shown, but no conclusion drawn
    p_holm: float | None = None


def paired_measures(groups: dict[str, list[Run]], baseline: str) -> list[Paired]:
    """Each arm's mean difference from the baseline arm over seeds, per measure (`stats.mean_difference`), with
    the p-values of each measure Holm-adjusted over the arms."""
    values = defaultdict(lambda: defaultdict(list))
    unreliable = defaultdict(bool)
    for run, base in paired_runs(groups, baseline):
        found, flagged = _paired_values(run, base)
        for title, pair in found.items():
            values[run.label_without_seed][title].append(pair)
            unreliable[run.label_without_seed, title] |= title in flagged
    declared = [m.label for m in paired()]
    order = declared + sorted({t for m in values.values() for t in m} - set(declared))
    rows = [Paired(arm, title, measures[title], stats.mean_difference([a - b for a, b in measures[title]]),
                   unreliable[arm, title])
            for arm, measures in sorted(values.items()) for title in order if title in measures]
    for title in order:
        family = [r for r in rows if r.title == title and not r.unreliable]
        for row, adjusted in zip(family, stats.holm([r.estimate.p for r in family])):
            row.p_holm = adjusted
    return rows + harness_item_measures(groups, baseline)


def harness_item_measures(groups: dict[str, list[Run]], baseline: str) -> list[Paired]:
    """Each arm's harness scores against the baseline arm's over the items both answered: per item the mean over
    the seed pairs of arm − baseline, with a BCa interval over the items (both runs answer the same items)."""
    by_item = defaultdict(lambda: defaultdict(list))  # (arm, task, metric) -> doc id -> [(arm, baseline)]
    for run, base in paired_runs(groups, baseline):
        theirs = base.harness_items()
        for (task, metric), scores in run.harness_items().items():
            for doc, score in scores.items():
                if doc in theirs.get((task, metric), {}):
                    by_item[run.label_without_seed, task, metric][doc].append((score, theirs[task, metric][doc]))
    rows = []
    for (arm, task, metric), docs in sorted(by_item.items()):
        pairs = [(statistics.fmean(a for a, _ in v), statistics.fmean(b for _, b in v)) for _, v in sorted(docs.items())]
        rows.append(Paired(arm, f"harness {task} {metric}, over items", pairs,
                           stats.mean_over_items([a - b for a, b in pairs]), False))
    return rows


def paired_table(groups: dict[str, list[Run]], baseline: str) -> str | None:
    """The paired measures as a table: means, difference, its interval with method and n, raw and Holm p."""
    formats = {m.label: m.fmt for m in paired()}
    lines = []
    for row in paired_measures(groups, baseline):
        fmt, e = formats.get(row.title, "{:.3f}"), row.estimate
        signed = fmt.replace("{:", "{:+")
        if row.unreliable:
            interval, method, p, holm = "—", "judge failed its controls: no conclusion", "—", "—"
        else:
            interval = f"[{signed.format(e.low)}, {signed.format(e.high)}]" if e.low is not None else "—"
            method = e.method or "none (one pair)"
            p = f"{e.p:.3f}" if e.p is not None else "—"
            holm = f"{row.p_holm:.3f}" if row.p_holm is not None else "—"
        lines.append([row.arm, row.title, str(e.n), cell(statistics.fmean(b for _, b in row.pairs), fmt),
                      cell(statistics.fmean(a for a, _ in row.pairs), fmt), cell(e.value, signed), interval, method,
                      p, holm])
    header = ["arm", "measure", "n", "baseline", "arm", "arm − baseline", "95% interval", "interval method",
              "p (sign-flip)", "p (Holm)"]
    return markdown_table(header, lines) if lines else None


PAIRED_NOTE = (
    "Each run of an arm is paired with the baseline arm's run of the same seed and otherwise the same config. "
    "A row gives the mean over its n pairs of the baseline's and the arm's value and of their difference. With "
    f"fewer than {stats.SMALL} pairs the interval is a Student t interval of the mean difference and p the exact "
    "sign-flip permutation test of no difference (all 2^n sign patterns; with 3 pairs no p-value can be below "
    "0.25); from "
    f"{stats.SMALL} pairs on, a BCa bootstrap interval and a sign-flip test on {stats.RESAMPLES} random flips. With one "
    "pair there is no interval. p (Holm) adjusts each measure's p-values over the arms compared with the baseline. "
    "An interval that contains 0 is no evidence of a difference, and 3 seeds show only the direction the seeds "
    "agree on. Judge win rates vs baseline are the arm's answers judged against the baseline run's answers to the "
    "same prompts: the baseline scores 0.5 against itself, so the difference is the win rate − 0.5; LC is AlpacaEval "
    "2's length-controlled win rate. Rows \"over items\" (lm-evaluation-harness tasks) pair each item's scores, "
    "averaged over the seed pairs, with a BCa bootstrap interval over the items both runs answered. A judge that "
    "failed its controls (the reference against an empty answer, its "
    "own first sentence, another prompt's reference; an answer against itself) is named in the table, and no "
    "conclusion is drawn from its win rates.")
