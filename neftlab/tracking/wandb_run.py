"""W&B for the `logger` group: one W&B run per job, neftlab's resolved config its config, every number of the run's
files (`rundir.RunFiles` sends each event here too), its answers as a Table, and numbers added after the run
(`update_summary`: judge win rates, paired differences)."""

from __future__ import annotations

import atexit
import logging
import math
import netrc
import os
import sys
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from ..config import LoggerConfig
from ..core import measures, rundir
from ..core.errors import first_line
from ..core.files import jsonable, read_jsonl, read_text, read_yaml, write_text

log = logging.getLogger(__name__)


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




def summaries() -> dict[str, str]:
    """What a dashboard shows by default for every measure with a direction: its best value of the run ("min" or
    "max"), not the last; a judge's against another run's answers too (`measures.vs_baseline`)."""
    best = {key: direction[:3] for key, direction in measures.directions().items()}
    return {**best, **{measures.vs_baseline(m.key): best[m.key] for m in measures.declared("judge") if m.direction}}

ANSWER_COLUMNS = ["prompt_id", "prompt", "answer", "tokens", "stop"]


def _teardown_at_exit() -> None:
    """W&B's own exit hook, run here first: W&B's service process (wandb-core) may be gone by then, killed by a
    job's cleanup say, and W&B's hook would print a traceback after a run that completed; here it is one line."""
    import wandb
    try:
        wandb.teardown()
    except Exception as e:  # noqa: BLE001 - whatever the lost connection raises
        print(f"W&B's service process had ended before this one ({first_line(e, 200)}): "
              "records sent to it after that are missing from the W&B run; the run's own files are complete",
              file=sys.stderr)


class WandbRun:
    """One W&B run per job, neftlab's resolved config its config."""

    hooked = False  # _teardown_at_exit is registered (after W&B's own hook, so that it runs first)

    def __init__(self, cfg: LoggerConfig, run_dir: Path, config: dict, name: str, group: str | None,
                 job_type: str, tags: list[str]):
        import wandb
        self.run_dir = Path(run_dir)
        mode = wandb_mode(cfg.mode)
        id_file = run_dir / rundir.WANDB_ID  # a resumed run continues the same W&B run
        run_id = (read_text(id_file, root=run_dir) or "").strip() or uuid.uuid4().hex[:8]
        write_text(id_file, run_id, root=run_dir)
        # finish_previous: Hydra runs a sweep's jobs in one process, and the default reinit would hand
        # every job the previous job's run.
        self.run = wandb.init(project=project(cfg.project),
                              entity=cfg.entity, group=group, name=name, job_type=job_type, tags=tags,
                              config=config, dir=str(run_dir), mode=mode, reinit="finish_previous",
                              id=run_id, resume="allow")
        if not WandbRun.hooked:
            atexit.register(_teardown_at_exit)
            WandbRun.hooked = True
        self.run.define_metric(measures.STEP)
        for key, best in summaries().items():
            self.run.define_metric(key, step_metric=measures.STEP, summary=best)
        self.run.define_metric("*", step_metric=measures.STEP, step_sync=True)
        if mode == "offline":
            log.info("W&B is offline (no credentials found): upload later with `wandb sync %s`",
                     Path(self.run.dir).parent)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log({**metrics, measures.STEP: step})

    def log_answers(self, step: int, stage: str, samples: list[dict]) -> None:
        """The answers as a W&B Table (`answers/<stage>`), so that two runs can be compared answer by answer."""
        import wandb
        rows = [[s["prompt_id"], "\n\n".join(str(m.get("content", "")) for m in s["prompt"]), s["generation"],
                 s["tokens"], s["stop"]] for s in samples]
        self.run.log({f"answers/{stage}": wandb.Table(columns=ANSWER_COLUMNS, data=rows), measures.STEP: step})

    def finish(self, summary: dict[str, Any], exit_code: int) -> None:
        """The run's summary: the last value of every metric, and for those of `summaries()` their best over the
        whole run, taken from metrics.jsonl. W&B keeps the best of what this process logged only: a resumed run's
        min or max would miss the values logged before the interruption (wandb/wandb#9684)."""
        best = summaries()  # the user's measures' declarations (summary.json's "measures") are no number of the run
        self.run.summary.update({k: v for k, v in summary.items() if k not in best and k != rundir.MEASURES})
        self.run.summary.update(best_values(self.run_dir))
        self.run.finish(exit_code=exit_code)


def update_summary(run_dir: Path, values: dict[str, Any]) -> bool:
    """Add `values` to the W&B summary of a finished run, resuming its W&B run by id in its logger's mode:
    judge win rates and paired differences come after training, and the dashboard groups runs by their
    config (noise.alpha, ...) to show them. False when the run logged no W&B run."""
    logger = (read_yaml(Path(run_dir) / rundir.CONFIG, {}, root=run_dir) or {}).get("logger") or {}
    run_id = (read_text(Path(run_dir) / rundir.WANDB_ID, root=run_dir) or "").strip()
    if not isinstance(logger, dict) or logger.get("kind") != "wandb" or not run_id:
        return False
    import wandb
    try:
        run = wandb.init(project=project(logger.get("project")), entity=logger.get("entity"), id=run_id,
                         resume="allow", dir=str(run_dir), mode=wandb_mode(logger.get("mode", "auto")),
                         reinit="finish_previous")
        run.summary.update({k: jsonable(v) for k, v in values.items()})
        run.finish()
    except Exception as e:  # noqa: BLE001 - W&B's errors (network, auth) must not lose the files already written
        log.warning("%s: W&B summary not updated (%s); the numbers are in the run's files", run_dir, first_line(e))
        return False
    return True


def best_values(run_dir: Path) -> dict[str, dict]:
    """{key: {"min" | "max": value}} over every event of the run's metrics.jsonl, for the keys of `summaries()`,
    in the shape W&B's own `define_metric(summary=...)` gives them."""
    best = summaries()
    found: dict[str, list[float]] = {}
    for event in read_jsonl(Path(run_dir) / rundir.METRICS, root=run_dir):
        for key in best:
            value = event.get(key)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                found.setdefault(key, []).append(value)
    return {key: {best[key]: (min if best[key] == "min" else max)(values)}
            for key, values in found.items()}
