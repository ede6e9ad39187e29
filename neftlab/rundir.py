"""The run directory: every file's name, what it holds, its writer and its reader. Nothing else in neftlab spells a
run file's name.

    .hydra/config.yaml      the job's composed config   \\ written by neftlab once it has decided to use the
    .hydra/overrides.yaml   its command-line overrides   | directory (a new run, or one it resumes), never
    .hydra/hydra.yaml       Hydra's own config          /  by Hydra before that decision
    neftlab.log             the log (rank N: neftlab-rank<N>.log)
    metrics.jsonl           events {"step", "stage", <namespaced metrics>}, appended a whole line at a time
    summary.json            the last value of every metric, "status" and "error"
    samples.jsonl           answers {"prompt_id", "step", "stage", "prompt", "reference", "generation", "tokens", "stop"}
    harness_samples.jsonl   lm-eval's per-item scores {"step", "stage", "task", "doc_id", "target", <metric>: score}
    judge_<baseline>.json   a judging of the answers (neftlab.judge)
    fingerprint.json        what a resume must match: the config's and the data's fingerprints
    run.lock                the process working in the run (resume.RunLock)
    wandb-run-id            the W&B run's id, reused on resume
    model/                  the final weights
    ../jobs.jsonl           a sweep's ledger, at its root: how each job of each invocation ended
    checkpoints/checkpoint-N/  the Trainer's checkpoint, plus neftlab_state.pt (noise alpha and threshold),
                            neftlab_rank<N>.pt (each rank's noise stream and pruning masks) and, written last,
                            neftlab_complete.json (every file with its size)

Events and answers carry their `stage`: "train" (logged during training, evaluations at trainer.eval_steps
included), "final" (the evaluation after training) or "reeval-<id>" (one `neftlab.evaluate`), so that two
evaluations at one step are told apart. JSONL files are split on "\\n" only: U+2028 and U+0085 are valid inside a
JSON string and `str.splitlines` would split a row at them.

Files that other processes read are written to a temporary file beside the target and renamed over it, so a
crash, kill -9 or full disk leaves the old file or the new one; metrics.jsonl and samples.jsonl are appended a
whole line per write, and their readers skip a torn last line and say so. Every reader names the file it could
not use instead of failing on it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

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
STATE_FILE = "neftlab_state.pt"
MARKER = "neftlab_complete.json"
TRAINER_STATE = "trainer_state.json"


def rank_state(rank: int) -> str:
    return f"neftlab_rank{rank}.pt"
SWEEP_JOBS = "jobs.jsonl"
TRAIN, FINAL = "train", "final"


def judge_file(run_dir: Path, baseline: str) -> Path:
    """judge_reference.json, or judge_<the baseline run directory's name>.json."""
    return Path(run_dir) / f"judge_{'reference' if baseline == 'reference' else Path(baseline).resolve().name}.json"


def judge_files(run_dir: Path) -> list[Path]:
    return sorted(Path(run_dir).glob("judge_*.json"))


# ---------------------------------------------------------------- writing and reading whole files

def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is one of `atomic_write`'s temporary files (left by a writer that was killed)."""
    return path.name.startswith(".") and ".tmp" in path.name


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it into place (same filesystem)."""
    path = Path(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def read_json(path: Path) -> Optional[Any]:
    """The file's JSON, or None (with a warning naming it) when it is empty, cut off or not JSON."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s): ignored", path, type(e).__name__ if isinstance(e, OSError) else e)
        return None


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than fail to write
    return value


def jsonl_line(row: dict) -> str:
    """One row as one line: raw UTF-8 (U+2028 stays inside its string), ending in the only separator, "\\n"."""
    return json.dumps(row, ensure_ascii=False) + "\n"


def append_jsonl(path: Path, row: dict) -> None:
    """Append one row as one write (several processes may append to a sweep's ledger at once)."""
    with Path(path).open("a", encoding="utf-8") as out:
        out.write(jsonl_line(row))


def read_jsonl(path: Path, required: str = "step") -> list[dict]:
    """The rows of a metrics.jsonl, samples.jsonl (objects with a "step") or jobs.jsonl ("sweep"); a torn last line
    (a crash or a full disk mid-write) is skipped and reported, a corrupt line elsewhere is skipped and reported
    with its number."""
    try:
        lines = Path(path).read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return []
    rows = []
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and required in row:
            rows.append(row)
        else:
            where = "its last line, cut off" if number == last else f"line {number}, not a JSON event"
            log.warning("%s: skipped %s", path, where)
    return rows


# ---------------------------------------------------------------- the run's own files

def status(run_dir: Path) -> Optional[str]:
    """summary.json's status; "absent" for a directory with no run files, None for a run without a summary
    (running, or killed), "unreadable" for a corrupt summary."""
    run_dir = Path(run_dir)
    if not (run_dir / SUMMARY).exists():
        return None if (run_dir / METRICS).exists() else "absent"
    summary = read_json(run_dir / SUMMARY)
    return summary.get("status") if isinstance(summary, dict) else "unreadable"


