"""The pipeline of one run: build it (config checks, data, model, Trainer), train it, evaluate it.

Noise and pruning plug in as a forward hook and TrainerCallbacks; nothing here is a training loop, and nothing
here knows the command line, Hydra or the directory decisions (`runner` does): a pipeline is given its config,
its run files and, when it continues a run, the checkpoint to resume.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from . import data as data_mod
from . import generation, guards, harness, judge, measures, models, noise, pruning, rundir
from . import resume as resume_mod
from .config import Config, ConfigError, check
from .rundir import RunFiles
from .sharding import rank
from .tracking import Recorder

log = logging.getLogger(__name__)


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
        output_dir=str(out_dir / rundir.CHECKPOINTS), seed=cfg.seed, report_to=[],  # neftlab logs to W&B itself
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
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, set_seed

    from .freelb import FreeLB, FreeLBTrainer
    set_seed(cfg.seed)
    args = training_arguments(cfg, files.dir)  # a bad trainer.args value ends here, before anything loads
    if cfg.eval.harness.tasks:  # a task whose data cannot be had here stops the run now, not after training
        harness.prepare(cfg.eval.harness)
    tokenizer = models.load_tokenizer(cfg.model)
    cfg.validate_context(models.context_length(cfg.model))
    data = data_mod.prepare(cfg.data, tokenizer, cfg.model.causal, cfg.seed)
    model = models.load_model(cfg.model, tokenizer, num_labels=max(len(data.label_names), 2), seed=cfg.seed)
    if cfg.data.packing:  # transformers finds packed sequences in the position ids only without a KV cache
        model.config.use_cache = False

    if cfg.noise.kind == "noisytune" and resume is None:  # the same on every rank; a checkpoint holds it already
        files.log(0, {"noise/noisytune_tensors": noise.noisytune(model, cfg.noise.intensity, cfg.seed)})
    hook = noise.from_config(model, cfg.noise, seed=cfg.seed + 1_000_003 * rank())  # each rank its own noise
    noise_callback = noise.NoiseCallback(hook, cfg.noise, files.log)
    callbacks = [Recorder(files, sources=[noise_callback], causal=cfg.model.causal), noise_callback]
    pruner = pruning.PruningCallback(model, cfg.pruning, files.log) if cfg.pruning.method != "off" else None
    if pruner is not None:
        callbacks.append(pruner)
    prompts = generation.select_prompts(cfg.eval, data.prompts) if cfg.model.causal else []  # a bad file stops here
    if prompts and cfg.eval.generate_every_eval:
        callbacks.append(generation.GenerateOnEvaluate(model, tokenizer, prompts, cfg.eval, files))
    if cfg.eval.harness.every_eval:
        callbacks.append(HarnessOnEvaluate(model, tokenizer, cfg, files))
    noise_off = measures.NoiseOffTrainLoss(data.train, len(data.eval), cfg.seed, files.log)
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
        metric_fns = dict(compute_metrics=measures.next_token_accuracy,
                          preprocess_logits_for_metrics=measures.argmax_logits)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        metric_fns = dict(compute_metrics=measures.classification_metrics)
    trainer = FreeLBTrainer(model=model, args=args, data_collator=collator,
                            train_dataset=data.train, eval_dataset=data.eval, processing_class=tokenizer,
                            callbacks=callbacks, **metric_fns)
    trainer.freelb = hook if isinstance(hook, FreeLB) else None
    noise_off.trainer = trainer
    return Built(cfg, files, tokenizer, data, prompts, model, trainer, hook, pruner, guard)


def save_checkpoint(trainer) -> None:
    """A complete checkpoint at the current step, unless one is there: what a rerun continues from."""
    folder = Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not (folder / rundir.MARKER).exists():
        trainer._save_checkpoint(trainer.model_wrapped, trial=None)
        trainer.control = trainer.callback_handler.on_save(trainer.args, trainer.state, trainer.control)


def checkpoint_trained(run: Built, stopper: guards.GracefulStop) -> None:
    """The last step's checkpoint before the final evaluation, so that a kill there (the OOM killer while
    generating; torchrun, which SIGKILLs its ranks 30 s after passing a SIGTERM on, maybe in the middle of a
    generation batch) loses no training: the rerun only evaluates. With `trainer.save_steps` the Trainer has
    saved it already; without, it is written here and removed when the run completes
    (`drop_unasked_checkpoints`). A signal during the save stops the run as in the evaluation (under torchrun,
    once every rank has saved)."""
    trainer = run.trainer
    if run.cfg.trainer.save_steps is not None or not trainer.state.global_step:
        return
    start = time.perf_counter()
    with stopper.deferring(trainer.args.world_size > 1):
        save_checkpoint(trainer)
        stopper.agree(trainer.state.global_step)
    log.info("Saved checkpoint-%d before the final evaluation in %.1f s, so that a kill there loses no training; "
             "it is removed when the run completes (trainer.save_steps=null)", trainer.state.global_step,
             time.perf_counter() - start)


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


def evaluate(run: Built, stopper: guards.GracefulStop | None = None) -> None:
    """The held-out loss and metrics, greedy generations, latency, parameter counts and convergence. Under
    torchrun a stop signal is agreed on by all ranks between these stages and between generation batches."""
    cfg, files, model, trainer, pruner = run.cfg, run.files, run.model, run.trainer, run.pruner
    stopper = stopper or guards.GracefulStop()
    with stopper.deferring(trainer.args.world_size > 1):
        if files.stage == rundir.TRAIN:  # a re-evaluation has its own stage
            files.stage = rundir.FINAL
        trainer.evaluate()
        step = trainer.state.global_step
        stopper.agree(step)
        prompts = run.prompts

        def latency() -> dict:
            if not cfg.model.causal:
                return measures.classification_latency(model, trainer.get_eval_dataloader())
            return generation.decoding_latency(model, run.tokenizer, prompts, cfg.eval)

        if prompts:
            samples, metrics = generation.generate(model, run.tokenizer, prompts, cfg.eval, step,
                                                   between_batches=lambda: stopper.agree(step))
            files.append_samples(samples)
            files.log(step, metrics)
        stopper.agree(step)
        files.log(step, latency())
        stopper.agree(step)
        if cfg.eval.harness.tasks:
            run_harness(model, run.tokenizer, cfg, files, step)
            stopper.agree(step)
        if pruner is not None and pruner.masks:  # the same model unpruned: dense kernels gain nothing from zeros
            with pruner.dense():
                dense = latency()
            files.log(step, {k.replace("latency", "unpruned_latency"): v for k, v in dense.items()})
        counts = measures.parameter_counts(model)
        if pruner is None:  # a model's own few zeros (padding rows) are no parameter reduction
            counts.pop("efficiency/param_reduction")
        files.log(step, {**counts, **measures.peak_memory(),
                         **measures.convergence(files.train_losses, cfg.eval.loss_window)})
        if cfg.trainer.save_model:  # before the judge, which runs on rank 0 alone: the save is a collective
            save_model(trainer, files.dir / rundir.MODEL, step)
        if cfg.eval.judge.model and prompts and files.writes:
            files.log(step, judge.judge_run(files.dir, cfg.eval.judge, cfg.seed))


def run_harness(model, tokenizer, cfg: Config, files: RunFiles, step: int) -> None:
    """The lm-eval tasks on the model as it is now, into the run's files."""
    metrics, rows = harness.run(model, tokenizer, cfg.eval.harness, cfg.seed)
    files.log(step, metrics)
    files.append_harness(step, rows)


