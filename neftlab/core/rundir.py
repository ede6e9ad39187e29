"""The run directory: every file's name, what it holds, its writer and its reader. Nothing else in neftlab spells a
run file's name.

    .hydra/config.yaml      the job's composed config   \\ written by neftlab once it has decided to use the
    .hydra/overrides.yaml   its command-line overrides   | directory (a new run, or one it resumes), never
    .hydra/hydra.yaml       Hydra's own config          /  by Hydra before that decision
    neftlab.log             the log (rank N: neftlab-rank<N>.log)
    metrics.jsonl           events {"step", "stage", <namespaced metrics>}, appended a whole line at a time, and
                            each generation's markers {"step", "stage", "answers_finished"}: false as its answers
                            are written, true once the stage that wrote them has finished (`marked_generations`)
    summary.json            the last value of every metric, "status", "error" and "measures" (the declarations of
                            the user's measures it computed, `measures.Measure.to_json`, by key)
    samples.jsonl           answers {"prompt_id", "step", "stage", "prompt", "reference", "generation", "tokens", "stop"}
    harness_samples.jsonl   lm-eval's per-item scores {"step", "stage", "task", "doc_id", "target", <metric>: score}
    judge_<baseline>.json   a judging of the answers (neftlab.judge)
    fingerprint.json        what a resume must match: the config's and the data's fingerprints
    run.lock                the job working in the run (claim.RunLock)
    wandb-run-id            the W&B run's id, reused on resume
    model/                  the final weights
    ../jobs.jsonl           a sweep's ledger, at its root: how each job of each invocation ended
    checkpoints/checkpoint-N/  the Trainer's checkpoint, plus neftlab_rank<N>.pt (the state of each neftlab
                            component on rank N: noise stream, alpha, threshold, pruning masks) and, written last,
                            neftlab_complete.json (every file with its size); checkpoints of neftlab before
                            format 2 also hold neftlab_state.pt (alpha and threshold)

Events and answers carry their `stage`: "train" (logged during training, evaluations at trainer.eval_steps
included), "final" (the evaluation after training) or "reeval-<id>" (one `neftlab.evaluate`), so that two
evaluations at one step are told apart.

Every file here is written and read through `files`: atomically, never through a symbolic link, and a reader names
the file it could not use instead of failing on it.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Protocol

from .errors import first_line
from .measures import BEST_EPOCH, BEST_LOSS, EPOCH, EVAL_LOSS, TRAIN_LOSS, is_number
from .files import jsonable, jsonl_line, open_append, read_json, read_jsonl, write_json, write_text
from .rank import rank

log = logging.getLogger(__name__)

HYDRA = ".hydra"
CONFIG = f"{HYDRA}/config.yaml"
OVERRIDES = f"{HYDRA}/overrides.yaml"
HYDRA_CONFIG = f"{HYDRA}/hydra.yaml"
LOG = "neftlab.log"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
SAMPLES = "samples.jsonl"
HARNESS_SAMPLES = "harness_samples.jsonl"
FINGERPRINT = "fingerprint.json"
LOCK = "run.lock"
WANDB_ID = "wandb-run-id"
MODEL = "model"
CHECKPOINTS = "checkpoints"
STATE_FILE = "neftlab_state.pt"  # checkpoints before format 2 only
MARKER = "neftlab_complete.json"
TRAINER_STATE = "trainer_state.json"


def rank_state(rank: int) -> str:
    return f"neftlab_rank{rank}.pt"


SWEEP_JOBS = "jobs.jsonl"
TRAIN, FINAL = "train", "final"
MEASURES = "measures"  # summary.json's declarations of the user's measures
FINISHED = "answers_finished"  # a metrics.jsonl marker's key: whether the stage that wrote a generation finished


def judge_file(run_dir: Path, baseline: str) -> Path:
    """judge_reference.json, or judge_<the baseline run directory's name>.json."""
    return Path(run_dir) / f"judge_{'reference' if baseline == 'reference' else Path(baseline).resolve().name}.json"


def judge_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("judge_*.json"))


# ---------------------------------------------------------------- the run's own files

