"""The study's W&B workspace and report: built offline from the run index, every panel naming a metric the runs
logged, serialised by W&B's own library, saved later by `python -m neftlab.workspace`."""

import json

import pytest
import wandb_workspaces.reports.v2 as wr
import wandb_workspaces.workspaces as ws

from neftlab import workspace as workspace_cli
from neftlab.analysis import wandb_workspace as workspace
from neftlab.analysis.comparison import write_report
from neftlab.core.measures import Measure, register
from tests.helpers import TINY, sweep
from tests.wandb_records import offline_run


def logged_keys(run_dir) -> set[str]:
    """Every history and summary key of a run's offline W&B sessions (training, then report --wandb's)."""
    keys = set()
    sessions = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    for n in range(len(sessions)):
        record = offline_run(run_dir, session=n)
        keys |= set().union(*record["history"], record["summary"])
    return keys


@pytest.mark.slow
def test_a_tiny_neftune_repro_study_gets_a_workspace_of_what_it_logged(tmp_path):
    root = tmp_path / "neftune_repro_1"
    jobs = sweep("experiment=neftune_repro", "model=llama_tiny", "logger=wandb", "logger.mode=offline", *TINY,
                 grid={"noise": ["none", "uniform"], "seed": [1, 2, 3]}, out_dir=root)
    assert all(summary["status"] == "completed" for _, summary in jobs)
    write_report(root, wandb=True)
    w, r = workspace.read_spec(root / workspace.SPEC)

    assert w.runset_settings.filters == 'Metric("Group") == \'neftune_repro_1\''
    arm_keys = [g.name for g in w.runset_settings.groupby]
    assert "noise.kind" in arm_keys and all(k.startswith("noise.") for k in arm_keys)
    assert [s.name for s in w.sections] == ["Training", "Evaluation", "Search space", "Answers", "Paired differences",
                                             "Noise and pruning internals"]
    named = workspace.panel_metrics(w)
    assert {"train/loss", "eval/loss", "eval/train_loss_noise_off", "eval/response_length", "noise/alpha"} <= named
    assert any(m.startswith("paired/") for m in named)
    logged = set().union(*(logged_keys(root / str(n)) for n in range(6)))
    assert named <= logged, named - logged
    (parallel,) = [p for s in w.sections for p in s.panels if isinstance(p, wr.ParallelCoordinatesPlot)]
    columns = [c.metric.name for c in parallel.columns if isinstance(c.metric, wr.Config)]
    assert set(columns) == {*arm_keys, "seed"}
    (answers,) = [p for s in w.sections for p in s.panels if isinstance(p, wr.WeavePanelSummaryTable)]
    assert answers.table_name == "answers/final"
    markdown = [p.markdown for s in w.sections for p in s.panels if isinstance(p, wr.MarkdownPanel)]
    assert "Paired differences against `noise=none`" in markdown[0]
    assert r.title == "neftlab: neftune_repro_1" and "# neftlab report" in r.blocks[0].text


def study(**changes) -> workspace.Study:
    fields = dict(project="neftlab", entity="", groups=["alpha_sweep_1"], swept=["noise.alpha", "seed"],
                  numeric=["noise.alpha"], history={"train/loss", "eval/loss", "noise/alpha"},
                  summary={"eval/loss", "eval/response_length"}, answers=True, paired=["paired/eval_loss"],
                  paired_markdown="| arm | p |")
    return workspace.Study(**{**fields, **changes})


