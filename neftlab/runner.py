"""One run in three stages: build it (config checks, data, model, Trainer), train it, evaluate it.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from . import data as data_mod
from . import errors, evaluation, guards, judge, models, noise, pruning, rundir, search
from . import resume as resume_mod
from .config import Config, ConfigError, check, rank
from .rundir import RunFiles
from .tracking import Recorder, WandbRun

log = logging.getLogger(__name__)

FAILED: list[tuple[str, str]] = []  # (run dir, error) of the last sweep's failed jobs, for the exit code


def training_arguments(cfg: Config, out_dir: Path):
    """TrainingArguments from neftlab's typed fields and `trainer.args`; a value the Trainer refuses is a
    ConfigError naming its `trainer.args.<key>` (found by adding the user's keys one at a time)."""
    from transformers import TrainingArguments
    t = cfg.trainer
    check(not t.fsdp or torch.cuda.is_available(), "trainer.fsdp", t.fsdp, "false without CUDA: accelerate shards "
          "only on GPUs, and on CPUs the run would train as plain DDP, every rank holding the whole model")
    if zero_stage(t.args.get("deepspeed")) == 3 and (cfg.pruning.method != "off" or cfg.noise.kind == "dynamic"):
        raise ConfigError(f"trainer.args.deepspeed={t.args['deepspeed']!r} is ZeRO stage 3, where each rank's embedding "
                          "weight is an empty placeholder (transformers #32021), so pruning and the dynamic noise "
                          "statistic would read nothing: use ZeRO stage 1 or 2, or trainer=fsdp (FSDP2), with them")
    base = dict(
        output_dir=str(out_dir / rundir.CHECKPOINTS), seed=cfg.seed, report_to=["wandb"] if cfg.logger.kind == "wandb" else [],
        max_steps=t.max_steps or -1, learning_rate=t.learning_rate, per_device_train_batch_size=t.per_device_train_batch_size,
        eval_strategy="steps" if t.eval_steps else "no", eval_steps=t.eval_steps,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps, save_total_limit=None,
        neftune_noise_alpha=t.neftune_noise_alpha, dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs data-parallel (gloo)
        fsdp=t.fsdp, fsdp_config=dict(t.fsdp_config) or None,
    )
    user = dict(t.args)
    try:
        return TrainingArguments(**{**base, **user})
    except Exception as e:  # noqa: BLE001 - TrainingArguments raises ValueError, TypeError, ImportError, ...
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        for key in user:
            try:
                TrainingArguments(**{**base, key: user[key]})
            except Exception:  # noqa: BLE001
                raise ConfigError(f"trainer.args.{key}={user[key]!r} is refused by TrainingArguments: {first}") from None
        raise ConfigError(f"trainer.args={user} is refused by TrainingArguments: {first}") from None


def zero_stage(deepspeed) -> int | None:
    """The ZeRO stage of a `trainer.args.deepspeed` config (a dict or a JSON file), None without one."""
    if deepspeed is None:
        return None
    if not isinstance(deepspeed, dict):
        try:
            deepspeed = json.loads(Path(str(deepspeed)).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"trainer.args.deepspeed={deepspeed!r}: not a readable DeepSpeed JSON config ({e})") from None
    return (deepspeed.get("zero_optimization") or {}).get("stage")


@dataclass
class Built:
    """A run ready to train: its model, data, Trainer and the callbacks the later stages read."""
    cfg: Config
    files: RunFiles
    tokenizer: Any
    data: data_mod.Prepared
    prompts: list  # what the evaluation answers (causal models)
    model: torch.nn.Module
    trainer: Any
    hook: noise.Noise
    pruner: pruning.PruningCallback | None
    guard: guards.NonFiniteGuard


def build(cfg: Config, files: RunFiles, stopper: guards.GracefulStop, resume: resume_mod.Resume | None) -> Built:
    """Data, model, noise, pruning and the Trainer with every callback, restored from `resume` when given."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, Trainer, set_seed
    set_seed(cfg.seed)
    args = training_arguments(cfg, files.dir)  # a bad trainer.args value ends here, before anything loads
    tokenizer = models.load_tokenizer(cfg.model)
    cfg.validate_context(models.context_length(cfg.model))
    data = data_mod.prepare(cfg.data, tokenizer, cfg.model.causal, cfg.seed)
    model = models.load_model(cfg.model, tokenizer, num_labels=max(len(data.label_names), 2), seed=cfg.seed)
    if cfg.data.packing:  # transformers finds packed sequences in the position ids only without a KV cache
        model.config.use_cache = False

    hook = noise.attach(model, cfg.noise.kind, alpha=cfg.noise.alpha, length_mode=cfg.noise.length_mode,
                        std=cfg.noise.std, seed=cfg.seed + 1_000_003 * rank())  # each rank its own noise
    noise_callback = noise.NoiseCallback(hook, cfg.noise, files.log)
    callbacks = [Recorder(files, sources=[noise_callback]), noise_callback]
    pruner = pruning.PruningCallback(model, cfg.pruning, files.log) if cfg.pruning.method != "off" else None
    if pruner is not None:
        callbacks.append(pruner)
    prompts = evaluation.select_prompts(cfg.eval, data.prompts) if cfg.model.causal else []  # a bad file stops here
    if prompts and cfg.eval.generate_every_eval:
        callbacks.append(evaluation.GenerateOnEvaluate(model, tokenizer, prompts, cfg.eval, files))
    noise_off = evaluation.NoiseOffTrainLoss(data.train, len(data.eval), cfg.seed, files.log)
    callbacks.append(noise_off)
    state = resume_mod.StateCheckpoint(noise_callback, pruner, keep=cfg.trainer.save_total_limit)
    guard = guards.NonFiniteGuard(model, cfg.trainer.nonfinite_loss, cfg.trainer.max_skipped_steps, files.log)
    # The guard last: it checks weights once a save has been decided.
    callbacks += [state, stopper, guards.StepAgreement(guard, stopper), guard]
    if resume is not None:
        state.load(resume.checkpoint)
    if cfg.model.causal:
        collator = (data_mod.PackedCollator() if cfg.data.packing
                    else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
        metric_fns = dict(compute_metrics=evaluation.next_token_accuracy,
                          preprocess_logits_for_metrics=evaluation.argmax_logits)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        metric_fns = dict(compute_metrics=evaluation.classification_metrics)
    trainer = Trainer(model=model, args=args, data_collator=collator,
                      train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                      callbacks=callbacks, **metric_fns)
    noise_off.trainer = trainer
    return Built(cfg, files, tokenizer, data, prompts, model, trainer, hook, pruner, guard)


def save_checkpoint(trainer) -> None:
    """A complete checkpoint at the current step, unless one is there: what a rerun continues from."""
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not (folder / rundir.MARKER).exists():
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def train(run: Built, stopper: guards.GracefulStop, resume: resume_mod.Resume | None) -> None:
    """Train with the noise attached; a signal ends it with a checkpoint at the step where every rank stopped."""
    from transformers import TrainerState
    trainer = run.trainer
    with run.hook:  # the noise is gone after training, also when training raises
        try:
            if resume is not None and resume_mod.training_done(resume.checkpoint):
                # Stopped after its last step: nothing left to train, only the evaluation to redo.
                log.info("Training finished at step %d before the interruption; evaluating only", resume.step)
                trainer._load_from_checkpoint(str(resume.checkpoint))
                trainer.state = TrainerState.load_from_json(str(resume.checkpoint / rundir.TRAINER_STATE))
            elif run.cfg.trainer.max_steps != 0:
                trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume else None)
        finally:
            run.guard.remove()
    if stopper.signum is not None:
        raise guards.Interrupted(stopper.signum, trainer.state.global_step)


def evaluate(run: Built) -> None:
    """The held-out loss and metrics, greedy generations, latency, parameter counts and stability."""
    cfg, files, model, trainer, pruner = run.cfg, run.files, run.model, run.trainer, run.pruner
    if files.stage == rundir.TRAIN:  # a re-evaluation has its own stage
        files.stage = rundir.FINAL
    trainer.evaluate()
    step = trainer.state.global_step
    prompts = run.prompts

    def latency() -> dict:
        if not cfg.model.causal:
            return evaluation.classification_latency(model, trainer.get_eval_dataloader())
        return evaluation.decoding_latency(model, run.tokenizer, prompts, cfg.eval)

    if prompts:
        samples, metrics = evaluation.generate(model, run.tokenizer, prompts, cfg.eval, step)
        files.append_samples(samples)
        files.log(step, metrics)
    files.log(step, latency())
    if pruner is not None and pruner.masks:  # time the same model unpruned: dense kernels gain nothing from zeros
        with pruner.dense():
            dense = latency()
        files.log(step, {k.replace("latency", "unpruned_latency"): v for k, v in dense.items()})
    files.log(step, {**evaluation.parameter_counts(model), **evaluation.peak_memory(),
                     **evaluation.stability(files.train_losses, cfg.eval.loss_window)})
    if cfg.eval.judge.model and prompts and files.writes:
        files.log(step, judge.judge_run(files.dir, cfg.eval.judge, cfg.seed))
    if cfg.trainer.save_model:
        guards.check_finite_weights(model, step)
        trainer.save_model(str(files.dir / rundir.MODEL))


def run(cfg: Config, files: RunFiles, resume: resume_mod.Resume | None = None) -> None:
    """Build, train, evaluate. SIGTERM/SIGINT at any point end in `guards.Interrupted` with a checkpoint of
    the step reached (during the final evaluation: of the trained model, so the rerun only evaluates)."""
    with guards.GracefulStop() as stopper:
        built = build(cfg, files, stopper, resume)
        try:
            train(built, stopper, resume)
            evaluate(built)
        except guards.Interrupted as e:
            step = built.trainer.state.global_step
            if step:
                save_checkpoint(built.trainer)
            raise guards.Interrupted(e.signum, step, saved=bool(step)) from None


def start_wandb(cfg: Config, dict_cfg: DictConfig, hydra_cfg, run_dir: Path) -> WandbRun:
    """The job's W&B run: named by its overrides, grouped by its sweep, with the resolved config for filtering."""
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    return WandbRun(cfg.logger, run_dir, OmegaConf.to_container(dict_cfg, resolve=True),
                    name=hydra_cfg.job.override_dirname or "default",
                    group=Path(hydra_cfg.sweep.dir).name if multirun else None,
                    job_type="train" if cfg.trainer.max_steps != 0 else "eval",
                    tags=[f"model:{hydra_cfg.runtime.choices.get('model', cfg.model.arch)}",
                          f"noise:{cfg.noise.kind}", f"pruning:{cfg.pruning.method}"])


def _fresh_dir(out_dir: Path) -> None:
    """A new run never writes into another run's files, unless that run failed."""
    status = rundir.status(out_dir)
    if status not in ("absent", "failed"):
        raise ConfigError(f"output directory {out_dir} already holds a run (status {status or 'unfinished'}); a "
                          "run's files are never overwritten: choose another hydra.run.dir")


def main(dict_cfg: DictConfig) -> float | list[float] | None:
    """Hydra's task function: one job of a run or a sweep. Returns the job's objective (`search.objectives`)
    for an optimizing sweeper; None when the run did not complete."""
    hydra_cfg = HydraConfig.get()
    out_dir = Path(hydra_cfg.runtime.output_dir)
    files, lock = None, resume_mod.RunLock(out_dir)
    try:
        cfg: Config = OmegaConf.to_object(dict_cfg)
        cfg.validate()
        data = resume_mod.data_fingerprint(*data_mod.source(cfg.data))
        resume = resume_mod.find_resume(cfg.trainer.resume, dict_cfg, out_dir, data)
        if resume is not None:
            lock = resume.lock
            log.info("Resuming %s from %s", resume.run_dir, resume.checkpoint.name)
            files = RunFiles(resume.run_dir, keep=resume.keeps)
        else:
            if rank() == 0:  # the other ranks would see rank 0's new files
                _fresh_dir(out_dir)
            holder = lock.acquire()
            if holder is not None:
                raise ConfigError(f"output directory {out_dir} is in use by pid {holder.get('pid')} on "
                                  f"{holder.get('host')}: choose another hydra.run.dir")
            resume_mod.record(out_dir, dict_cfg, data)
            files = RunFiles(out_dir)
        if cfg.logger.kind == "wandb" and files.writes:
            files.tracker = start_wandb(cfg, dict_cfg, hydra_cfg, files.dir)
        run(cfg, files, resume)
        keys = search.objective_keys(cfg.search.objectives, cfg.eval.judge.model is not None)
        return search.objective(files.finish("completed"), keys)
    except guards.Interrupted as e:
        log.warning("%s", e)
        _finish(files, out_dir, "interrupted", str(e), step=e.step)
        raise SystemExit(128 + e.signum)
    except KeyboardInterrupt:
        log.error("stopped at once by Ctrl-C; the last complete checkpoint, if any, is kept")
        _finish(files, out_dir, "interrupted", "stopped at once by Ctrl-C")
        raise SystemExit(130)
    except Exception as e:
        status = "failed"
        if isinstance(e, errors.NeftlabError):
            message = str(e)
        elif isinstance(e, OmegaConfBaseException):
            message = str(e).splitlines()[0]
        elif errors.disk_full(e, out_dir):
            status, message = "interrupted", (f"no space left on device ({out_dir}): free some and rerun the "
                                              "same command to resume from the last complete checkpoint")
        else:
            message = f"{type(e).__name__}: {e}"
        log.debug("Traceback:\n%s", traceback.format_exc())
        log.error("%s", message)
        log.info("Full traceback in %s", out_dir / f"{hydra_cfg.job.name}.log")
        _finish(files, out_dir, status, message)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            raise SystemExit(1)
        return None  # an optimizing sweeper records a failed trial, and its search goes on
    finally:
        lock.release()


def _finish(files: RunFiles | None, out_dir: Path, status: str, error: str, **extra) -> None:
    """summary.json for a run that ends early; before its files were opened, only into a directory no other
    run's files are in."""
    if files is None and rundir.status(out_dir) == "absent":
        files = RunFiles(out_dir)
    if files is not None:
        files.finish(status, error, **extra)


class RunGuard(Callback):
    """Checks the output directory before Hydra creates it, and after a sweep collects the jobs whose
    summary.json is not "completed", whichever launcher ran them (joblib and SLURM jobs run in other
    processes), so that `python -m neftlab -m` can exit non-zero."""

    @staticmethod
    def _check(check, path: str) -> None:
        try:
            check(Path(path))
        except ConfigError as e:  # Hydra's own logging (to stdout) is in force here, not the run's
            print(f"Error: {e}", file=sys.stderr)
            raise SystemExit(2)

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        self._check(guards.check_output_dir, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        self._check(guards.check_output_dir, config.hydra.sweep.dir)
        storage = str(config.hydra.sweeper.get("storage") or "")
        if storage.startswith("sqlite:///"):  # an Optuna study's database: SQLite does not make its folder
            study = storage.removeprefix("sqlite:///")
            self._check(guards.check_output_dir, str(Path(study).parent))
            self._check(search.check_study_file, study)
        self.started = time.time()

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        FAILED.clear()
        for path in sorted(Path(config.hydra.sweep.dir).rglob(rundir.SUMMARY)):
            if path.stat().st_mtime >= self.started:
                summary = rundir.read_json(path) or {"error": f"{path} is unreadable"}
                if summary.get("status") != "completed":
                    FAILED.append((str(path.parent), summary.get("error", summary.get("status"))))
