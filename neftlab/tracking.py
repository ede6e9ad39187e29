"""Run files for the `logger` group: metrics.jsonl, summary.json and samples.jsonl in the run directory.

Every number a run produces goes through `RunFiles.log`, so the files on disk and any
tracker see the same keys: `train/…`, `eval/…`, `noise/…`, `pruning/…`, `efficiency/…`,
`stability/…`, each with the trainer's global step.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterable

from transformers import TrainerCallback

# The Trainer's end-of-training averages; "train_loss" is the mean over the run, not the last step's loss.
_TRAIN_END = {"train_loss": "train/mean_loss", "train_runtime": "train/runtime_s",
              "train_samples_per_second": "train/samples_per_second", "train_steps_per_second": "train/steps_per_second"}


def namespaced(logs: dict[str, Any]) -> dict[str, Any]:
    """The Trainer's log keys in neftlab's namespaces: loss -> train/loss, eval_loss -> eval/loss (+ eval/perplexity)."""
    out = {}
    for key, value in logs.items():
        if key in _TRAIN_END:
            out[_TRAIN_END[key]] = value
        elif key.startswith("eval_"):
            out["eval/" + key[5:]] = value
        elif "/" in key:
            out[key] = value
        else:
            out["train/" + key] = value
    if "eval/loss" in out:
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 700.0))
    return out


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than fail to write
    return value


class RunFiles:
    """The run's files; metrics.jsonl is appended and flushed line by line, so an interrupted run keeps its history."""

    def __init__(self, out_dir: str | Path):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.summary: dict[str, Any] = {}
        self.train_losses: list[tuple[int, float]] = []
        self._metrics = (self.dir / "metrics.jsonl").open("a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if not metrics:
            return
        metrics = {k: _jsonable(v) for k, v in metrics.items()}
        self._metrics.write(json.dumps({"step": step, **metrics}) + "\n")
        self._metrics.flush()
        self.summary.update(metrics)
        if isinstance(metrics.get("train/loss"), float):
            self.train_losses.append((step, metrics["train/loss"]))

    def write_samples(self, samples: Iterable[dict]) -> None:
        with (self.dir / "samples.jsonl").open("w", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps(s, ensure_ascii=False) + "\n")

    def finish(self, status: str, error: str | None = None, **extra: Any) -> dict:
        """Write summary.json: the last value of every metric, the status and, for a failed run, the error."""
        self._metrics.close()
        summary = {"status": status, **({"error": error} if error else {}), **extra, **self.summary}
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n", encoding="utf-8")
        return summary


class Recorder(TrainerCallback):
    """Sends the Trainer's logs, namespaced, plus the current values of `sources`, to the run files."""

    def __init__(self, files: RunFiles, sources: Iterable[Any] = ()):
        self.files = files
        self.sources = list(sources)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = namespaced(logs or {})
        if "train/loss" in metrics:
            for source in self.sources:
                metrics.update(source.metrics())
        self.files.log(state.global_step, metrics)