def test_the_library_builds_and_serialises_the_workspace_and_report(tmp_path):
    """W&B's own model of both, through its JSON and back: a wandb-workspaces release that changes the model
    breaks this, not a user's dashboard."""
    w, r = workspace.workspace(study()), workspace.report(study(), "# neftlab report")
    path = tmp_path / workspace.SPEC
    workspace.write_spec(path, w, r)
    spec = json.loads(path.read_text())
    assert spec["workspace"]["project"] == "neftlab" and spec["report"]["displayName"] == "neftlab: alpha_sweep_1"
    again, report = workspace.read_spec(path)
    assert [s.name for s in again.sections] == [s.name for s in w.sections]
    assert workspace.panel_metrics(again) == workspace.panel_metrics(w) == {
        "train/loss", "eval/loss", "eval/response_length", "noise/alpha", "paired/eval_loss"}
    assert again.runset_settings.groupby == [ws.Config("noise.alpha")]  # the arm: the seed is what varies within
    scatter = [p for s in again.sections for p in s.panels if isinstance(p, wr.ScatterPlot)]
    assert [(p.x.name, p.y.name) for p in scatter] == [("noise.alpha", "eval/loss"),
                                                         ("noise.alpha", "eval/response_length")]
    (grid,) = [b for b in spec["report"]["spec"]["blocks"] if b["type"] == "panel-grid"]
    grouping = grid["metadata"]["runSets"][0]["grouping"]
    assert grouping == [{"section": "config", "name": "noise.value.alpha"}]
    assert report.blocks[0].text == "# neftlab report"


def test_a_section_with_nothing_to_show_is_left_out():
    names = [name for name, _ in workspace.sections(study(answers=False, paired=[], history={"train/loss"}))]
    assert names == ["Training", "Evaluation", "Search space"]


def test_panels_follow_the_declarations_a_noise_kinds_and_a_users_included():
    """A noise kind's internals and a user's measure get their panels from their declarations alone."""
    register(Measure("noise/laplace_scale", "Laplace scale", stage="noise", column=False, curve=True),
             Measure("eval/questions", "answers asking back", "minimize", "{:.2f}", paired=True))
    s = study(history={"train/loss", "eval/loss", "noise/laplace_scale", "noise/alpha", "noise/direction"},
              summary={"eval/loss", "eval/questions", "judge_vs_baseline/win_rate", "noise/alpha"})
    found = dict(workspace.sections(s))
    assert [p.title for p in found["Training"]] == ["train/loss", "eval/loss"]
    assert [p.title for p in found["Evaluation"] if isinstance(p, wr.BarPlot)] == [
        "eval/loss", "eval/questions", "judge_vs_baseline/win_rate"]
    assert [p.title for p in found["Noise and pruning internals"]] == ["noise/alpha", "noise/laplace_scale"]


def test_several_groups_are_one_filter():
    w = workspace.workspace(study(groups=["a", "b"]))
    assert w.runset_settings.filters == "Metric(\"Group\") in ['a', 'b']" and w.name == "neftlab: a and 1 more"


def test_the_command_saves_the_spec_with_the_entity_and_prints_the_urls(tmp_path, monkeypatch, capsys):
    path = tmp_path / workspace.SPEC
    workspace.write_spec(path, workspace.workspace(study()), workspace.report(study(), "text"))
    saved = []

    def save(self, *args, **kwargs):
        saved.append((type(self).__name__, self.entity))
        return self
    monkeypatch.setattr(ws.Workspace, "save", save)
    monkeypatch.setattr(wr.Report, "save", save)
    monkeypatch.setattr(ws.Workspace, "url", property(lambda self: f"https://wandb.ai/{self.entity}/workspace"))
    monkeypatch.setattr(wr.Report, "url", property(lambda self: f"https://wandb.ai/{self.entity}/report"))
    assert workspace_cli.main([str(path), "--entity", "lab"]) == 0
    assert saved == [("Workspace", "lab"), ("Report", "lab")]
    assert capsys.readouterr().out.split() == ["https://wandb.ai/lab/workspace", "https://wandb.ai/lab/report"]


def test_a_spec_that_is_not_one_is_refused_in_one_line(tmp_path, capsys):
    path = tmp_path / workspace.SPEC
    path.write_text('{"format": 1, "workspace": {"entity": 3}}')
    assert workspace_cli.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    path.write_text("[]")
    assert workspace_cli.main([str(path)]) == 2
    assert "not a workspace spec of neftlab's" in capsys.readouterr().err
