"""The pipeline of one run: build it (data, model, noise and pruning, the Trainer with its callbacks), train it,
evaluate it.

Noise and pruning plug in as a forward hook and TrainerCallbacks (`methods.factory`); nothing here is a training
loop, and nothing here knows the command line, Hydra or the directory decisions (`job` does): a pipeline is given
its config, its run files and, when it continues a run, the checkpoint to resume.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, TrainerCallback, TrainerState, set_seed

from .. import data as data_mod
from .. import models
from ..config import Config
from ..config.evaluation import user_measures
from ..core import measures as declared
from ..core import rundir
from ..core.errors import NeftlabError
from ..core.files import remove_tree
from ..core.rank import rank
from ..core.rundir import RunFiles
from ..data import Source
from ..data.packing import PackedCollator
from ..evaluation import generation, harness, measures
from ..evaluation.llm_judge.judging import judge_run
from ..evaluation.noise_off import NoiseOffTrainLoss
from ..methods import factory
from ..methods.passes import PassesTrainer
from ..methods.noise import NoiseKind
from ..methods.pruner import PruningCallback
from ..models import ModelFiles, parameter_counts
from ..tracking.recorder import Recorder
from .arguments import training_arguments
from .checkpoint import StateCheckpoint, checkpoints, save_checkpoint, training_done
from .nonfinite import NonFiniteGuard, StepAgreement, check_finite_weights
from .resume import Resume
from .signals import GracefulStop, Interrupted

log = logging.getLogger(__name__)


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
    noise: NoiseKind
    pruner: PruningCallback | None
    guard: NonFiniteGuard
    user: tuple = ()  # the user's measures (eval.measures)


def build(cfg: Config, files: RunFiles, stopper: GracefulStop, resume: Resume | None,
          source: Source | None = None, model_files: ModelFiles | None = None) -> Built:
    """Data, model, noise, pruning and the Trainer with every callback, restored from `resume` when given. `source`
    and `model_files` are the data and weights the job located (and fingerprinted) already."""
    set_seed(cfg.seed)
    args = training_arguments(cfg, files.dir)  # a bad trainer.args value ends here, before anything loads
    if cfg.eval.harness.tasks:  # a task whose data cannot be had here stops the run now, not after training
        harness.prepare(cfg.eval.harness)
    if cfg.eval.judge.model and cfg.model.causal:  # so does a judge that cannot be had (a typo in its path)
        models.resolve(cfg.eval.judge.model, "llama", key="eval.judge.model")
    model_files = model_files or models.locate(cfg.model)
    tokenizer = models.load_tokenizer(cfg.model, model_files)
    cfg.validate_context(models.context_length(cfg.model, model_files))
    data = data_mod.prepare(cfg.data, tokenizer, cfg.model.causal, cfg.seed, source)
    model = models.load_model(cfg.model, tokenizer, num_labels=max(len(data.label_names), 2), seed=cfg.seed,
                              files=model_files)
    if cfg.data.packing:  # transformers finds packed sequences in the position ids only without a KV cache
        model.config.use_cache = False
    user = tuple(user_measures(cfg.eval.measures, "eval.measures"))
    methods = factory.build(model, cfg.noise, cfg.pruning, cfg.seed, rank(), fresh=resume is None,
                            log_event=files.log)
    files.declare(user + methods.noise.logs)  # a report reads them from the run, without importing a user's code
    callbacks = [Recorder(files, sources=[methods.noise], causal=cfg.model.causal), *methods.callbacks]
    prompts = generation.select_prompts(cfg.eval, data.prompts) if cfg.model.causal else []  # a bad file stops here
    if prompts and cfg.eval.generate_every_eval:
        callbacks.append(generation.GenerateOnEvaluate(model, tokenizer, prompts, cfg.eval, files, user))
    if cfg.eval.harness.every_eval:
        callbacks.append(HarnessOnEvaluate(model, tokenizer, cfg, files))
    state = StateCheckpoint(methods.stateful, keep=cfg.trainer.save_total_limit)
    guard = NonFiniteGuard(model, cfg.trainer.nonfinite_loss, cfg.trainer.max_skipped_steps, files.log)
    # The guard last: it checks weights once a save has been decided.
    callbacks += [state, stopper, StepAgreement(guard, stopper), guard]
    if resume is not None:
        state.load(resume.checkpoint)
    if cfg.model.causal:
        collator = PackedCollator() if cfg.data.packing else DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        metric_fns = dict(compute_metrics=measures.next_token_accuracy,
                          preprocess_logits_for_metrics=measures.argmax_logits)
    else:
        collator = DataCollatorWithPadding(tokenizer)
        metric_fns = dict(compute_metrics=measures.classification_metrics)
    trainer = PassesTrainer(model=model, args=args, data_collator=collator, train_dataset=data.train,
                            eval_dataset=data.eval, processing_class=tokenizer, callbacks=callbacks,
                            **methods.trainer_kwargs, **metric_fns)
    trainer.add_callback(NoiseOffTrainLoss(trainer, len(data.eval), cfg.seed, files.log))
    return Built(cfg, files, tokenizer, data, prompts, model, trainer, methods.noise, methods.pruner, guard, user)


OOM_MARKS = ("out of memory", "can't allocate memory", "cannot allocate memory")


@contextlib.contextmanager
def out_of_memory_named(stage: str, knob: str) -> Iterator[None]:
    """An out-of-memory error in `stage` as one line naming the key that lowers it; the trained model is
    checkpointed before the final evaluation (`checkpoint_trained`), so the fixed command only evaluates."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not isinstance(e, MemoryError) and not any(mark in str(e).lower() for mark in OOM_MARKS):
            raise
        raise NeftlabError(f"out of memory while {stage} ({knob}): lower it; the trained model is checkpointed, "
                           "so the same command with the lower value only evaluates") from None


