"""The trials of optimizing searches: each trial's objectives, the best trial or the Pareto front, and a plot of
the front for two objectives."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from ..config.objectives import QUALITY, directions_of, objective_keys, values
from .plots import save
from .runs import Run
from .tables import markdown_table, where


def pareto_front(points: list[list[float]], directions: list[str]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [[s * v for s, v in zip(signs, p)] for p in points]

    def dominates(a, b):
        return all(x >= y for x, y in zip(a, b)) and any(x > y for x, y in zip(a, b))

    return [not any(dominates(other, p) for other in scored) for p in scored]


def search_sections(runs: list[Run], root: Path, out: Path) -> list[str]:
    """The trials of optimizing sweeps, per set of objectives: each trial's values, marked when on the Pareto
    front (with one objective: the best trial), and for two objectives a plot of the front."""
    studies = defaultdict(list)
    for r in runs:
        if r.searched:
            judged = r.get("eval.judge.model") is not None
            studies[tuple(objective_keys(r.get("search.objectives") or [QUALITY], judged))].append(r)
    parts = []
    for n, (keys, trials) in enumerate(studies.items()):
        directions = directions_of(list(keys))
        found = [(r, values(r.summary, list(keys))) for r in trials]
        done = [(r, v) for r, v in found if v is not None]
        front = {id(r): on for (r, _), on in zip(done, pareto_front([v for _, v in done], directions))}
        sign = 1.0 if directions[0] == "maximize" else -1.0
        order = sorted(done, key=lambda rv: (not front[id(rv[0])], -sign * rv[1][0])) + [
            (r, v) for r, v in found if v is None]
        arrows = [f"{k} ({'↑' if d == 'maximize' else '↓'})" for k, d in zip(keys, directions)]
        rows = [[r.label, where(r, root),
                 *(["{:.4f}".format(x) for x in v] if v else [""] * len(keys)), r.summary.get("status", ""),
                 "✓" if v and front[id(r)] else ""] for r, v in order]
        what = "best" if len(keys) == 1 else "on the Pareto front"
        parts += [f"## Search: {', '.join(keys)}", "",
                  f"{len(trials)} trials, {len(done)} with values ({len(trials) - len(done)} failed or without the "
                  f"metric: Optuna recorded them as failed). ✓ = {what}.", "",
                  markdown_table(["trial", "dir", *arrows, "status", what], rows), ""]
        parts += best_of_each_option(done, keys, sign)
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
    save(fig, path)


def best_of_each_option(done: list[tuple[Run, list[float]]], keys: tuple, sign: float) -> list[str]:
    """Of a one-objective search over several noise options (hparams_search=perturbations, overfit): each option's
    best trial, and its settings as a command line's overrides, to confirm against no noise over seeds."""
    if len(keys) != 1:
        return []
    best: dict[str, tuple[Run, list[float]]] = {}
    for r, v in done:  # by the noise option drawn (uniform_kl is a choice of its own, of kind uniform)
        kind = next((o.split("=", 1)[1] for o in r.overrides if o.startswith("noise=")), r.get("noise.kind"))
        if kind is not None and (kind not in best or sign * v[0] > sign * best[kind][1][0]):
            best[kind] = (r, v)
    if len(best) < 2:
        return []
    rows = [[kind, "{:.4f}".format(v[0]), "`" + " ".join(o for o in r.overrides if o.split("=")[0].split(".")[0]
                                                        in ("noise", "pruning")) + "`"]
            for kind, (r, v) in sorted(best.items(), key=lambda kv: -sign * kv[1][1][0])]
    return ["### Best of each noise option", "", "Each option's best trial; confirm it against no noise over seeds "
            "with its settings (docs/results.md).", "", markdown_table(["noise", keys[0], "settings"], rows), ""]
