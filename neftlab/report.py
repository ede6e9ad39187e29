"""Offline comparison report: `python -m neftlab.report <multirun dir, or outputs/> [--out DIR]`.

Reads every run's summary.json, metrics.jsonl, samples.jsonl, judge_*.json and .hydra/ files under the
directory and writes report.md (one row per run, then runs that differ only by seed folded into mean ± std,
then each arm's paired differences from the baseline arm over seeds, with intervals and p-values from `stats`)
with PNG plots of
the loss curves, of the final metrics against alpha and pruning ratio, and of answer lengths and win rates.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from tqdm.auto import tqdm

from . import rundir, search, stats
from .errors import NeftlabError

log = logging.getLogger(__name__)

COLUMNS = [  # (summary key, column title, format)
    ("eval/loss", "eval loss", "{:.4f}"), ("eval/perplexity", "ppl", "{:.2f}"), ("eval/accuracy", "acc", "{:.4f}"),
    ("eval/macro_f1", "macro-F1", "{:.4f}"), ("eval/train_loss_noise_off", "train loss noise-off", "{:.4f}"),
    ("eval/response_length", "resp len", "{:.1f}"), ("eval/response_words", "resp words", "{:.1f}"),
    ("eval/hit_max_new_tokens", "hit max", "{:.2f}"), ("eval/diversity", "diversity", "{:.3f}"),
    ("eval/distinct_2", "dist-2", "{:.3f}"), ("eval/distinct_4", "dist-4", "{:.3f}"),
    ("pruning/sparsity", "sparsity", "{:.3f}"), ("efficiency/param_reduction", "param red.", "{:.3f}"),
    ("efficiency/latency_ms_per_token", "ms/token", "{:.2f}"),
    ("efficiency/unpruned_latency_ms_per_token", "ms/token unpruned", "{:.2f}"),
    ("efficiency/latency_ms_per_sample", "ms/sample", "{:.2f}"),
    ("convergence/loss_std", "loss std", "{:.4f}"), ("convergence/half_drop_step", "half-drop step", "{:.0f}"),
]


# Paired against the baseline arm: (summary key, measure, format).
PAIRED = [("eval/response_length", "answer length (tokens)", "{:.1f}"),
          ("eval/response_words", "answer length (words)", "{:.1f}"), ("eval/diversity", "diversity", "{:.3f}"),
          ("eval/distinct_4", "distinct-4", "{:.3f}"), ("eval/loss", "eval loss", "{:.4f}"),
          ("eval/train_loss_noise_off", "train loss, noise off", "{:.4f}")]
JUDGE = "judge"  # neftlab's own judge (judge_*.json); AlpacaEval's annotations are "AlpacaEval <annotator>"


def judged_titles(source: str) -> tuple[str, str, str]:
    """The paired measures a judge gives: its win rate and LC win rate against the baseline arm's answers, and its
    win rate against the reference answers (the arm's less the baseline arm's)."""
    return (f"{source} win rate vs baseline", f"{source} LC win rate vs baseline", f"{source} win rate vs reference")


JUDGED = list(judged_titles(JUDGE))
# What sets an arm (method) apart; runs that agree on everything else and on the seed are paired.
ARM_KEYS = ("noise", "pruning", "trainer.max_steps", "trainer.neftune_noise_alpha")


class ReportError(NeftlabError, ValueError):
    """Runs or annotations that cannot be reported as asked."""


@dataclass
class Run:
    dir: Path
    overrides: list[str]  # the job's command-line overrides
    summary: dict
    config: dict
    history: list[dict] = field(default_factory=list)
    judges: dict = field(default_factory=dict)  # {source: {baseline ("reference" or a run dir): judge/… summary}}
    label: str = ""  # its overrides less those every run shares
    extra: dict = field(default_factory=dict)  # table cells not in the summary: the judges' win rates
    searched: bool = False  # a trial of an optimizing sweep (hydra/sweeper=optuna)

    def value(self, key: str):
        return self.summary.get(key, self.extra.get(key))

    @property
    def label_without_seed(self) -> str:
        return ",".join(o for o in self.label.split(",") if not o.startswith("seed=")) or "(common)"

    def get(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    @property
    def context(self) -> str:
        """Its config less the seed and the arm: runs with the same context and seed are paired."""
        config = copy.deepcopy(self.config)
        config.pop("seed", None)
        for key in ARM_KEYS:
            *parents, last = key.split(".")
            node = config
            for part in parents:
                node = node.get(part, {}) if isinstance(node, dict) else {}
            if isinstance(node, dict):
                node.pop(last, None)
        return json.dumps(config, sort_keys=True, default=str)

    @property
    def is_plain_finetuning(self) -> bool:
        """No noise, no pruning, trained: the arm the others are measured against by default."""
        return (self.get("noise.kind") == "none" and self.get("pruning.method") == "off"
                and self.get("trainer.max_steps") != 0 and self.get("trainer.neftune_noise_alpha") is None)

    def harness_items(self) -> dict[tuple[str, str], dict]:
        """lm-eval's per-item scores of the run's last harness evaluation: {(task, metric): {doc id: score}}."""
        rows = [r for r in rundir.read_jsonl(self.dir / rundir.HARNESS_SAMPLES) if "task" in r and "doc_id" in r]
        if not rows:
            return {}
        last = (rows[-1]["step"], rows[-1].get("stage"))
        out = defaultdict(dict)
        for r in rows:
            if (r["step"], r.get("stage")) == last:
                for metric, value in r.items():
                    if metric not in ("step", "stage", "task", "doc_id", "target") and _number(value):
                        out[r["task"], metric][r["doc_id"]] = value
        return dict(out)

    def answer_lengths(self) -> list[int]:
        """Answer lengths in tokens at the last generation step of samples.jsonl (one per prompt)."""
        _, rows = rundir.last_generation(self.dir / rundir.SAMPLES)
        return [r["tokens"] for r in rows.values() if isinstance(r.get("tokens"), int)]


def _yaml(path: Path, default):
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or default
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        log.warning("%s is unreadable (%s): ignored", path, type(e).__name__)
        return default


def _read_run(summary_path: Path) -> Run | None:
    """The run, or None when its summary.json is unreadable (the reader has named it)."""
    run_dir = summary_path.parent
    summary = rundir.read_json(summary_path)
    if not isinstance(summary, dict):
        return None
    overrides = _yaml(run_dir / rundir.OVERRIDES, [])
    config = _yaml(run_dir / rundir.CONFIG, {})
    history = rundir.read_jsonl(run_dir / rundir.METRICS)
    judges = {}
    for path in rundir.judge_files(run_dir):
        data = rundir.read_json(path)
        if isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("baseline"), str):
            judges.setdefault(JUDGE, {})[data["baseline"]] = {**data["summary"], "judge/model": data.get("judge"),
                                                              "judge/template": data.get("template", "neftlab")}
    sweeper = (_yaml(run_dir / rundir.HYDRA_CONFIG, {}).get("hydra") or {}).get("sweeper") or {}
    return Run(run_dir, [o for o in overrides if not o.startswith("hydra.")], summary, config, history, judges,
               searched="Optuna" in str(sweeper.get("_target_", "")))


def find_runs(root: Path, annotations: Path | None = None) -> tuple[list[Run], list[str], list[Path]]:
    """The runs under root, labelled by what sets them apart, the overrides they all share, and the
    summaries that could not be read; with `annotations`, AlpacaEval's verdicts on their answers too."""
    paths = sorted(root.rglob(rundir.SUMMARY))
    if not paths:
        raise ReportError(f"no runs under {root}: no */summary.json (point it at a run, multirun or outputs/ directory)")
    read = [(p, _read_run(p)) for p in tqdm(paths, desc="Reading runs", unit="run")]
    runs = [r for _, r in read if r is not None]
    unreadable = [p for p, r in read if r is None]
    if not runs:
        raise ReportError(f"no readable runs under {root}: every summary.json is corrupt ({', '.join(map(str, unreadable))})")
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if len(runs) > 1 else []
    for r in runs:
        r.label = ",".join(o for o in r.overrides if o not in common) or "(common)"
    if annotations is not None:
        read_annotations(annotations, runs)
    by_dir = {str(r.dir.resolve()): r for r in runs}
    for r in runs:
        for source, judged in r.judges.items():
            for baseline, summary in judged.items():
                against = by_dir[baseline].label_without_seed if baseline in by_dir else Path(baseline).name
                r.extra[f"{'' if source == JUDGE else source + ' '}win vs {against}"] = summary.get("judge/win_rate")
    return runs, common, unreadable


