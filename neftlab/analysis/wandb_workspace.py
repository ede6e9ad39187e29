"""The study's W&B dashboard, built from its run index with W&B's own library (`wandb-workspaces`): a workspace
whose sections follow the study's question (training curves by arm, final measures per arm and over the swept
numbers, the search space, the answers, the paired differences, noise and pruning internals) and a report for
sharing it. Both are built as the library's models, without a server: their spec is written into the sweep's
directory, and `python -m neftlab.workspace SPEC` saves them once the runs are synced. Each panel names only
metrics the runs have; a section with nothing to show is left out."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws
from wandb_workspaces import expr
from wandb_workspaces.reports.v2 import internal as report_model
from wandb_workspaces.workspaces import internal as workspace_model

from ..core import measures as declared
from ..core.errors import first_line
from ..core.files import read_json, write_json
from ..tracking.wandb_run import project as wandb_project
from ..tracking.wandb_run import wandb_mode
from .paired import paired_measures, paired_table
from ..core.measures import is_number
from .runs import Run
from .tables import judges_section
from .wandb_push import paired_key

SPEC = "wandb_workspace.json"
FORMAT = 1
STEP = declared.STEP
ANSWERS = "answers/final"
NOT_SWEPT = ("output_root", "logger", "search")  # differ between runs without being the study's question


@dataclass
class Study:
    """What the dashboard is built from: the W&B runs' project, entity and groups, the swept config keys (those
    that set arms apart, and the seed), the metrics the runs have, and the paired differences' markdown."""
    project: str
    entity: str
    groups: list[str]
    swept: list[str]
    numeric: list[str]
    history: set[str]
    summary: set[str]
    answers: bool
    paired: list[str]
    paired_markdown: str = ""

    @property
    def arm_keys(self) -> list[str]:
        return [k for k in self.swept if k != "seed"]


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def swept_keys(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between runs, under a key some job's overrides set (`noise=uniform_10`
    sets noise.kind and noise.alpha): the sweep's own dimensions, not keys that differ by accident."""
    flat = [_flat(r.config) for r in runs]
    named = {o.split("=", 1)[0].lstrip("+~") for r in runs for o in r.overrides}
    keys = sorted(set().union(*flat))
    return [k for k in keys
            if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1
            and any(k == n or k.startswith(n + ".") for n in named)
            and not any(k == n or k.startswith(n + ".") for n in NOT_SWEPT)]


def wandb_runs(runs: list[Run]) -> list[Run]:
    return [r for r in runs if (r.config.get("logger") or {}).get("kind") == "wandb"]


def study(runs: list[Run], paired_keys: list[str], paired_markdown: str = "") -> Study:
    """The study of the runs that logged to W&B (a sweep's jobs are its W&B group, named after the sweep's
    directory)."""
    logged = wandb_runs(runs)
    logger = logged[0].config.get("logger") or {}
    swept = swept_keys(logged)
    flat = [_flat(r.config) for r in logged]
    numeric = [k for k in swept if k != "seed" and all(is_number(f.get(k)) for f in flat)]
    history = {k for r in logged for event in r.history for k, v in event.items() if is_number(v)}
    summary = {k for r in logged for k, v in r.summary.items() if is_number(v)}
    summary |= {declared.vs_baseline(k) if baseline != "reference" else k
                for r in logged for judged in r.judges.values() for baseline, s in judged.items()
                for k, v in s.items() if is_number(v)}
    return Study(project=wandb_project(logger.get("project")), entity=logger.get("entity") or "",
                 groups=sorted({r.dir.parent.name for r in logged}), swept=swept, numeric=numeric, history=history,
                 summary=summary, answers=any(r.answer_lengths() for r in logged), paired=paired_keys,
                 paired_markdown=paired_markdown)


def _group_filter(s: Study):
    group = expr.Metric("Group")
    return expr.And(group == s.groups[0] if len(s.groups) == 1 else group.isin(s.groups))


def _band(**kwargs):
    """A line or bar per arm (the runset's grouping), the mean over seeds with their min-max range."""
    return {"groupby_aggfunc": "mean", "groupby_rangefunc": "minmax", **kwargs}