def checkpoint_trained(run: Built, stopper: GracefulStop) -> None:
    """The last step's checkpoint before the final evaluation, so that a kill there (the OOM killer while
    generating; torchrun, which SIGKILLs its ranks 30 s after passing a SIGTERM on, maybe in the middle of a
    generation batch) or a failure there (a judge's typo, an out-of-memory) loses no training: the rerun only
    evaluates. With `trainer.save_steps` the Trainer has saved it already; without, it is written here and removed
    when the run completes (`drop_unasked_checkpoints`). A signal during the save stops the run as in the
    evaluation (under torchrun, once every rank has saved)."""
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


def train(run: Built, stopper: GracefulStop, resume: Resume | None) -> None:
    """Train with the noise attached; a signal ends it with a checkpoint at the step where every rank stopped."""
    trainer = run.trainer
    with run.noise:  # the noise is gone after training, also when training raises
        try:
            if resume is not None and training_done(resume.checkpoint):
                # Stopped after its last step: nothing left to train, only the evaluation to redo.
                log.info("Training finished at step %d before the interruption; evaluating only", resume.step)
                trainer._load_from_checkpoint(str(resume.checkpoint))
                trainer.state = TrainerState.load_from_json(str(resume.checkpoint / rundir.TRAINER_STATE))
            elif run.cfg.trainer.max_steps != 0:
                trainer.train(resume_from_checkpoint=str(resume.checkpoint) if resume else None)
        finally:
            run.guard.remove()
    if stopper.signum is not None:
        raise Interrupted(stopper.signum, trainer.state.global_step)