def generator_name(run: Run) -> str:
    """The run's name in AlpacaEval's files (`generator`): its arm and seed, e.g. `arm=uniform_5,seed=1`."""
    arm = run.label_without_seed if run.label not in ("", "(common)") else ",".join(
        o for o in run.overrides if not o.startswith("seed="))
    return f"{arm if arm and arm != '(common)' else 'neftlab'},seed={run.get('seed')}".replace("/", "_")


def read_annotations(root: Path, runs: list[Run]) -> None:
    """AlpacaEval's annotations (every annotations.json under root) into the runs' judges, as the source
    "AlpacaEval <annotator>": each generator is matched to its run by `generators.json` (written by
    `neftlab.export`) or by its name, and each baseline to a run the same way, else it is the reference."""
    mapping = {}
    for path in root.rglob("generators.json"):
        mapping.update(rundir.read_json(path) or {})
    by_dir = {str(r.dir.resolve()): r for r in runs}
    by_name = {**{generator_name(r): r for r in runs}, **{g: by_dir[d] for g, d in mapping.items() if d in by_dir}}
    groups = defaultdict(list)
    for path in sorted(root.rglob("annotations.json")):
        records = rundir.read_json(path)
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
        kept = [(float(a["preference"]), a) for a in records if _number(a["preference"]) and
                not math.isnan(a["preference"])]
        prefs = [1.5 - 1 if p == 0 else p - 1 for p, _ in kept]
        summary = stats.preference_summary(prefs, [len(a["output_2"]) for _, a in kept],
                                           [len(a["output_1"]) for _, a in kept])
        against = str(by_name[baseline].dir.resolve()) if baseline in by_name else "reference"
        by_name[generator].judges.setdefault(f"AlpacaEval {annotator}", {})[against] = {
            **summary, "judge/reference": baseline}


