"""A finished run evaluated again, without retraining: its own config with `eval.*` overrides (other prompts, more
tokens, a judge), its trained weights from `model/` (kept by default) or its final checkpoint, and the same
evaluation stage as the end of training (`pipeline.evaluate`). Its events are appended to the run's metrics.jsonl
and samples.jsonl at the run's last step, with a stage of their own (`reeval-<id>`); the training's files
(summary.json, checkpoints, model/) are left as they are."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import OmegaConf

from ..config import Config, register, run_id, to_config
from ..config.compose import upgraded
from ..core import measures, rundir
from ..core.claim import describe
from ..core.errors import ConfigError
from ..core.files import link_below, read_json, read_jsonl, read_text
from . import pipeline
from .checkpoint import checkpoints, problem, training_done
from .resume import claim
from .signals import GracefulStop

log = logging.getLogger("neftlab.evaluate")


def load_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's resolved config with `eval.*` overrides; any other key would evaluate another model or data."""
    text = read_text(run_dir / rundir.CONFIG, root=run_dir)
    if text is None:
        raise ConfigError(f"{run_dir}: no .hydra/config.yaml, not a neftlab run directory")
    others = [o for o in overrides if not o.startswith("eval.")]
    if others:
        raise ConfigError(f"{' '.join(others)}: only eval.* keys can change on re-evaluation (the model and data "
                          "are the run's own)")
    register()
    saved = upgraded(OmegaConf.to_container(OmegaConf.create(text)))
    cfg: Config = to_config(OmegaConf.merge(OmegaConf.create(saved), OmegaConf.from_dotlist(overrides)))
    cfg.trainer.save_model = False  # model/ is the training's, never rewritten
    cfg.logger.kind = "none"  # the run files only; --wandb adds to the run's own W&B record afterwards
    # A relative data.path was relative to where the run started: the fingerprint holds the file it read.
    recorded = ((read_json(run_dir / rundir.FINGERPRINT, root=run_dir) or {}).get("data") or {}).get("path")
    if cfg.data.path and recorded and not Path(cfg.data.path).expanduser().is_absolute():
        cfg.data.path = recorded
    return cfg.validate()


def trained_weights(run_dir: Path) -> tuple[Path, dict]:
    """(where the trained weights are, the last training event: its step and epoch): model/, else the checkpoint
    of the last step."""
    trained = [e for e in rundir.trained_events(run_dir) if measures.EPOCH in e]
    last = trained[-1] if trained else {"step": 0, measures.EPOCH: 0}
    if (run_dir / rundir.MODEL).is_dir():
        return run_dir / rundir.MODEL, last
    if (run_dir / rundir.MODEL).is_dir() and link_below(run_dir / rundir.MODEL, run_dir) is not None:
        raise ConfigError(f"{run_dir / rundir.MODEL} is a symbolic link: neftlab loads no weights through a link "
                          "inside a run directory")
    for checkpoint in checkpoints(run_dir):
        if problem(checkpoint) is None and training_done(checkpoint):
            return checkpoint, last
    raise ConfigError(f"{run_dir}: no trained model to evaluate (no model/, and no complete checkpoint of the last "
                      "step): train with trainer.save_model=true or trainer.save_steps")


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict:
    """Evaluate the run again; returns the summary of this evaluation's metrics."""
    cfg = load_config(run_dir, overrides)  # a key that cannot change is named before anything else
    weights, last = trained_weights(run_dir)
    lock, held = claim(run_dir, purpose="evaluate")
    if held is not None:
        raise ConfigError(f"{run_dir} is in use by {describe(*held)}")
    try:
        stage = f"reeval-{run_id()}"
        run_files = rundir.RunFiles(run_dir, keep=lambda row: True, stage=stage)
        with GracefulStop() as stopper:
            built = pipeline.build(cfg, run_files, stopper, resume=None)
            model = built.trainer.model
            if getattr(model, "all_tied_weights_keys", None) and not model._keys_to_ignore_on_save:
                # A tied output layer is saved once: the Trainer then ties it instead of warning it is missing.
                model._keys_to_ignore_on_save = list(model.all_tied_weights_keys)
            built.trainer._load_from_checkpoint(str(weights))
            built.trainer.state.global_step, built.trainer.state.epoch = last["step"], last[measures.EPOCH]
            log.info("Evaluating %s with the weights of %s (step %d)", run_dir, weights.name, last["step"])
            pipeline.evaluate(built, stopper)
        run_files.close()
        return {k: v for event in read_jsonl(run_dir / rundir.METRICS, root=run_dir) if event.get("stage") == stage
                for k, v in event.items() if k not in ("step", "stage", rundir.FINISHED)}
    finally:
        lock.release()