def evaluate(run: Built, stopper: GracefulStop | None = None) -> None:
    """The held-out loss and metrics, greedy generations, latency, parameter counts and convergence, the user's
    measures with them; the answers are marked finished once all of it is done, before the judge reads them. Under
    torchrun a stop signal is agreed on by all ranks between these stages and between generation batches."""
    cfg, files, model, trainer, pruner = run.cfg, run.files, run.model, run.trainer, run.pruner
    stopper = stopper or GracefulStop()
    with stopper.deferring(trainer.args.world_size > 1):
        if files.stage == rundir.TRAIN:  # a re-evaluation has its own stage
            files.stage = rundir.FINAL
        trainer.evaluate()
        step = trainer.state.global_step
        files.log(step, measures.held_out_measures(list(run.user), model, run.tokenizer, trainer.eval_dataset))
        stopper.agree(step)
        prompts = run.prompts

        def latency() -> dict:
            if not cfg.model.causal:
                return measures.classification_latency(model, trainer.get_eval_dataloader())
            return generation.decoding_latency(model, run.tokenizer, prompts, cfg.eval)

        if prompts:
            with out_of_memory_named("generating the answers", f"eval.batch_size={cfg.eval.batch_size}"):
                samples, metrics = generation.generate(model, run.tokenizer, prompts, cfg.eval, step,
                                                       between_batches=lambda: stopper.agree(step), user=run.user)
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
        counts = parameter_counts(model)
        if pruner is None:  # a model's own few zeros (padding rows) are no parameter reduction
            counts.pop(declared.PARAM_REDUCTION.key)
        files.log(step, {**counts, **measures.peak_memory(),
                         **measures.convergence(files.train_losses, cfg.eval.loss_window)})
        if cfg.trainer.save_model:  # before the judge, which runs on rank 0 alone: the save is a collective
            save_model(trainer, files.dir / rundir.MODEL, step)
        files.finish_answers()
        if cfg.eval.judge.model and prompts and files.writes:
            files.log(step, judge_run(files.dir, cfg.eval.judge, cfg.seed))


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
    """The final weights into `folder`, never NaN/inf ones, and never a torn folder: they are written beside it and
    renamed into place once whole (a full disk mid-save leaves no `model/`, and the rerun saves again). Under FSDP
    the full weights are gathered from every rank first (the Trainer itself saves nothing for FSDP's
    SHARDED_STATE_DICT, the fsdp preset's), and rank 0 writes them."""
    check_finite_weights(trainer.model, step)
    partial = folder.with_name(folder.name + ".partial")
    if trainer.args.should_save:
        remove_tree(partial, root=folder.parent)  # left by a save that was cut off
    if not trainer.is_fsdp_enabled:
        trainer.save_model(str(partial))
    else:
        state_dict = trainer.accelerator.get_state_dict(trainer.model)  # a collective: every rank takes part
        if trainer.args.should_save:
            trainer._save(str(partial), state_dict=state_dict)
    if trainer.args.should_save:
        remove_tree(folder, root=folder.parent)  # an earlier save of the same weights (a run that only evaluated)
        partial.rename(folder)


def run(cfg: Config, files: RunFiles, resume: Resume | None = None, source: Source | None = None,
        model_files: ModelFiles | None = None) -> None:
    """Build, train, evaluate. A stop signal at any point ends in `Interrupted` with a checkpoint of the
    step reached (during the final evaluation: of the trained model, so the rerun only evaluates); signals that
    come while that checkpoint is written are held until it is complete."""
    with GracefulStop() as stopper:
        built = build(cfg, files, stopper, resume, source, model_files)
        try:
            train(built, stopper, resume)
            checkpoint_trained(built, stopper)
            evaluate(built, stopper)
        except Interrupted as e:
            step = built.trainer.state.global_step
            if step:
                with stopper.finishing():
                    save_checkpoint(built.trainer)
            raise Interrupted(e.signum, step, saved=bool(step)) from None


def drop_unasked_checkpoints(cfg: Config, files: RunFiles) -> None:
    """Without `trainer.save_steps` a completed run keeps no checkpoint: those written for a rerun (the trained
    model's before the final evaluation, a stop's) go, but only once summary.json says `completed`, so that a
    kill or a full disk before that still finds them."""
    if cfg.trainer.save_steps is None and files.writes and rundir.status(files.dir) == "completed":
        for checkpoint in checkpoints(files.dir):
            remove_tree(checkpoint, root=files.dir)
