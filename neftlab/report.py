"""Offline comparison report: `python -m neftlab.report <multirun dir, or outputs/> [--out DIR]`.

Reads every run's summary.json, metrics.jsonl and .hydra/ files under the directory and writes
report.md (one row per run, then runs that differ only by seed folded into mean ± std) with
PNG plots of the loss curves and of the final metrics against alpha and pruning ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from tqdm.auto import tqdm

COLUMNS = [  # (summary key, column title, format)
    ("eval/loss", "eval loss", "{:.4f}"), ("eval/perplexity", "ppl", "{:.2f}"), ("eval/accuracy", "acc", "{:.4f}"),
    ("eval/macro_f1", "macro-F1", "{:.4f}"), ("eval/response_length", "resp len", "{:.1f}"),
    ("eval/distinct_2", "dist-2", "{:.3f}"), ("eval/distinct_4", "dist-4", "{:.3f}"),
    ("pruning/sparsity", "sparsity", "{:.3f}"), ("efficiency/param_reduction", "param red.", "{:.3f}"),
    ("efficiency/latency_ms_per_token", "ms/token", "{:.2f}"),
    ("efficiency/unpruned_latency_ms_per_token", "ms/token unpruned", "{:.2f}"),
    ("efficiency/latency_ms_per_sample", "ms/sample", "{:.2f}"),
    ("stability/loss_std", "loss std", "{:.4f}"), ("stability/half_drop_step", "half-drop step", "{:.0f}"),
]


class ReportError(ValueError):
    pass


@dataclass
class Run:
    dir: Path
    overrides: list[str]  # the job's command-line overrides
    summary: dict
    config: dict
    history: list[dict] = field(default_factory=list)
    label: str = ""  # its overrides less those every run shares

    @property
    def label_without_seed(self) -> str:
        return ",".join(o for o in self.label.split(",") if not o.startswith("seed=")) or "(common)"

    def get(self, dotted: str):
        node = self.config
        for part in dotted.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node


def _read_run(summary_path: Path) -> Run:
    run_dir = summary_path.parent
    summary = json.loads(summary_path.read_text())
    hydra_dir = run_dir / ".hydra"
    overrides = yaml.safe_load((hydra_dir / "overrides.yaml").read_text()) if (hydra_dir / "overrides.yaml").exists() else []
    config = yaml.safe_load((hydra_dir / "config.yaml").read_text()) if (hydra_dir / "config.yaml").exists() else {}
    history = []
    if (run_dir / "metrics.jsonl").exists():
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return Run(run_dir, [o for o in overrides if not o.startswith("hydra.")], summary, config or {}, history)


def find_runs(root: Path) -> tuple[list[Run], list[str]]:
    """The runs under root, labelled by what sets them apart, and the overrides they all share."""
    paths = sorted(root.rglob("summary.json"))
    if not paths:
        raise ReportError(f"no runs under {root}: no */summary.json (point it at a run, multirun or outputs/ directory)")
    runs = [_read_run(p) for p in tqdm(paths, desc="Reading runs", unit="run")]
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if len(runs) > 1 else []
    for r in runs:
        r.label = ",".join(o for o in r.overrides if o not in common) or "(common)"
    return runs, common


def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    return fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _used_columns(runs: list[Run]):
    return [c for c in COLUMNS if any(isinstance(r.summary.get(c[0]), (int, float)) for r in runs)]


def runs_table(runs: list[Run]) -> str:
    cols = _used_columns(runs)
    rows = [[r.label, str(r.dir.name), *(_cell(r.summary.get(k), f) for k, _, f in cols), r.summary.get("status", "")]
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
            values = [m.summary[key] for m in members if isinstance(m.summary.get(key), (int, float))]
            cells.append("" if not values else
                         f"{_cell(statistics.fmean(values), fmt)} ± {_cell(statistics.pstdev(values), fmt)}")
        rows.append([label, str(len(members)), *cells])
    return _table(["config", "seeds", *(t for _, t, _ in cols)], rows)


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


def plot_against(runs: list[Run], key: str, title: str, path: Path, only) -> bool:
    """Final eval loss and accuracy against a config value, mean over seeds with their std as error bars."""
    points = defaultdict(lambda: defaultdict(list))
    for r in runs:
        x = r.get(key)
        if only(r) and isinstance(x, (int, float)) and r.summary.get("status") == "completed":
            for metric in ("eval/loss", "eval/accuracy"):
                if isinstance(r.summary.get(metric), (int, float)):
                    points[metric][x].append(r.summary[metric])
    if len({x for metric in points.values() for x in metric}) < 2:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(points), figsize=(6 * len(points), 4), squeeze=False)
    for ax, (metric, by_x) in zip(axes[0], sorted(points.items())):
        xs = sorted(by_x)
        ax.errorbar(xs, [statistics.fmean(by_x[x]) for x in xs], yerr=[statistics.pstdev(by_x[x]) for x in xs],
                    marker="o", capsize=3)
        ax.set(title=f"{metric} against {title}", xlabel=title)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return True


def write_report(root: Path, out: Path | None = None) -> Path:
    runs, common = find_runs(root)
    out = out or root
    out.mkdir(parents=True, exist_ok=True)
    failed = [r for r in runs if r.summary.get("status") != "completed"]
    parts = [f"# neftlab report: {root}", "",
             f"{len(runs)} runs, {len(runs) - len(failed)} completed, {len(failed)} not completed.", "",
             f"Overrides common to all runs: `{' '.join(common) or '(none)'}`", "",
             "## Runs", "", runs_table(runs), ""]
    folded = seeds_table(runs)
    if folded:
        parts += ["## Over seeds (mean ± std of completed runs)", "", folded, ""]
    if failed:
        parts += ["## Not completed", ""] + [f"- `{r.dir}` ({r.summary.get('status')}): {r.summary.get('error', '')}"
                                             for r in failed] + [""]
    parts += ["## Plots", ""]
    plot_curves(runs, out / "loss_curves.png")
    parts += ["![loss curves](loss_curves.png)", ""]
    if plot_against(runs, "noise.alpha", "noise.alpha", out / "vs_alpha.png",
                    only=lambda r: r.get("noise.kind") not in (None, "none")):
        parts += ["![final metrics against alpha](vs_alpha.png)", ""]
    if plot_against(runs, "pruning.ratio", "pruning.ratio", out / "vs_pruning_ratio.png",
                    only=lambda r: r.get("pruning.method") not in (None, "off")):
        parts += ["![final metrics against pruning ratio](vs_pruning_ratio.png)", ""]
    path = out / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.report", description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="a run, multirun or outputs/ directory")
    parser.add_argument("--out", type=Path, help="where report.md and the plots go (default: ROOT)")
    args = parser.parse_args(argv)
    if not args.root.is_dir():
        print(f"error: {args.root} is not a directory", file=sys.stderr)
        return 2
    try:
        path = write_report(args.root, args.out)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