def last_generation(path: Path) -> tuple[Optional[int], dict[int, dict]]:
    """The answers of the last generation in a samples.jsonl (its last step and stage): (step, rows by prompt id).
    A prompt id that occurs twice there is counted and named, and its last row used."""
    rows = [r for r in read_jsonl(path) if isinstance(r.get("prompt_id"), int) and isinstance(r.get("step"), int)]
    if not rows:
        return None, {}
    last = (rows[-1]["step"], rows[-1].get("stage"))
    chosen = [r for r in rows if (r["step"], r.get("stage")) == last]
    twice = sorted(i for i, n in Counter(r["prompt_id"] for r in chosen).items() if n > 1)
    if twice:
        log.warning("%s: %d prompt id(s) occur more than once in its last generation (step %d, stage %s), e.g. %d: "
                    "the last row of each is used", path, len(twice), last[0], last[1], twice[0])
    return last[0], {r["prompt_id"]: r for r in chosen}


def trained_events(run_dir: Path) -> list[dict]:
    """The training's own events (stage "train"): what a re-evaluation takes the last step and epoch from."""
    return [e for e in read_jsonl(Path(run_dir) / METRICS) if e.get("stage", TRAIN) == TRAIN]


def write_hydra(run_dir: Path, config, hydra_config, overrides: list[str]) -> None:
    """The job's .hydra/ files, as Hydra writes them (unresolved), once neftlab has decided to use the directory."""
    from omegaconf import OmegaConf
    for name, node in ((CONFIG, config), (HYDRA_CONFIG, hydra_config), (OVERRIDES, OmegaConf.create(list(overrides)))):
        path = Path(run_dir) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text(path, OmegaConf.to_yaml(node))


class RunFiles:
    """The run's writer: metrics.jsonl and samples.jsonl are appended a whole line per event and flushed, so an
    interrupted run keeps its history; summary.json is replaced atomically. Every event and answer gets
    `stage`. Under torchrun only rank 0 writes; the other ranks keep the values in memory."""

    def __init__(self, out_dir: str | Path, keep: Callable[[dict], bool] | None = None, stage: str = TRAIN):
        """`keep` (resume, re-evaluation) picks the rows of the existing metrics.jsonl and samples.jsonl to keep;
        the kept events are replayed into the summary, and both files go on after them. Without it both start
        empty."""
        from .sharding import rank  # imports torch, which reading a run directory does not need
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.writes = rank() == 0
        self.stage = stage
        self.tracker = None  # tracking.WandbRun, when the run logs to W&B
        self.summary: dict[str, Any] = {}
        self.train_losses: list[tuple[int, float]] = []
        kept = {}
        for name in (METRICS, SAMPLES, HARNESS_SAMPLES):
            kept[name] = [r for r in read_jsonl(self.dir / name) if keep(r)] if keep else []
            if self.writes and ((self.dir / name).exists() or name == METRICS):
                write_text(self.dir / name, "".join(jsonl_line(r) for r in kept[name]))
        self._metrics = (self.dir / METRICS).open("a", encoding="utf-8") if self.writes else None
        for event in kept[METRICS]:
            event = {k: v for k, v in event.items() if k != "stage"}
            self._update(event.pop("step"), event)

    def _update(self, step: int, metrics: dict[str, Any]) -> None:
        self.summary.update(metrics)
        if isinstance(metrics.get("train/loss"), float):
            self.train_losses.append((step, metrics["train/loss"]))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one event, and send it to the tracker."""
        if not metrics:
            return
        metrics = {k: jsonable(v) for k, v in metrics.items()}
        if self._metrics is not None:
            self._metrics.write(jsonl_line({"step": step, "stage": self.stage, **metrics}))  # whole or torn
            self._metrics.flush()
        self._update(step, metrics)
        if self.tracker is not None:
            self.tracker.log(step, metrics)

    def _append(self, name: str, rows: list[dict]) -> None:
        """Append rows to a JSONL file of the run, one whole line per write and flushed, each with its stage."""
        with (self.dir / name).open("a", encoding="utf-8") as out:
            for row in rows:
                out.write(jsonl_line({**row, "stage": self.stage}))
                out.flush()

    def append_samples(self, samples: Iterable[dict]) -> None:
        """Append answers to samples.jsonl: every evaluation's answers stay, each with its step and stage."""
        if not self.writes:
            return
        samples = list(samples)
        self._append(SAMPLES, samples)
        if self.tracker is not None and samples:
            self.tracker.log_answers(samples[0]["step"], self.stage, samples)

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
        summary = {"status": status, **({"error": error} if error else {}), **extra, **self.summary}
        if not self.writes:
            return summary
        try:
            self.close()
            write_json(self.dir / SUMMARY, summary)
        except OSError as e:
            log.error("could not write %s: %s", self.dir / SUMMARY, e.strerror or e)
        if self.tracker is not None:
            self.tracker.finish(summary, exit_code=0 if status == "completed" else 1)
            self.tracker = None
        return summary
