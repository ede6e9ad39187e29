"""`python -m neftlab.evaluate RUN_DIR [eval.KEY=VALUE ...] [--wandb]`: evaluate a finished run again, without
retraining.

Loads the run's own config, applies `eval.*` overrides (other prompts, more tokens, a judge), loads the
trained weights from `RUN_DIR/model/` (kept by default) or from its final checkpoint, and runs the same
evaluation stage as the end of training (`pipeline.evaluate`). Its events are appended to the run's
metrics.jsonl and samples.jsonl at the run's last step, with a stage of their own (`reeval-<id>`); the
training's files (summary.json, checkpoints, model/) are left as they are. It logs to the run's files only;
with --wandb it also adds its numbers to the run's own W&B record (`reeval/…`).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import guards, resume, rundir
from .config import Config, ConfigError, register, run_id
from .errors import NeftlabError

log = logging.getLogger("neftlab.evaluate")


def load_config(run_dir: Path, overrides: list[str]) -> Config:
    """The run's resolved config with `eval.*` overrides; any other key would evaluate another model or data."""
    saved = run_dir / rundir.CONFIG
    if not saved.is_file():
        raise ConfigError(f"{run_dir}: no .hydra/config.yaml, not a neftlab run directory")
    others = [o for o in overrides if not o.startswith("eval.")]
    if others:
        raise ConfigError(f"{' '.join(others)}: only eval.* keys can change on re-evaluation (the model and data "
                          "are the run's own)")
    register()
    merged = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved), OmegaConf.from_dotlist(overrides))
    cfg: Config = OmegaConf.to_object(merged)
    cfg.trainer.save_model = False  # model/ is the training's, never rewritten
    cfg.logger.kind = "none"  # the run files only; --wandb adds to the run's own W&B record afterwards
    # A relative data.path was relative to where the run started: the fingerprint holds the file it read.
    recorded = ((rundir.read_json(run_dir / rundir.FINGERPRINT) or {}).get("data") or {}).get("path")
    if cfg.data.path and recorded and not Path(cfg.data.path).expanduser().is_absolute():
        cfg.data.path = recorded
    return cfg.validate()


def trained_weights(run_dir: Path) -> tuple[Path, dict]:
    """(where the trained weights are, the last training event: its step and epoch): model/, else the checkpoint
    of the last step."""
    trained = [e for e in rundir.trained_events(run_dir) if "train/epoch" in e]
    last = trained[-1] if trained else {"step": 0, "train/epoch": 0}
    if (run_dir / rundir.MODEL).is_dir():
        return run_dir / rundir.MODEL, last
    for checkpoint in resume.checkpoints(run_dir):
        if resume.problem(checkpoint) is None and resume.training_done(checkpoint):
            return checkpoint, last
    raise ConfigError(f"{run_dir}: no trained model to evaluate (no model/, and no complete checkpoint of the last "
                      "step): train with trainer.save_model=true or trainer.save_steps")


def evaluate_run(run_dir: Path, overrides: list[str]) -> dict:
    """Evaluate the run again; returns the summary of this evaluation's metrics."""
    from . import pipeline

    cfg = load_config(run_dir, overrides)  # a key that cannot change is named before anything else
    weights, last = trained_weights(run_dir)
    lock = resume.RunLock(run_dir)
    held = lock.acquire()
    if held is not None:
        raise ConfigError(f"{run_dir} is in use by {resume.describe(*held)}")
    try:
        stage = f"reeval-{run_id()}"
        run_files = rundir.RunFiles(run_dir, keep=lambda row: True, stage=stage)
        with guards.GracefulStop() as stopper:
            built = pipeline.build(cfg, run_files, stopper, resume=None)
            model = built.trainer.model
            if getattr(model, "all_tied_weights_keys", None) and not model._keys_to_ignore_on_save:
                # A tied output layer is saved once: the Trainer then ties it instead of warning it is missing.
                model._keys_to_ignore_on_save = list(model.all_tied_weights_keys)
            built.trainer._load_from_checkpoint(str(weights))
            built.trainer.state.global_step, built.trainer.state.epoch = last["step"], last["train/epoch"]
            log.info("Evaluating %s with the weights of %s (step %d)", run_dir, weights.name, last["step"])
            pipeline.evaluate(built, stopper)
        run_files.close()
        return {k: v for event in rundir.read_jsonl(run_dir / rundir.METRICS) if event.get("stage") == stage
                for k, v in event.items() if k not in ("step", "stage")}
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory")
    parser.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.max_new_tokens=512")
    parser.add_argument("--wandb", action="store_true", help="also add the numbers to the run's own W&B record "
                        "(reeval/<key>), for a run that logged to W&B")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(name)s][%(levelname)s] - %(message)s")
    try:
        metrics = evaluate_run(args.run_dir, args.overrides)
    except NeftlabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OmegaConfBaseException as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except guards.Interrupted as e:
        print(f"stopped by {signal.Signals(e.signum).name}; what it logged so far is in metrics.jsonl", file=sys.stderr)
        return 128 + e.signum
    for key, value in sorted(metrics.items()):
        print(f"{key}: {value}")
    if args.wandb:
        from .tracking import update_summary
        added = update_summary(args.run_dir, {"reeval/" + k.split("/", 1)[-1] if "/" in k else k: v
                                              for k, v in metrics.items()})
        print("W&B: added to the run's record" if added else "W&B: the run logged no W&B record; nothing added")
    return 0


if __name__ == "__main__":
    sys.exit(main())
