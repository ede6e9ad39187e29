"""The run index: every neftlab run under a directory, read as it is on disk (summary, config, history, judgings),
labelled by what sets it apart, grouped into arms and paired by seed. Nothing in a directory handed over is
trusted: no link below it is followed, YAML is read safely, and a directory with no neftlab run is told as such."""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from ..config.compose import renamed
from ..core import measures, rundir
from ..core.measures import is_number
from ..core.errors import NeftlabError
from ..core.files import link_below, read_json, read_jsonl, read_yaml
from ..methods import noise

log = logging.getLogger(__name__)

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
    searched: bool = False  # a trial of an optimizing sweep (hydra/sweeper=neftlab_optuna)

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
        return (self.get("noise.kind") == "none" and self.get("pruning.kind") == "off"
                and self.get("trainer.max_steps") != 0 and self.get("trainer.neftune_noise_alpha") is None)

    def harness_items(self) -> dict[tuple[str, str], dict]:
        """lm-eval's per-item scores of the run's last harness evaluation: {(task, metric): {doc id: score}}."""
        rows = [r for r in read_jsonl(self.dir / rundir.HARNESS_SAMPLES, root=self.dir) if "task" in r and "doc_id" in r]
        if not rows:
            return {}
        last = (rows[-1]["step"], rows[-1].get("stage"))
        out = defaultdict(dict)
        for r in rows:
            if (r["step"], r.get("stage")) == last:
                for metric, value in r.items():
                    if metric not in ("step", "stage", "task", "doc_id", "target") and is_number(value):
                        out[r["task"], metric][r["doc_id"]] = value
        return dict(out)

    def evaluations(self) -> list[dict]:
        """The evaluations during training, oldest first (`rundir.evaluations`)."""
        return rundir.evaluations(self.history)

    def answer_lengths(self) -> list[int]:
        """Answer lengths in tokens at the last generation step of samples.jsonl (one per prompt)."""
        _, rows = rundir.last_generation(self.dir / rundir.SAMPLES, root=self.dir)
        return [r["tokens"] for r in rows.values() if isinstance(r.get("tokens"), int)]


def _read_run(summary_path: Path, root: Path) -> Run | None:
    """The run, or None when its summary.json is unreadable (the reader has named it)."""
    run_dir = summary_path.parent
    summary = read_json(summary_path, root=root)
    if not isinstance(summary, dict):
        return None
    declare_used(summary, summary_path)
    overrides = read_yaml(run_dir / rundir.OVERRIDES, [], root=root)
    config = read_yaml(run_dir / rundir.CONFIG, {}, root=root)
    config = renamed(config) if isinstance(config, dict) else {}  # a run written before a key's rename
    history = read_jsonl(run_dir / rundir.METRICS, root=root)
    summary = {**rundir.best_evaluation(history), **summary}  # a run written before summary.json held them
    judges = {}
    for path in rundir.judge_files(run_dir):
        data = read_json(path, root=root)
        if isinstance(data, dict) and isinstance(data.get("summary"), dict) and isinstance(data.get("baseline"), str):
            judges.setdefault(JUDGE, {})[data["baseline"]] = {**data["summary"], "judge/model": data.get("judge"),
                                                              "judge/template": data.get("template", "neftlab")}
    sweeper = (read_yaml(run_dir / rundir.HYDRA_CONFIG, {}, root=root).get("hydra") or {}).get("sweeper") or {}
    return Run(run_dir, [str(o) for o in overrides if not str(o).startswith("hydra.")], summary,
               config, history, judges,
               searched="direction" in sweeper)  # an optimizing sweeper (Optuna's, or neftlab's over it)


def declare_used(summary: dict, path: Path) -> None:
    """Register the user's measures a run declared (summary.json's `measures`), so that the report shows them
    without importing the user's code; one declared otherwise than a measure known already is named and left out."""
    used = summary.get(rundir.MEASURES)
    for key, data in used.items() if isinstance(used, dict) else ():
        try:
            measures.register(measures.Measure.from_json({**data, "key": key}))
        except (TypeError, ValueError) as e:
            log.warning("%s: its measure %s is not reported (%s)", path, key, e)


def is_run(summary_path: Path, root: Path) -> bool:
    """Whether a summary.json is a neftlab run's: beside it the run's .hydra/config.yaml, and no link on the way."""
    run_dir = summary_path.parent
    return link_below(summary_path, root) is None and (run_dir / rundir.CONFIG).is_file() \
        and link_below(run_dir / rundir.CONFIG, root) is None


def find_runs(root: Path) -> tuple[list[Run], list[str], list[Path]]:
    """The runs under root, labelled by what sets them apart, the overrides they all share, and the
    summaries that could not be read. Links below root are not followed (a link loop among them)."""
    if not root.is_dir():
        raise ReportError(f"{root} is not a directory (point it at a run, multirun or outputs/ directory)")
    paths = sorted(p for p in root.rglob(rundir.SUMMARY) if is_run(p, root))
    noise.builtin()  # what neftlab's kinds log is declared: runs written before runs declared it themselves
    if not paths:
        raise ReportError(f"no neftlab run under {root}: no directory there holds a summary.json beside its "
                          ".hydra/config.yaml (point it at a run, multirun or outputs/ directory)")
    read = [(p, _read_run(p, root)) for p in tqdm(paths, desc="Reading runs", unit="run")]
    runs = [r for _, r in read if r is not None]
    unreadable = [p for p, r in read if r is None]
    if not runs:
        raise ReportError(f"no readable runs under {root}: every summary.json is corrupt ({', '.join(map(str, unreadable))})")
    common = [o for o in runs[0].overrides if all(o in r.overrides for r in runs)] if len(runs) > 1 else []
    for r in runs:
        r.label = ",".join(o for o in r.overrides if o not in common) or "(common)"
    return runs, common, unreadable


def label_judgings(runs: list[Run]) -> None:
    """Each run's judgings as table cells: `win vs <the baseline's arm>` (or its directory's name)."""
    by_dir = {str(r.dir.resolve()): r for r in runs}
    for r in runs:
        for source, judged in r.judges.items():
            for baseline, summary in judged.items():
                against = by_dir[baseline].label_without_seed if baseline in by_dir else Path(baseline).name
                r.extra[f"{'' if source == JUDGE else source + ' '}win vs {against}"] = summary.get(
                    measures.WIN_RATE.key)


def generator_name(run: Run) -> str:
    """The run's name in AlpacaEval's files (`generator`): its arm and seed, e.g. `arm=uniform_5,seed=1`."""
    arm = run.label_without_seed if run.label not in ("", "(common)") else ",".join(
        o for o in run.overrides if not o.startswith("seed="))
    return f"{arm if arm and arm != '(common)' else 'neftlab'},seed={run.get('seed')}".replace("/", "_")


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
