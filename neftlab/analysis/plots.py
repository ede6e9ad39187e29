"""The report's plots: loss curves, final metrics against alpha and the pruning ratio, a heat map over two swept
keys, answer lengths per arm, and win rate against answer length. Each PNG is written whole (`files`)."""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..core import measures
from ..core.files import atomic_write
from .paired import paired_runs
from ..core.measures import is_number
from .runs import Run


def save(fig, path: Path) -> None:
    """The figure as a PNG at `path`, written whole and never through a link."""
    import matplotlib.pyplot as plt
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"), root=path.parent)
    plt.close(fig)


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
    save(fig, path)
    return True


def _judged_wins(groups: dict[str, list[Run]], baseline: str | None) -> dict[str, dict[str, list[float]]]:
    """Win rates by series ("<source> vs reference", "<source> vs <baseline arm>") and arm; the baseline arm scores
    0.5 against itself."""
    series = defaultdict(lambda: defaultdict(list))
    for arm, members in groups.items():
        for r in members:
            for source, judged in r.judges.items():
                if is_number(win := judged.get("reference", {}).get(measures.WIN_RATE.key)):
                    series[f"{source} vs reference"][arm].append(win)
    if baseline is not None:
        for run, base in paired_runs(groups, baseline):
            for source, judged in run.judges.items():
                if is_number(win := judged.get(str(base.dir.resolve()), {}).get(measures.WIN_RATE.key)):
                    series[f"{source} vs {baseline}"][run.label_without_seed].append(win)
                    series[f"{source} vs {baseline}"][baseline] = [0.5]
    return series


def _mean_length(members: list[Run], lengths: list[int]) -> float | None:
    """From the answers of the final step, else from the runs' mean answer length."""
    key = measures.RESPONSE_LENGTH.key
    values = lengths or [r.summary[key] for r in members if is_number(r.summary.get(key))]
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
    save(fig, path)
    return True


def plot_curves(runs: list[Run], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (train_ax, eval_ax) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in runs:
        train, evals = ([(m["step"], m[key]) for m in r.history if is_number(m.get(key))]
                        for key in (measures.TRAIN_LOSS.key, measures.EVAL_LOSS.key))
        if train:
            train_ax.plot(*zip(*train), label=r.label, linewidth=1)
        if evals:
            eval_ax.plot(*zip(*evals), marker="o", label=r.label, linewidth=1)
    for ax, title in ((train_ax, measures.TRAIN_LOSS.label), (eval_ax, measures.EVAL_LOSS.label)):
        ax.set(title=title, xlabel="step")
        ax.grid(alpha=0.3)
    if len(runs) <= 20:
        fig.legend(*eval_ax.get_legend_handles_labels(), loc="lower center", ncol=2, fontsize=7)
        fig.subplots_adjust(bottom=0.2 + 0.035 * ((len(runs) + 1) // 2))
    save(fig, path)


def plot_arm_curves(groups: dict[str, list[Run]], path: Path) -> bool:
    """The evaluations during training per arm, against the epoch: the eval loss, the noise-off training loss and
    their gap, a line per arm at the mean over its seeds with their min-max band. False when no arm's runs were
    evaluated twice or more."""
    shown = (measures.EVAL_LOSS, measures.NOISE_OFF_LOSS, measures.GAP)
    series = {}
    for arm, members in groups.items():
        by_epoch = defaultdict(lambda: defaultdict(list))
        for r in members:
            for e in r.evaluations():
                for key in (m.key for m in shown):
                    if is_number(e.get(key)):
                        by_epoch[key][e.get(measures.EPOCH, e["step"])].append(e[key])
        if any(len(points) >= 2 for points in by_epoch.values()):
            series[arm] = by_epoch
    if not series:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, (key, title) in zip(axes, ((m.key, m.label) for m in shown)):
        for arm in sorted(series, key=natural):
            points = sorted(series[arm][key].items())
            if not points:
                continue
            x = [p for p, _ in points]
            line, = ax.plot(x, [statistics.fmean(v) for _, v in points], marker="o", label=arm, linewidth=1.2)
            ax.fill_between(x, [min(v) for _, v in points], [max(v) for _, v in points], color=line.get_color(),
                            alpha=0.15)
        ax.set(title=title, xlabel="epoch")
        ax.grid(alpha=0.3)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8)
    fig.subplots_adjust(bottom=0.22)
    save(fig, path)
    return True


SERIES_KEYS = ("noise.kind", "pruning.kind", "noise.alpha", "pruning.ratio")  # what sets a curve apart
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
    series per combination of the other keys that set runs apart (noise kind, pruning kind, and the other of
    alpha and ratio when it takes a few values), and whether a series joins its points (False when a key with
    many values, a search's, was left out of the series: its points are not one curve)."""
    done = [r for r in runs if only(r) and is_number(r.get(key)) and r.summary.get("status") == "completed"]
    others = [k for k in SERIES_KEYS if k != key and len({str(r.get(k)) for r in done}) > 1]
    split = [k for k in others if len({str(r.get(k)) for r in done}) <= FEW]
    points = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in done:
        series = ", ".join(f"{k}={r.get(k)}" for k in split) or "all runs"
        for metric in (measures.EVAL_LOSS.key, measures.ACCURACY.key):
            if is_number(r.summary.get(metric)):
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
    save(fig, path)
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
    loss = measures.EVAL_LOSS
    done = [r for r in runs if r.summary.get("status") == "completed" and is_number(r.summary.get(loss.key))
            and all(is_number(r.get(k)) for k in keys)]
    cells = defaultdict(list)
    for r in done:
        cells[r.get(keys[0]), r.get(keys[1])].append(r.summary[loss.key])
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
    ax.set(xlabel=keys[0], ylabel=keys[1], title=f"final {loss.label}, mean over seeds")
    fig.colorbar(image, ax=ax, label=loss.label)
    save(fig, path)
    return True
