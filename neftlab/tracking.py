"""W&B for the `logger` group, and the Trainer's logs into the run files.

Every number a run produces goes through `rundir.RunFiles.log`, so metrics.jsonl, summary.json
and the W&B run see the same keys: `train/…`, `eval/…`, `noise/…`, `pruning/…`,
`efficiency/…`, `convergence/…`, with the trainer's global step (`train/global_step` in W&B).
The Trainer's own logs reach W&B the same way (`Recorder`), under its WandbCallback's key scheme
(loss -> train/loss, eval_loss -> eval/loss, train_loss -> train/train_loss); the callback itself is not
used, since it adds the Trainer's ~150 options and the model config to the run's config beside neftlab's.
"""

from __future__ import annotations

import logging
import math
import netrc
import os
import uuid
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from transformers import TrainerCallback

from . import rundir
from .config import LoggerConfig

log = logging.getLogger(__name__)


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
    if "eval/loss" in out and perplexity:
        out["eval/perplexity"] = math.exp(min(out["eval/loss"], 700.0))
    return out


def wandb_mode(mode: str) -> str:
    """auto: $WANDB_MODE if set, else online where W&B credentials are configured, else offline."""
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return "online" if netrc.netrc().authenticators(host) else "offline"
    except (FileNotFoundError, netrc.NetrcParseError):
        return "offline"


def project(name: str | None) -> str:
    """logger.project, else $WANDB_PROJECT, else "neftlab"."""
    return name or os.environ.get("WANDB_PROJECT") or "neftlab"


# What a dashboard should show for these by default: the best value of the run, not the last.
SUMMARIES = {**{k: "min" for k in ("train/loss", "eval/loss", "eval/perplexity", "eval/train_loss_noise_off")},
             **{k: "max" for k in ("eval/accuracy", "judge/win_rate", "judge/lc_win_rate",
                                   "judge_vs_baseline/win_rate", "judge_vs_baseline/lc_win_rate")}}
ANSWER_COLUMNS = ["prompt_id", "prompt", "answer", "tokens", "stop"]


class WandbRun:
    """One W&B run per job, neftlab's resolved config its config."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str, group: str | None,
                 job_type: str, tags: list[str]):
        import wandb
        mode = wandb_mode(cfg.mode)
        id_file = run_dir / rundir.WANDB_ID  # a resumed run continues the same W&B run
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
        id_file.write_text(run_id)
        # finish_previous: Hydra runs a sweep's jobs in one process, and the default reinit would hand
        # every job the previous job's run.
        self.run = wandb.init(project=project(cfg.project),
                              entity=cfg.entity, group=group, name=name, job_type=job_type, tags=tags,
                              config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
                              id=run_id, resume="allow")
        self.run.define_metric("train/global_step")
        for key, best in SUMMARIES.items():
            self.run.define_metric(key, step_metric="train/global_step", summary=best)
        self.run.define_metric("*", step_metric="train/global_step", step_sync=True)
        if mode == "offline":
            log.info("W&B is offline (no credentials found): upload later with `wandb sync %s`",
                     Path(self.run.dir).parent)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({**metrics, "train/global_step": step})

    def log_answers(self, step: int, stage: str, samples: list[dict]) -> None:
        """The answers as a W&B Table (`answers/<stage>`), so that two runs can be compared answer by answer."""
        import wandb
        rows = [[s["prompt_id"], "\n\n".join(str(m.get("content", "")) for m in s["prompt"]), s["generation"],
                 s["tokens"], s["stop"]] for s in samples]
        self.run.log({f"answers/{stage}": wandb.Table(columns=ANSWER_COLUMNS, data=rows), "train/global_step": step})

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        self.run.summary.update({k: v for k, v in summary.items() if k not in SUMMARIES})  # declared: their best
        self.run.finish(exit_code=exit_code)


def update_summary(run_dir: Path, values: dict[str, Any]) -> bool:
    """Add `values` to the W&B summary of a finished run, resuming its W&B run by id in its logger's mode:
    judge win rates and paired differences come after training, and the dashboard groups runs by their
    config (noise.alpha, ...) to show them. False when the run logged no W&B run."""
    from omegaconf import OmegaConf
    id_file = Path(run_dir) / rundir.WANDB_ID
    try:
        logger = OmegaConf.load(Path(run_dir) / rundir.CONFIG).get("logger") or {}
    except (OSError, ValueError) as e:
        log.warning("%s: no readable .hydra/config.yaml (%s): W&B summary not updated", run_dir, e)
        return False
    if logger.get("kind") != "wandb" or not id_file.is_file():
        return False
    import wandb
    try:
        run = wandb.init(project=project(logger.get("project")),
                         entity=logger.get("entity"), id=id_file.read_text().strip(), resume="allow",
                         dir=str(run_dir), mode=wandb_mode(logger.get("mode", "auto")), reinit="finish_previous")
        run.summary.update({k: rundir.jsonable(v) for k, v in values.items()})
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B's errors (network, auth) must not lose the files already written
        log.warning("%s: W&B summary not updated (%s: %s); the numbers are in the run's files", run_dir,
                    type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return False
    return True


class Recorder(TrainerCallback):
    """Sends the Trainer's logs, namespaced, plus the current values of `sources`, to the run files (and so to
    W&B)."""

    def __init__(self, files: rundir.RunFiles, sources: Iterable[Any] = (), causal: bool = True):
        self.files = files
        self.sources = list(sources)
        self.causal = causal

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = namespaced(logs or {}, perplexity=self.causal)
        if "train/loss" in metrics:
            for source in self.sources:
                metrics.update(source.metrics())
        self.files.log(state.global_step, metrics)