def status(run_dir: Path) -> Optional[str]:
    """summary.json's status; "absent" for a directory with no run files, None for a run without a summary
    (running, or killed), "unreadable" for a corrupt summary."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists():
        return None if (run_dir / METRICS).exists() or (run_dir / FINGERPRINT).exists() else "absent"
    summary = read_json(run_dir / SUMMARY, root=run_dir)
    return summary.get("status") if isinstance(summary, dict) else "unreadable"


def generations(path: Path, root: Optional[Path] = None) -> dict[tuple[int, str], dict[int, dict]]:
    """Every generation in a samples.jsonl, in the order they were written: {(step, stage): rows by prompt id}. A
    prompt id that occurs twice in one generation is counted and named, and its last row used."""
    out: dict[tuple[int, str], dict[int, dict]] = {}
    twice: Counter = Counter()
    for r in read_jsonl(path, root=root):
        if isinstance(r.get("prompt_id"), int) and isinstance(r.get("step"), int):
            key = (r["step"], r.get("stage", TRAIN))
            rows = out.setdefault(key, {})
            twice[key] += r["prompt_id"] in rows
            rows[r["prompt_id"]] = r
    for (step, stage), n in twice.items():
        if n:
            log.warning("%s: %d prompt id(s) occur more than once in its generation at step %d (stage %s): the last "
                        "row of each is used", path, n, step, stage)
    return out


def marked_generations(run_dir: Path) -> dict[tuple[int, str], bool]:
    """{(step, stage): whether the stage that wrote that generation finished}, from the markers in the run's
    metrics.jsonl; answers written before markers existed have none, and are absent here."""
    out: dict[tuple[int, str], bool] = {}
    for r in read_jsonl(Path(run_dir) / METRICS, root=run_dir):
        if isinstance(r.get(FINISHED), bool) and isinstance(r.get("step"), int):
            key = (r["step"], r.get("stage", TRAIN))
            out[key] = out.get(key, False) or r[FINISHED]
    return out


def last_generation(path: Path, root: Optional[Path] = None) -> tuple[Optional[int], dict[int, dict]]:
    """The answers of the last generation in a samples.jsonl (its last step and stage): (step, rows by prompt id)."""
    found = generations(path, root)
    if not found:
        return None, {}
    (step, _), rows = list(found.items())[-1]
    return step, rows


def trained_events(run_dir: Path) -> list[dict]:
    """The training's own events (stage "train"): what a re-evaluation takes the last step and epoch from."""
    return [e for e in read_jsonl(Path(run_dir) / METRICS, root=run_dir) if e.get("stage", TRAIN) == TRAIN]


def write_hydra(run_dir: Path, config, hydra_config, overrides: list[str]) -> None:
    """The job's .hydra/ files, as Hydra writes them (unresolved), once neftlab has decided to use the directory."""
    from omegaconf import OmegaConf
    for name, node in ((CONFIG, config), (HYDRA_CONFIG, hydra_config), (OVERRIDES, OmegaConf.create(list(overrides)))):
        write_text(Path(run_dir) / name, OmegaConf.to_yaml(node), root=run_dir)


class Sink(Protocol):
    """Where a run's numbers go besides its files (tracking.WandbRun)."""

    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def log_answers(self, step: int, stage: str, samples: list[dict]) -> None: ...

    def finish(self, summary: dict[str, Any], exit_code: int) -> None: ...


