"""The Trainer's logs into the run's files (and so into W&B), under its WandbCallback's key scheme (loss ->
train/loss, eval_loss -> eval/loss, train_loss -> train/train_loss); the callback itself is not used, since it adds
the Trainer's ~150 options and the model config to the run's config beside neftlab's."""

from __future__ import annotations

import math
from typing import Any, Iterable

from transformers import TrainerCallback

from ..core import measures
from ..core.rundir import RunFiles


def namespaced(logs: dict[str, Any], perplexity: bool = True) -> dict[str, Any]:
    """The Trainer's log keys as its WandbCallback names them (eval_x -> eval/x, x -> train/x), plus eval/perplexity
    for a language model (a classifier's loss has none)."""
    out = {}
    for key, value in logs.items():
        if key.startswith("eval_"):
            out["eval/" + key[5:]] = value
        elif "/" in key:
            out[key] = value
        else:
            out["train/" + key] = value
    if measures.EVAL_LOSS.key in out and perplexity:
        out[measures.PERPLEXITY.key] = math.exp(min(out[measures.EVAL_LOSS.key], 700.0))
    return out


class Recorder(TrainerCallback):
    """Sends the Trainer's logs, namespaced, plus the current values of `sources`, to the run files (and so to
    W&B)."""

    def __init__(self, files: RunFiles, sources: Iterable[Any] = (), causal: bool = True):
        self.files = files
        self.sources = list(sources)
        self.causal = causal

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = namespaced(logs or {}, perplexity=self.causal)
        if measures.TRAIN_LOSS.key in metrics:
            for source in self.sources:
                metrics.update(source.metrics())
        self.files.log(state.global_step, metrics)
