"""One run: validate the config, load data and model, train with the Hugging Face Trainer, evaluate, write files.

Noise and pruning plug in as a forward hook and TrainerCallbacks; nothing here is a
training loop. Errors end the run with status "failed" in summary.json and one line on the
terminal; the traceback goes to the run's log file.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import traceback
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import data as data_mod
from . import evaluation, models, noise, pruning, safety
from .config import Config, ConfigError, rank
from .tracking import Recorder, RunFiles, WandbRun

log = logging.getLogger(__name__)

EXPECTED_ERRORS = (ConfigError, data_mod.DataError, models.ModelLoadError, noise.NoiseError, safety.NonFiniteError)
FAILED: list[tuple[str, str]] = []  # (run dir, error) of the last sweep's failed jobs, for the exit code


def training_arguments(cfg: Config, out_dir: Path):
    from transformers import TrainingArguments
    t = cfg.trainer
    return TrainingArguments(
        output_dir=str(out_dir / "checkpoints"), seed=cfg.seed, report_to=["wandb"] if cfg.logger.kind == "wandb" else [],
        max_steps=t.max_steps or -1, num_train_epochs=t.num_train_epochs, learning_rate=t.learning_rate,
        lr_scheduler_type=t.lr_scheduler_type, warmup_steps=t.warmup_steps, weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm, optim=t.optim, per_device_train_batch_size=t.per_device_train_batch_size,
        per_device_eval_batch_size=t.per_device_eval_batch_size,
        gradient_accumulation_steps=t.gradient_accumulation_steps, activation_checkpointing=t.activation_checkpointing,
        bf16=t.bf16, logging_steps=t.logging_steps, eval_strategy="steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps, save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps,
        save_total_limit=t.save_total_limit, dataloader_num_workers=t.dataloader_num_workers,
        neftune_noise_alpha=t.neftune_noise_alpha, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs data-parallel (gloo)
        ddp_backend=t.ddp_backend, fsdp=t.fsdp, fsdp_config=dict(t.fsdp_config) or None,
    )


def run(cfg: Config, files: RunFiles, resume: safety.Resume | None = None) -> None:
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, set_seed
    set_seed(cfg.seed)
    tokenizer = models.load_tokenizer(cfg.model)
    data = data_mod.prepare(cfg.data, tokenizer, cfg.model.causal, cfg.seed)
    model = models.load_model(cfg.model, tokenizer, num_labels=max(len(data.label_names), 2), seed=cfg.seed)

    hook = noise.attach(model, cfg.noise.kind, alpha=cfg.noise.alpha, length_mode=cfg.noise.length_mode,
                        std=cfg.noise.std, seed=cfg.seed + 1_000_003 * rank())  # each rank its own noise
    noise_callback = noise.NoiseCallback(hook, cfg.noise, files.log)
    callbacks = [Recorder(files, sources=[noise_callback]), noise_callback]
    pruner = pruning.PruningCallback(model, cfg.pruning, files.log) if cfg.pruning.method != "off" else None
    if pruner is not None:
        callbacks.append(pruner)
    state = safety.StateCheckpoint(noise_callback, pruner)
    stopper = safety.GracefulStop()
    guard = safety.NonFiniteGuard(model, cfg.trainer.nonfinite_loss, cfg.trainer.max_skipped_steps, files.log)
    callbacks += [state, stopper, guard]  # the guard last: it checks weights once a save has been decided
    if resume is not None:
        state.load(resume.checkpoint)
    if cfg.model.causal:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        metric_fns = dict(compute_metrics=evaluation.next_token_accuracy,
                          preprocess_logits_for_metrics=evaluation.argmax_logits)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        metric_fns = dict(compute_metrics=evaluation.classification_metrics)
    trainer = Trainer(model=model, args=training_arguments(cfg, files.dir), data_collator=collator,
                      train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                      callbacks=callbacks, **metric_fns)

    with hook:  # the noise is gone after training, also when training raises
        try:
            if cfg.trainer.max_steps != 0:
                trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume else None)
        finally:
            stopper.restore()
            guard.remove()
    if stopper.signum is not None:
        raise safety.Interrupted(stopper.signum, trainer.state.global_step)
    trainer.evaluate()

    step = trainer.state.global_step
    prompts = data.prompts[: cfg.eval.num_generations]

    def generations_and_latency() -> tuple[list, dict]:
        if not cfg.model.causal:
            return [], evaluation.classification_latency(model, trainer.get_eval_dataloader())
        return evaluation.generate(model, tokenizer, prompts, cfg.eval) if prompts else ([], {})

    samples, metrics = generations_and_latency()
    if samples:
        files.write_samples(samples)
    files.log(step, metrics)
    if pruner is not None and pruner.masks:  # time the same model unpruned: dense kernels gain nothing from zeros
        with pruner.dense():
            dense = generations_and_latency()[1]
        files.log(step, {k.replace("latency", "unpruned_latency"): v for k, v in dense.items() if "latency" in k})
    files.log(step, {**evaluation.parameter_counts(model), **evaluation.peak_memory(),
                     **evaluation.stability(files.train_losses, cfg.eval.loss_window)})
    if cfg.trainer.save_model:
        safety.check_finite_weights(model, step)
        trainer.save_model(str(files.dir / "model"))


def start_wandb(cfg: Config, dict_cfg: DictConfig, hydra_cfg, run_dir: Path) -> WandbRun:
    """The job's W&B run: named by its overrides, grouped by its sweep, with the resolved config for filtering."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return WandbRun(cfg.logger, run_dir, OmegaConf.to_container(dict_cfg, resolve=True),
                    name=hydra_cfg.job.override_dirname or "default",
                    group=Path(hydra_cfg.sweep.dir).name if multirun else None,
                    job_type="train" if cfg.trainer.max_steps != 0 else "eval",
                    tags=[f"model:{hydra_cfg.runtime.choices.get('model', cfg.model.arch)}",
                          f"noise:{cfg.noise.kind}", f"pruning:{cfg.pruning.method}"])