class HarnessOnEvaluate(TrainerCallback):
    """With `eval.harness.every_eval`: the lm-eval tasks at every `trainer.eval_steps` evaluation during training
    (the last step's are the final evaluation's)."""

    def __init__(self, model, tokenizer, cfg: Config, files: RunFiles):
        self.model, self.tokenizer, self.cfg, self.files = model, tokenizer, cfg, files

    def on_evaluate(self, args, state, control, **kwargs):
        if state.global_step < state.max_steps:
            run_harness(self.model, self.tokenizer, self.cfg, self.files, state.global_step)


def save_model(trainer, folder: Path, step: int) -> None:
    """The final weights into `folder`, never NaN/inf ones. Under FSDP the full weights are gathered from every
    rank first (the Trainer itself saves nothing for FSDP's SHARDED_STATE_DICT, the fsdp preset's), and rank 0
    writes them."""
    guards.check_finite_weights(trainer.model, step)
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(folder))
        return
    state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank takes part
    if trainer.args.should_save:
        trainer._save(str(folder), state_dict=state_dict)


def run(cfg: Config, files: RunFiles, resume: resume_mod.Resume | None = None) -> None:
    """Build, train, evaluate. A stop signal at any point ends in `guards.Interrupted` with a checkpoint of the
    step reached (during the final evaluation: of the trained model, so the rerun only evaluates); signals that
    come while that checkpoint is written are held until it is complete."""
    with guards.GracefulStop() as stopper:
        built = build(cfg, files, stopper, resume)
        try:
            train(built, stopper, resume)
            checkpoint_trained(built, stopper)
            evaluate(built, stopper)
        except guards.Interrupted as e:
            step = built.trainer.state.global_step
            if step:
                with stopper.finishing():
                    save_checkpoint(built.trainer)
            raise guards.Interrupted(e.signum, step, saved=bool(step)) from None


def drop_unasked_checkpoints(cfg: Config, files: RunFiles) -> None:
    """Without `trainer.save_steps` a completed run keeps no checkpoint: those written for a rerun (the trained
    model's before the final evaluation, a stop's) go, but only once summary.json says `completed`, so that a
    kill or a full disk before that still finds them."""
    if cfg.trainer.save_steps is None and files.writes and rundir.status(files.dir) == "completed":
        for checkpoint in resume_mod.checkpoints(files.dir):
            shutil.rmtree(checkpoint)