def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _used_columns(runs: list[Run]):
    judged = sorted({title for r in runs for title in r.extra})
    return ([c for c in COLUMNS if any(isinstance(r.summary.get(c[0]), (int, float)) for r in runs)]
            + [(title, title, "{:.3f}") for title in judged])


def runs_table(runs: list[Run]) -> str:
    cols = _used_columns(runs)
    rows = [[r.label, str(r.dir.name), *(_cell(r.value(k), f) for k, _, f in cols), r.summary.get("status", "")]
            for r in runs]
    return _table(["run", "dir", *(t for _, t, _ in cols), "status"], rows)


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
                         f"{_cell(statistics.fmean(values), fmt)} ± {_cell(statistics.pstdev(values), fmt)}")
        rows.append([label, str(len(members)), *cells])
    return _table(["config", "seeds", *(t for _, t, _ in cols)], rows)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def arms(runs: list[Run]) -> dict[str, list[Run]]:
    """Completed runs by arm: their label less the seed."""
    groups = defaultdict(list)
    for r in runs:
        if r.summary.get("status") == "completed":
            groups[r.label_without_seed].append(r)
    return dict(groups)


def plain_arms(groups: dict[str, list[Run]]) -> list[str]:
    return [arm for arm, members in groups.items() if all(r.is_plain_finetuning for r in members)]


def baseline_arm(groups: dict[str, list[Run]], requested: str | None) -> str | None:
    """The arm the others are paired against: `requested`, else the only plain fine-tuning arm (None if not one)."""
    if requested is None:
        plain = plain_arms(groups)
        return plain[0] if len(plain) == 1 else None
    if requested not in groups:
        raise ReportError(f"--baseline {requested}: no completed runs of that arm; the arms are "
                          + ", ".join(f"'{arm}'" for arm in groups))
    return requested


