"""The offline comparison report: every run under a directory, one row each; runs that differ only by seed folded
into mean ± std; each arm's paired differences from the baseline arm over seeds, with intervals and p-values from
`stats`; the judges; the searches; plots. Written as report.md with its PNGs, each whole, none through a link."""

from __future__ import annotations

from pathlib import Path

from ..core.files import make_dirs, write_text
from .annotations import read_annotations
from .paired import PAIRED_NOTE, paired_table
from .plots import (plot_against, plot_arm_curves, plot_curves, plot_heatmap, plot_lengths, plot_win_vs_length,
                    swept_pair)
from .runs import arms, baseline_arm, find_runs, label_judgings, plain_arms
from .search import search_sections
from .tables import judges_section, runs_table, seeds_table
from .wandb_push import push_paired
from .wandb_workspace import SPEC, dashboard


def write_report(root: Path, out: Path | None = None, baseline: str | None = None, wandb: bool = False,
                 annotations: Path | None = None) -> Path:
    runs, common, unreadable = find_runs(root)
    if annotations is not None:
        read_annotations(annotations, runs)
    label_judgings(runs)
    out = make_dirs(out or root, root=out or root)
    groups = arms(runs)
    baseline = baseline_arm(groups, baseline)
    failed = [r for r in runs if r.summary.get("status") != "completed"]
    parts = [f"# neftlab report: {root}", "",
             f"{len(runs)} runs, {len(runs) - len(failed)} completed, {len(failed)} not completed.", "",
             f"Overrides common to all runs: `{' '.join(common) or '(none)'}`", "",
             "## Runs", "", runs_table(runs, root), ""]
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
    if plot_arm_curves(groups, out / "epoch_curves.png"):
        parts += ["![evaluations during training per arm, mean over seeds with their range](epoch_curves.png)", ""]
    if plot_against(runs, "noise.alpha", "noise.alpha", out / "vs_alpha.png",
                    only=lambda r: r.get("noise.kind") not in (None, "none")):
        parts += ["![final metrics against alpha](vs_alpha.png)", ""]
    if plot_against(runs, "pruning.ratio", "pruning.ratio", out / "vs_pruning_ratio.png",
                    only=lambda r: r.get("pruning.kind") not in (None, "off")):
        parts += ["![final metrics against pruning ratio](vs_pruning_ratio.png)", ""]
    if (pair := swept_pair(runs)) and plot_heatmap(runs, pair, out / "heatmap.png"):
        parts += [f"![eval loss over {pair[0]} and {pair[1]}](heatmap.png)", ""]
    lengths = {arm: [n for r in members for n in r.answer_lengths()] for arm, members in groups.items()}
    if plot_lengths(lengths, out / "answer_lengths.png"):
        parts += ["![answer length per arm](answer_lengths.png)", ""]
    if plot_win_vs_length(groups, lengths, baseline, out / "win_rate_vs_length.png"):
        parts += ["![judge win rate against mean answer length](win_rate_vs_length.png)", ""]
    path = out / "report.md"
    write_text(path, "\n".join(parts), root=out)
    if wandb:
        dashboard(runs, groups, baseline, "\n".join(parts), root, out / SPEC)
    return path