def curves() -> list[str]:
    """The training section's curves over the step: the declared curves that are not a method's internals."""
    return [m.key for m in declared.declared() if m.curve and m.stage not in declared.INTERNALS]


def final_measures() -> list[str]:
    """The evaluation section's measures, in their declared order: the report's columns (a user's included), then
    the judges' win rates against the references and against the baseline run's answers."""
    judged = [m.key for m in declared.declared("judge") if m.direction]
    return ([m.key for m in declared.declared() if m.column] + judged
            + [declared.vs_baseline(k) for k in judged])


def internals() -> list[str]:
    """The noise and pruning internals: the declared curves of those stages (a noise kind declares its own)."""
    return [m.key for m in declared.declared(*declared.INTERNALS) if m.curve]


def sections(s: Study) -> list[tuple[str, list]]:
    """(section name, panels) for what the study has, in the order of its question."""
    measures = [m for m in final_measures() if m in s.summary] + sorted(m for m in s.summary
                                                                       if m.startswith("harness/"))
    out = [
        ("Training", [wr.LinePlot(title=m, x=STEP, y=[m], **_band()) for m in curves() if m in s.history]),
        ("Evaluation", [wr.BarPlot(title=m, metrics=[m], **_band()) for m in measures]
         + [wr.ScatterPlot(title=f"{m} over {k}", x=wr.Config(k), y=wr.SummaryMetric(m), running_ymean=True)
            for k in s.numeric for m in measures]),
        ("Search space", [wr.ParallelCoordinatesPlot(
            title="swept keys and outcomes",
            columns=[wr.ParallelCoordinatesPlotColumn(metric=wr.Config(k)) for k in s.swept]
            + [wr.ParallelCoordinatesPlotColumn(metric=wr.SummaryMetric(m)) for m in measures])]
         if s.swept and measures else []),
        ("Answers", [wr.WeavePanelSummaryTable(table_name=ANSWERS)] if s.answers else []),
        ("Paired differences", [wr.BarPlot(title=k, metrics=[k], **_band()) for k in s.paired]
         + ([wr.MarkdownPanel(markdown=s.paired_markdown)] if s.paired and s.paired_markdown else [])),
        ("Noise and pruning internals", [wr.LinePlot(title=m, x=STEP, y=[m], **_band())
                                         for m in internals() if m in s.history]),
    ]
    return [(name, panels) for name, panels in out if panels]


def workspace(s: Study) -> ws.Workspace:
    name = s.groups[0] if len(s.groups) == 1 else f"{s.groups[0]} and {len(s.groups) - 1} more"
    return ws.Workspace(
        entity=s.entity, project=s.project, name=f"neftlab: {name}",
        sections=[ws.Section(name=title, panels=panels, is_open=True) for title, panels in sections(s)],
        runset_settings=ws.RunsetSettings(filters=_group_filter(s), groupby=[ws.Config(k) for k in s.arm_keys]),
        settings=ws.WorkspaceSettings(x_axis=STEP, max_runs=100))


def report(s: Study, report_md: str) -> wr.Report:
    """A W&B Report for sharing a finished study: report.md's text, and the training and evaluation panels over
    the study's runs."""
    key = dict(sections(s))
    panels = key.get("Training", []) + key.get("Evaluation", [])[:6] + key.get("Paired differences", [])[:4]
    runset = wr.Runset(entity=s.entity, project=s.project, name="study", filters=_group_filter(s),
                       groupby=[f"config.{k}" for k in s.arm_keys])  # a report's runset names the section
    return wr.Report(entity=s.entity, project=s.project, title=f"neftlab: {', '.join(s.groups)}",
                     description="Built by python -m neftlab.report --wandb",
                     blocks=[wr.MarkdownBlock(text=report_md), wr.PanelGrid(runsets=[runset], panels=panels)])


