"""The schemas of the config groups that describe what is trained: `model`, `data`, `pruning`, and where its
numbers go, `logger` (a noise kind's schema is its class's: `noise.py`). Each field has its type, default and
range; `validate` checks the ranges, naming the key, the value and what is allowed."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from .checks import check, check_choice


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


PRUNING_KINDS = ("off", "l1", "l2")


@dataclass
class PruningConfig:
    kind: str = "off"  # off | l1 (element-wise |w|) | l2 (whole token rows by L2 norm)
    ratio: float = 0.3  # fraction of the scope set to zero
    interval: int = 100  # re-prune every this many optimizer steps
    schedule: str = "constant"  # constant | gradual (cubic ramp, Zhu & Gupta 2017)
    initial_ratio: float = 0.0  # gradual only: the ratio at step 0
    ramp_steps: int = 1000  # gradual only: steps to reach `ratio`
    scope: str = "embedding"  # embedding | all_linear

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, PRUNING_KINDS)
        check(0 <= self.ratio < 1, f"{key}.ratio", self.ratio, "a fraction in [0, 1)")
        check(self.interval >= 1, f"{key}.interval", self.interval, "an integer >= 1")
        check_choice(f"{key}.schedule", self.schedule, ("constant", "gradual"))
        check_choice(f"{key}.scope", self.scope, ("embedding", "all_linear"))
        if self.schedule == "gradual":
            check(0 <= self.initial_ratio <= self.ratio, f"{key}.initial_ratio", self.initial_ratio,
                  f"within [0, {key}.ratio = {self.ratio}]")
            check(self.ramp_steps >= 1, f"{key}.ramp_steps", self.ramp_steps, "an integer >= 1 with schedule=gradual")


@dataclass
class LoggerConfig:
    kind: str = "none"  # none | wandb
    mode: str = "auto"  # auto: $WANDB_MODE, else online with W&B credentials, else offline | online | offline | disabled
    project: Optional[str] = None  # null: $WANDB_PROJECT, else "neftlab"
    entity: Optional[str] = None  # null: $WANDB_ENTITY, else your default entity

    def validate(self, key: str) -> None:
        check_choice(f"{key}.kind", self.kind, ("none", "wandb"))
        check_choice(f"{key}.mode", self.mode, ("auto", "online", "offline", "disabled"))