class RunFiles:
    """The run's writer: metrics.jsonl and samples.jsonl are appended a whole line per event and flushed, so an
    interrupted run keeps its history; summary.json is replaced atomically. Every event and answer gets
    `stage`. Under torchrun only rank 0 writes; the other ranks keep the values in memory.

    `sinks` (the W&B run) get every event too. A sink that fails (its service died, its network went) is dropped
    with one warning: the numbers are in metrics.jsonl, and the run goes on."""

    def __init__(self, out_dir: str | Path, keep: Callable[[dict], bool] | None = None, stage: str = TRAIN,
                 sinks: Iterable[Sink] = ()):
        """`keep` (resume, re-evaluation) picks the rows of the existing metrics.jsonl and samples.jsonl to keep;
        the kept events are replayed into the summary, and both files go on after them. Without it both start
        empty."""
        self.dir = Path(out_dir)
        self.writes = rank() == 0
        self.stage = stage
        self.sinks = list(sinks)
        self.summary: dict[str, Any] = {}
        self.declared: dict[str, dict] = {}  # the user's measures this run computes, for summary.json
        self.unfinished: set[int] = set()  # steps whose answers this stage wrote and has not yet finished
        self.train_losses: list[tuple[int, float]] = []
        kept = {}
        for name in (METRICS, SAMPLES, HARNESS_SAMPLES):
            kept[name] = [r for r in read_jsonl(self.dir / name, root=self.dir) if keep(r)] if keep else []
            if self.writes and ((self.dir / name).exists() or (self.dir / name).is_symlink() or name == METRICS):
                write_text(self.dir / name, "".join(jsonl_line(r) for r in kept[name]), root=self.dir)
        self._metrics = open_append(self.dir / METRICS, root=self.dir) if self.writes else None
        for event in kept[METRICS]:
            if FINISHED not in event:  # a marker is no metric
                event = {k: v for k, v in event.items() if k != "stage"}
                self._update(event.pop("step"), event)

    def _update(self, step: int, metrics: dict[str, Any]) -> None:
        self.summary.update(metrics)
        if isinstance(metrics.get(TRAIN_LOSS.key), float):
            self.train_losses.append((step, metrics[TRAIN_LOSS.key]))

    def _to_sinks(self, call: str, *args) -> None:
        for sink in list(self.sinks):
            try:
                getattr(sink, call)(*args)
            except Exception as e:  # noqa: BLE001 - a tracker's failure must not end a run whose files are whole
                log.warning("%s failed (%s): it gets nothing more from this run; every number is in %s",
                            type(sink).__name__, first_line(e), self.dir / METRICS)
                self.sinks.remove(sink)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one event, and send it to the sinks."""
        if not metrics:
            return
        metrics = {k: jsonable(v) for k, v in metrics.items()}
        if self._metrics is not None:
            self._metrics.write(jsonl_line({"step": step, "stage": self.stage, **metrics}))  # whole or torn
            self._metrics.flush()
        self._update(step, metrics)
        self._to_sinks("log", step, metrics)

    def _append(self, name: str, rows: list[dict]) -> None:
        """Append rows to a JSONL file of the run, one whole line per write and flushed, each with its stage."""
        with open_append(self.dir / name, root=self.dir) as out:
            for row in rows:
                out.write(jsonl_line({**row, "stage": self.stage}))
                out.flush()

    def _mark(self, step: int, finished: bool) -> None:
        """A generation's marker in metrics.jsonl: not a metric, so neither in the summary nor sent to the sinks."""
        if self._metrics is not None:
            self._metrics.write(jsonl_line({"step": step, "stage": self.stage, FINISHED: finished}))
            self._metrics.flush()

    def append_samples(self, samples: Iterable[dict]) -> None:
        """Append answers to samples.jsonl: every evaluation's answers stay, each with its step and stage, marked
        in metrics.jsonl as not finished by their stage yet (`finish_answers` marks that it has)."""
        samples = list(samples)
        if not self.writes or not samples:
            return
        step = samples[0]["step"]
        self._mark(step, False)
        self._append(SAMPLES, samples)
        self.unfinished.add(step)
        self._to_sinks("log_answers", step, self.stage, samples)

    def finish_answers(self) -> None:
        """Mark the answers this stage wrote as finished: their stage has done all it does after them (measures,
        latency, the harness, the saved model), so a judge may read them."""
        for step in sorted(self.unfinished):
            self._mark(step, True)
        self.unfinished.clear()

    def declare(self, measures: Iterable[Any]) -> None:
        """The user's measures this run computes (`measures.Measure`s): their declarations go into summary.json."""
        self.declared.update({m.key: {k: v for k, v in m.to_json().items() if k != "key"} for m in measures})

    def append_harness(self, step: int, rows: list[dict]) -> None:
        """Append lm-eval's per-item scores to harness_samples.jsonl, with the step and stage."""
        if self.writes:
            self._append(HARNESS_SAMPLES, [{"step": step, **row} for row in rows])

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()

    def finish(self, status: str, error: str | None = None, **extra: Any) -> dict:
        """Write summary.json: the last value of every metric, the status and, for a failed run, the error.

        A full disk can make this write fail too: the error is logged in one line and the run's last
        complete checkpoint still stands."""
        summary = {"status": status, **({"error": error} if error else {}), **extra, **self.summary,
                   **({MEASURES: self.declared} if self.declared else {})}
        if not self.writes:
            return summary
        summary.update(best_evaluation(read_jsonl(self.dir / METRICS, root=self.dir)))
        try:
            self.close()
            write_json(self.dir / SUMMARY, summary, root=self.dir)
        except OSError as e:
            log.error("could not write %s: %s", self.dir / SUMMARY, e.strerror or e)
        self._to_sinks("finish", summary, 0 if status == "completed" else 1)
        self.sinks = []
        return summary


def evaluations(events: Iterable[dict]) -> list[dict]:
    """The evaluations during training in a run's metrics.jsonl events, oldest first: each step's events of stage
    "train" merged (the held-out loss and the noise-off training loss are logged as two events of one step), those
    with an eval loss."""
    merged: dict[int, dict] = {}
    for event in events:
        if event.get("stage", TRAIN) == TRAIN and isinstance(event.get("step"), int):
            merged.setdefault(event["step"], {}).update(event)
    return [e for _, e in sorted(merged.items()) if is_number(e.get(EVAL_LOSS.key))]


def best_evaluation(events: Iterable[dict]) -> dict[str, float]:
    """Of a run evaluated twice or more during training: its best held-out loss and the epoch it came at (the step
    where no epoch was logged); nothing for a run evaluated once."""
    found = evaluations(events)
    if len(found) < 2:
        return {}
    best = min(found, key=lambda e: e[EVAL_LOSS.key])
    return {BEST_LOSS.key: best[EVAL_LOSS.key], BEST_EPOCH.key: best.get(EPOCH, best["step"])}