def panel_metrics(w: ws.Workspace) -> set[str]:
    """Every metric a workspace's panels name (config keys apart), for checking them against the runs."""
    names = set()
    for section in w.sections:
        for panel in section.panels:
            fields = [c.metric for c in getattr(panel, "columns", None) or []]
            for axis in ("x", "y", "metrics"):
                value = getattr(panel, axis, None)
                fields += value if isinstance(value, list) else [value]
            names |= {f if isinstance(f, str) else f.name for f in fields
                      if f is not None and not isinstance(f, wr.Config)}
    return names - {STEP}


def write_spec(path: Path, w: ws.Workspace, r: wr.Report | None) -> None:
    """The workspace's and report's models as W&B's library serialises them."""
    dump = lambda obj: json.loads(obj._to_model().model_dump_json(by_alias=True, exclude_none=True))  # noqa: E731
    write_json(path, {"format": FORMAT, "workspace": dump(w), "report": dump(r) if r is not None else None},
               root=path.parent)


def read_spec(path: Path) -> tuple[ws.Workspace, wr.Report | None]:
    """The workspace and report of a spec written by `write_spec`."""
    spec = read_json(path, root=path.parent)
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or not isinstance(spec.get("workspace"), dict):
        raise ValueError(f"{path}: not a workspace spec of neftlab's (format {FORMAT}); write it again with "
                         "python -m neftlab.report SWEEP --wandb")
    w = ws.Workspace._from_model(workspace_model.View.model_validate(spec["workspace"]))
    r = spec.get("report")
    return w, wr.Report._from_model(report_model.ReportViewspec.model_validate(r)) if r else None


def save(w: ws.Workspace, r: wr.Report | None, entity: str | None = None) -> list[str]:
    """Save both to W&B (needs credentials and the runs synced); their URLs. The entity is `entity`, else the
    spec's (logger.entity), else the account's default."""
    import wandb
    entity = entity or w.entity or wandb.Api().default_entity
    w.entity = entity
    urls = [w.save().url]
    if r is not None:
        r.entity = entity
        for block in r.blocks:
            for runset in getattr(block, "runsets", []):
                runset.entity = entity
        urls.append(r.save().url)
    return urls


def sync_command(runs: list[Run], root: Path) -> str:
    """`wandb sync` of the runs' offline files, as a glob bash expands (`**` needs globstar)."""
    parents = sorted({str(r.dir.parent.relative_to(root)) if r.dir != root else "." for r in runs})
    patterns = [f"{root}/{p}/*/wandb/offline-run-*".replace("/./", "/") if p != "." else f"{root}/wandb/offline-run-*"
                for p in parents]
    return "wandb sync " + " ".join(patterns)


def dashboard(runs: list[Run], groups: dict[str, list[Run]], baseline: str | None, report_md: str, root: Path,
              path: Path) -> Path | None:
    """Build the study's workspace and report, write their spec to `path`, and save them where W&B is online;
    None when no run logged to W&B."""
    logged = wandb_runs(runs)
    if not logged:
        print("W&B: no run here logged to W&B (logger=wandb): no workspace built")
        return None
    rows = paired_measures(groups, baseline) if baseline is not None else []
    markdown = "\n".join([f"### Paired differences against `{baseline}`", "", paired_table(groups, baseline) or "",
                          "", *judges_section(runs)]) if rows else ""
    s = study(logged, sorted({paired_key(row.title) for row in rows}), markdown)
    w, r = workspace(s), report(s, report_md)
    write_spec(path, w, r)
    later = f"python -m neftlab.workspace {path}"
    if wandb_mode((logged[0].config.get("logger") or {}).get("mode", "auto")) == "online":
        try:
            for url in save(w, r):
                print(f"W&B: saved {url}")
            return path
        except Exception as e:  # noqa: BLE001 - W&B's errors (network, auth, unsynced runs): the spec is written
            print(f"W&B: the workspace was not saved ({first_line(e)}); its spec is in {path}: {later}")
            return path
    print(f"W&B: wrote the study's workspace and report to {path} ({len(logged)} runs of W&B group "
          f"{', '.join(s.groups)}). "
          f"Once the runs are uploaded ({sync_command(logged, root)}), save them with: {later}")
    return path