def main(dict_cfg: DictConfig) -> dict:
    """Hydra's task function: one job of a run or a sweep."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    files = None
    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
        cfg.validate()
        resume = safety.find_resume(cfg.trainer.resume, dict_cfg, out_dir)
        if resume is not None:
            log.info("Resuming %s from %s", resume.run_dir, resume.checkpoint.name)
        files = RunFiles(resume.run_dir if resume else out_dir, resume_step=resume.step if resume else None)
        if cfg.logger.kind == "wandb" and files.writes:
            files.tracker = start_wandb(cfg, dict_cfg, hydra_cfg, files.dir)
        run(cfg, files, resume)
    except safety.Interrupted as e:
        log.warning("%s", e)
        files.finish("interrupted", str(e), step=e.step)
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:
        (files or RunFiles(out_dir)).finish("interrupted")
        raise
    except Exception as e:
        if isinstance(e, EXPECTED_ERRORS):
            message = str(e)
        elif isinstance(e, OmegaConfBaseException):
            message = str(e).splitlines()[0]
        else:
            message = f"{type(e).__name__}: {e}"
        log.debug("Traceback:\n%s", traceback.format_exc())
        log.error("%s", message)
        log.info("Full traceback in %s", out_dir / f"{hydra_cfg.job.name}.log")
        summary = (files or RunFiles(out_dir)).finish("failed", message)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(1)
        return summary
    return files.finish("completed")


class RunGuard(Callback):
    """Checks the output directory before Hydra creates it, and after a sweep collects the jobs whose
    summary.json is not "completed", whichever launcher ran them (joblib and SLURM jobs run in other
    processes), so that `python -m neftlab -m` can exit non-zero."""

    @staticmethod
    def _check(path: str) -> None:
        try:
            safety.check_output_dir(Path(path))
        except ConfigError as e:  # Hydra's own logging (to stdout) is in force here, not the run's
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(config.hydra.sweep.dir)
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        FAILED.clear()
        for path in sorted(Path(config.hydra.sweep.dir).rglob("summary.json")):
            if path.stat().st_mtime >= self.started:
                summary = json.loads(path.read_text())
                if summary.get("status") != "completed":
                    FAILED.append((str(path.parent), summary.get("error", summary.get("status"))))
