"""`python -m neftlab.evaluate RUN_DIR [eval.KEY=VALUE ...]`: evaluate a finished run again, without retraining.

Loads the run's own config, applies `eval.*` overrides (other prompts, more tokens, a judge), loads the
trained weights from `RUN_DIR/model/` or from its final checkpoint, and runs the same evaluation stage as
the end of training (`pipeline.evaluate`). Its events are appended to the run's metrics.jsonl and
samples.jsonl at the run's last step; the training's files (summary.json, checkpoints, model/) are left
as they are.
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

    weights, last = trained_weights(run_dir)
    cfg = load_config(run_dir, overrides)
    lock = resume.RunLock(run_dir)
    holder = lock.acquire()
    if holder is not None:
        raise ConfigError(f"{run_dir} is in use by pid {holder.get('pid')} on {holder.get('host')}")
    try:
        stage = f"reeval-{run_id()}"
        run_files = rundir.RunFiles(run_dir, keep=lambda row: True, stage=stage)
        with guards.GracefulStop() as stopper:
            built = pipeline.build(cfg, run_files, stopper, resume=None)
            built.trainer._load_from_checkpoint(str(weights))
            built.trainer.state.global_step, built.trainer.state.epoch = last["step"], last["train/epoch"]
            log.info("Evaluating %s with the weights of %s (step %d)", run_dir, weights.name, last["step"])
            pipeline.evaluate(built)
        run_files.close()
        return {k: v for event in rundir.read_jsonl(run_dir / rundir.METRICS) if event.get("stage") == stage
                for k, v in event.items() if k not in ("step", "stage")}
    finally:
        lock.release()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m neftlab.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished run's directory")
    parser.add_argument("overrides", nargs="*", help="eval.* overrides, e.g. eval.max_new_tokens=512")
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