def paired_runs(groups: dict[str, list[Run]], baseline: str) -> list[tuple[Run, Run]]:
    """(run, the baseline arm's run of the same seed and otherwise the same config) for every other arm's run."""
    base = {(b.context, b.get("seed")): b for b in groups[baseline]}
    return [(r, base[r.context, r.get("seed")]) for arm, members in groups.items() if arm != baseline
            for r in members if (r.context, r.get("seed")) in base]


def _paired_values(run: Run, base: Run) -> tuple[dict[str, tuple[float, float]], set[str]]:
    """(the run's value, the baseline run's value) of each measure both have, and the measures that come from a
    judge that failed its controls."""
    out = {title: (run.summary[key], base.summary[key]) for key, title, _ in PAIRED
           if _number(run.summary.get(key)) and _number(base.summary.get(key))}
    out.update({"harness " + key.removeprefix("harness/").replace("/", " "): (run.summary[key], base.summary[key])
                for key in run.summary if key.startswith("harness/") and not key.endswith("_stderr")
                and _number(run.summary[key]) and _number(base.summary.get(key))})
    unreliable = set()
    for source in {**run.judges, **base.judges}:
        vs_baseline, lc_vs_baseline, vs_reference = judged_titles(source)
        judged = run.judges.get(source, {}).get(str(base.dir.resolve()), {})
        for key, title in (("judge/win_rate", vs_baseline), ("judge/lc_win_rate", lc_vs_baseline)):
            if _number(judged.get(key)):
                out[title] = (judged[key], 0.5)  # the baseline's answers against themselves
                if judged.get("judge/reliable") is False:
                    unreliable.add(title)
        ours, theirs = (r.judges.get(source, {}).get("reference", {}) for r in (run, base))
        if _number(ours.get("judge/win_rate")) and _number(theirs.get("judge/win_rate")):
            out[vs_reference] = (ours["judge/win_rate"], theirs["judge/win_rate"])
            if False in (ours.get("judge/reliable"), theirs.get("judge/reliable")):
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
    order = [title for _, title, _ in PAIRED] + sorted({t for m in values.values() for t in m} - {
        title for _, title, _ in PAIRED})
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
    formats = {title: fmt for _, title, fmt in PAIRED}
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
        lines.append([row.arm, row.title, str(e.n), _cell(statistics.fmean(b for _, b in row.pairs), fmt),
                      _cell(statistics.fmean(a for a, _ in row.pairs), fmt), _cell(e.value, signed), interval, method,
                      p, holm])
    header = ["arm", "measure", "n", "baseline", "arm", "arm − baseline", "95% interval", "interval method",
              "p (sign-flip)", "p (Holm)"]
    return _table(header, lines) if lines else None


def plot_lengths(lengths: dict[str, list[int]], path: Path) -> bool:
    """The distribution of answer lengths per arm, at the final step, pooled over seeds."""
    lengths = {arm: v for arm, v in sorted(lengths.items(), key=lambda item: natural(item[0])) if v}
    if not lengths:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.5 * len(lengths)))
    ax.boxplot(list(lengths.values()), orientation="horizontal", tick_labels=list(lengths), showmeans=True)
    ax.set(title="answer length per arm (final step, all seeds)", xlabel="tokens")
    ax.grid(alpha=0.3, axis="x")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def _judged_wins(groups: dict[str, list[Run]], baseline: str | None) -> dict[str, dict[str, list[float]]]:
    """Win rates by series ("<source> vs reference", "<source> vs <baseline arm>") and arm; the baseline arm scores
    0.5 against itself."""
    series = defaultdict(lambda: defaultdict(list))
    for arm, members in groups.items():
        for r in members:
            for source, judged in r.judges.items():
                if _number(win := judged.get("reference", {}).get("judge/win_rate")):
                    series[f"{source} vs reference"][arm].append(win)
    if baseline is not None:
        for run, base in paired_runs(groups, baseline):
            for source, judged in run.judges.items():
                if _number(win := judged.get(str(base.dir.resolve()), {}).get("judge/win_rate")):
                    series[f"{source} vs {baseline}"][run.label_without_seed].append(win)
                    series[f"{source} vs {baseline}"][baseline] = [0.5]
    return series


def _mean_length(members: list[Run], lengths: list[int]) -> float | None:
    """From the answers of the final step, else from the runs' eval/response_length."""
    values = lengths or [r.summary["eval/response_length"] for r in members
                         if _number(r.summary.get("eval/response_length"))]
    return statistics.fmean(values) if values else None


def plot_win_vs_length(groups: dict[str, list[Run]], lengths: dict[str, list[int]], baseline: str | None,
                       path: Path) -> bool:
    """Each arm's mean judge win rate against its mean answer length: does an arm win only by saying more?"""
    series = {name: [(arm, length, statistics.fmean(wins)) for arm, wins in by_arm.items()
                     if (length := _mean_length(groups[arm], lengths.get(arm, []))) is not None]
              for name, by_arm in _judged_wins(groups, baseline).items()}
    if not any(series.values()):
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, points in series.items():
        if points:
            ax.scatter([x for _, x, _ in points], [y for _, _, y in points], label=name)
            for arm, x, y in points:
                ax.annotate(arm, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set(title="judge win rate against mean answer length, per arm", xlabel="mean answer length (tokens)",
           ylabel="win rate")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def search_sections(runs: list[Run], root: Path, out: Path) -> list[str]:
    """The trials of optimizing sweeps, per set of objectives: each trial's values, marked when on the Pareto
    front (with one objective: the best trial), and for two objectives a plot of the front."""
    studies = defaultdict(list)
    for r in runs:
        if r.searched:
            judged = r.get("eval.judge.model") is not None
            studies[tuple(search.objective_keys(r.get("search.objectives") or [search.QUALITY], judged))].append(r)
    parts = []
    for n, (keys, trials) in enumerate(studies.items()):
        directions = search.directions_of(list(keys))
        found = [(r, search.values(r.summary, list(keys))) for r in trials]
        done = [(r, v) for r, v in found if v is not None]
        front = {id(r): on for (r, _), on in zip(done, search.pareto_front([v for _, v in done], directions))}
        sign = 1.0 if directions[0] == "maximize" else -1.0
        order = sorted(done, key=lambda rv: (not front[id(rv[0])], -sign * rv[1][0])) + [
            (r, v) for r, v in found if v is None]
        arrows = [f"{k} ({'↑' if d == 'maximize' else '↓'})" for k, d in zip(keys, directions)]
        rows = [[r.label, str(r.dir.relative_to(root)) if r.dir.is_relative_to(root) else str(r.dir),
                 *(["{:.4f}".format(x) for x in v] if v else [""] * len(keys)), r.summary.get("status", ""),
                 "✓" if v and front[id(r)] else ""] for r, v in order]
        what = "best" if len(keys) == 1 else "on the Pareto front"
        parts += [f"## Search: {', '.join(keys)}", "",
                  f"{len(trials)} trials, {len(done)} with values ({len(trials) - len(done)} failed or without the "
                  f"metric: Optuna recorded them as failed). ✓ = {what}.", "",
                  _table(["trial", "dir", *arrows, "status", what], rows), ""]
        if len(keys) == 2 and len(done) >= 2:
            name = f"search_front{n or ''}.png"
            plot_front(done, front, keys, out / name)
            parts += [f"![Pareto front]({name})", ""]
    return parts


def plot_front(done: list[tuple[Run, list[float]]], front: dict[int, bool], keys: tuple, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([v[0] for _, v in done], [v[1] for _, v in done], color="grey", label="trial")
    best = sorted(v for r, v in done if front[id(r)])
    ax.plot([v[0] for v in best], [v[1] for v in best], marker="o", color="C3", label="Pareto front")
    ax.set(title="search trials", xlabel=keys[0], ylabel=keys[1])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in runs:
        train = [(m["step"], m["train/loss"]) for m in r.history if isinstance(m.get("train/loss"), (int, float))]
        evals = [(m["step"], m["eval/loss"]) for m in r.history if isinstance(m.get("eval/loss"), (int, float))]
        if train:
            train_ax.plot(*zip(*train), label=r.label, linewidth=1)
        if evals:
            eval_ax.plot(*zip(*evals), marker="o", label=r.label, linewidth=1)
    for ax, title in ((train_ax, "train loss"), (eval_ax, "eval loss")):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    if len(runs) <= 20:
        fig.legend(*eval_ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
        fig.subplots_adjust(bottom=0.2 + 0.035 * ((len(runs) + 1) // 2))
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


SERIES_KEYS = ("noise.kind", "pruning.method", "noise.alpha", "pruning.ratio")  # what sets a curve apart
FEW = 6  # a key with at most this many values splits the curves; more (a search's), and points stand alone


def natural(text: str) -> list:
    """A sort key that orders the numbers inside labels by value: alpha 1, 5, 10, not 1, 10, 5."""
    return [float(part) if i % 2 else part for i, part in enumerate(re.split(r"(-?\d+(?:\.\d+)?)", text))]


def _plain_axes(ax) -> None:
    """Tick labels as the numbers themselves, not matplotlib's offset notation (+1.08e1)."""
    for axis in (ax.xaxis, ax.yaxis):
        formatter = axis.get_major_formatter()
        if hasattr(formatter, "set_useOffset"):
            formatter.set_useOffset(False)
            formatter.set_scientific(False)


def curves(runs: list[Run], key: str, only) -> tuple[dict, bool]:
    """{metric: {series: {x: values over seeds}}} of the completed runs `only` keeps, against config `key`: one
    series per combination of the other keys that set runs apart (noise kind, pruning method, and the other of
    alpha and ratio when it takes a few values), and whether a series joins its points (False when a key with
    many values, a search's, was left out of the series: its points are not one curve)."""
    done = [r for r in runs if only(r) and _number(r.get(key)) and r.summary.get("status") == "completed"]
    others = [k for k in SERIES_KEYS if k != key and len({str(r.get(k)) for r in done}) > 1]
    split = [k for k in others if len({str(r.get(k)) for r in done}) <= FEW]
    points = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in done:
        series = ", ".join(f"{k}={r.get(k)}" for k in split) or "all runs"
        for metric in ("eval/loss", "eval/accuracy"):
            if _number(r.summary.get(metric)):
                points[metric][series][r.get(key)].append(r.summary[metric])
    return points, len(split) == len(others)


def plot_against(runs: list[Run], key: str, title: str, path: Path, only) -> bool:
    """Final eval loss and accuracy against a config value (`curves`), the mean over seeds with error bars of ± one
    standard deviation over the seeds, labelled so."""
    points, joined = curves(runs, key, only)
    if len({x for by_series in points.values() for xs in by_series.values() for x in xs}) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4), squeeze=False)
    for ax, (metric, by_series) in zip(axes[0], sorted(points.items())):
        for series, by_x in sorted(by_series.items(), key=lambda item: natural(item[0])):
            xs = sorted(by_x)
            n = sorted({len(by_x[x]) for x in xs})
            ax.errorbar(xs, [statistics.fmean(by_x[x]) for x in xs],
                        yerr=[statistics.pstdev(by_x[x]) for x in xs], marker="o", capsize=3,
                        linestyle="-" if joined else "none",
                        label=f"{series} (n = {'–'.join(map(str, (n[0], n[-1]))) if len(n) > 1 else n[0]} seeds)")
        ax.set(title=f"{metric} against {title}", xlabel=title,
               ylabel=f"{metric}: mean ± std over seeds")
        _plain_axes(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def swept_pair(runs: list[Run]) -> tuple[str, str] | None:
    """The two numeric keys a grid sweep varied (from the runs' overrides, seed aside), if exactly two were."""
    values = defaultdict(set)
    for r in runs:
        for override in r.overrides:
            name, _, value = override.partition("=")
            try:
                values[name.lstrip("+~")].add(float(value))
            except ValueError:
                continue
    swept = sorted(k for k, v in values.items() if len(v) > 1 and k != "seed")
    return (swept[0], swept[1]) if len(swept) == 2 else None


def plot_heatmap(runs: list[Run], keys: tuple[str, str], path: Path) -> bool:
    """The final eval loss over two swept keys (mean over seeds, each cell annotated): how alpha and the pruning
    ratio act together, which two curves cannot show."""
    done = [r for r in runs if r.summary.get("status") == "completed" and _number(r.summary.get("eval/loss"))
            and all(_number(r.get(k)) for k in keys)]
    cells = defaultdict(list)
    for r in done:
        cells[r.get(keys[0]), r.get(keys[1])].append(r.summary["eval/loss"])
    xs, ys = sorted({x for x, _ in cells}), sorted({y for _, y in cells})
    if len(xs) < 2 or len(ys) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    grid = np.full((len(ys), len(xs)), np.nan)
    for (x, y), values in cells.items():
        grid[ys.index(y), xs.index(x)] = statistics.fmean(values)
    fig, ax = plt.subplots(figsize=(1.2 * len(xs) + 3, 0.8 * len(ys) + 2.5))
    image = ax.imshow(grid, cmap="viridis_r", aspect="auto", origin="lower")
    for (i, j), value in np.ndenumerate(grid):
        if np.isfinite(value):
            ax.text(j, i, f"{value:.4f}", ha="center", va="center", fontsize=8, color="white")
    ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
    ax.set(xlabel=keys[0], ylabel=keys[1], title="final eval loss, mean over seeds")
    fig.colorbar(image, ax=ax, label="eval loss")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


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


def push_paired(groups: dict[str, list[Run]], baseline: str) -> int:
    """Each paired run's differences from its baseline run into its W&B summary (`paired/<measure>`), with its
    arm's estimate over seeds (`paired/<measure>_ci_low`, `_ci_high`, `_ci_method` with n, `_p`, `_p_holm`), so
    the dashboard can group them by config; returns how many runs took them."""
    from . import tracking
    arm_level = {(row.arm, row.title): row for row in paired_measures(groups, baseline)}
    pushed = 0
    for run, base in paired_runs(groups, baseline):
        values = {"paired/baseline": baseline}
        for title, (ours, theirs) in _paired_values(run, base)[0].items():
            key = "paired/" + re.sub(r"[^a-z0-9]+", "_", title.lower()).strip("_")
            row = arm_level[run.label_without_seed, title]
            values.update({**row.estimate.fields(key), key: ours - theirs, f"{key}_arm_mean": row.estimate.value})
            if row.p_holm is not None:
                values[f"{key}_p_holm"] = row.p_holm
            if row.unreliable:
                values[f"{key}_unreliable_judge"] = True
        pushed += len(values) > 1 and tracking.update_summary(run.dir, values)
    return pushed


def judges_section(runs: list[Run]) -> list[str]:
    """Each judge used, with its controls averaged over the runs it judged and its verdict."""
    from .judge import CONTROLS
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
            values = [s[f"judge/control_{control}"] for s in summaries if _number(s.get(f"judge/control_{control}"))]
            cells.append(f"{statistics.fmean(values):.3f}" if values else "—")
        verdicts = {s.get("judge/reliable") for s in summaries}
        verdict = ("reliable" if verdicts == {True} else
                   "**unreliable**: failed its controls; no conclusion is drawn from its win rates")
        rows.append([name, str(len(summaries)), *cells, verdict])
    what = "; ".join(f"{name}: {a} against {b} (needs {rule})" for name, (a, b, _, rule) in CONTROLS.items())
    return ["## Judges", "", f"Controls, built from the judged prompts and averaged over the judgings: {what}.", "",
            _table(["judge", "judgings", *CONTROLS, "verdict"], rows), ""]


def write_report(root: Path, out: Path | None = None, baseline: str | None = None, wandb: bool = False,
                 annotations: Path | None = None) -> Path:
    runs, common, unreadable = find_runs(root, annotations)
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    groups = arms(runs)
    baseline = baseline_arm(groups, baseline)
    failed = [r for r in runs if r.summary.get("status") != "completed"]
    parts = [f"# neftlab report: {root}", "",
             f"{len(runs)} runs, {len(runs) - len(failed)} completed, {len(failed)} not completed.", "",
             f"Overrides common to all runs: `{' '.join(common) or '(none)'}`", "",
             "## Runs", "", runs_table(runs), ""]
    folded = seeds_table(runs)
    if folded:
        parts += ["## Over seeds (mean ± std of completed runs)", "", folded, ""]
    paired = paired_table(groups, baseline) if baseline is not None else None
    if paired:
        parts += [f"## Paired differences against `{baseline}`", "", PAIRED_NOTE, "", paired, ""]
        if wandb:
            print(f"W&B: paired differences added to the summaries of {push_paired(groups, baseline)} runs")
    elif baseline is None and len(plain_arms(groups)) > 1:
        plain = ", ".join(f"`{arm}`" for arm in plain_arms(groups))
        parts += ["## Paired differences", "", f"Several arms are plain fine-tuning ({plain}): pick the baseline with "
                  "--baseline ARM.", ""]
    if wandb and not paired:
        print("W&B: nothing pushed: no arm is paired with a baseline arm (a baseline arm is the only arm without noise "
              "or pruning, or --baseline ARM; its runs and the others' must share seeds)")
    parts += judges_section(runs)
    parts += search_sections(runs, root, out)
    if failed:
        parts += ["## Not completed", ""] + [f"- `{r.dir}` ({r.summary.get('status')}): {r.summary.get('error', '')}"
                                             for r in failed] + [""]
    if unreadable:
        parts += ["## Unreadable (left out)", ""] + [f"- `{p}`: not valid JSON" for p in unreadable] + [""]
    parts += ["## Plots", ""]
    plot_curves(runs, out / "loss_curves.png")
    parts += ["![loss curves](loss_curves.png)", ""]
    if plot_against(runs, "noise.alpha", "noise.alpha", out / "vs_alpha.png",
                    only=lambda r: r.get("noise.kind") not in (None, "none")):
        parts += ["![final metrics against alpha](vs_alpha.png)", ""]
    if plot_against(runs, "pruning.ratio", "pruning.ratio", out / "vs_pruning_ratio.png",
                    only=lambda r: r.get("pruning.method") not in (None, "off")):
        parts += ["![final metrics against pruning ratio](vs_pruning_ratio.png)", ""]
    if (pair := swept_pair(runs)) and plot_heatmap(runs, pair, out / "heatmap.png"):
        parts += [f"![eval loss over {pair[0]} and {pair[1]}](heatmap.png)", ""]
    lengths = {arm: [n for r in members for n in r.answer_lengths()] for arm, members in groups.items()}
    if plot_lengths(lengths, out / "answer_lengths.png"):
        parts += ["![answer length per arm](answer_lengths.png)", ""]
    if plot_win_vs_length(groups, lengths, baseline, out / "win_rate_vs_length.png"):
        parts += ["![judge win rate against mean answer length](win_rate_vs_length.png)", ""]
    path = out / "report.md"
    rundir.write_text(path, "\n".join(parts))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run, multirun or outputs/ directory")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: ROOT)")
    parser.add_argument("--baseline", metavar="ARM", help="the arm (runs' overrides less the seed, e.g. "
                        "method=finetune) the others are paired against (default: the only arm without noise or "
                        "pruning that trains, if there is exactly one)")
    parser.add_argument("--wandb", action="store_true", help="also add each run's paired differences to its W&B "
                        "run's summary (paired/<measure>), for runs that logged to W&B")
    parser.add_argument("--annotations", type=Path, metavar="DIR", help="AlpacaEval's annotations.json files under "
                        "DIR (of answers written by python -m neftlab.export), paired by seed like neftlab's judge")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    try:
        if args.annotations is not None and not args.annotations.is_dir():
            raise ReportError(f"--annotations {args.annotations}: not a directory")
        path = write_report(args.root, args.out, args.baseline, args.wandb, args.annotations)
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
