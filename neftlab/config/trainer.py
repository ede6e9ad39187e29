"""The `trainer` group: what neftlab itself reads of the training, typed, and `args`, every other Hugging Face
TrainingArguments option, passed on as it is. Which options those are is asked of the installed TrainingArguments
itself, not kept in a list beside it: a typed field is one TrainingArguments also has, and `trainer.<option>=` for
any other is the old spelling of `trainer.args.<option>=`."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Dict, Optional

from ..core.errors import ConfigError
from .checks import check, check_choice

# neftlab's own defaults where they differ from TrainingArguments' (a short CPU run logs every step; the optimizer
# every earlier neftlab run used, where transformers 5 defaults to the fused AdamW).
NEFTLAB_DEFAULTS = {"num_train_epochs": 1.0, "logging_steps": 1, "optim": "adamw_torch"}
# The TrainingArguments options neftlab sets itself, and where the user sets them instead.
NEFTLAB_TRAINING_ARGS = {
    "output_dir": "<run dir>/checkpoints", "seed": "the top-level seed", "report_to": "logger=wandb|none",
    "save_strategy": "from trainer.save_steps", "eval_strategy": "from trainer.eval_steps",
    "save_total_limit": "use trainer.save_total_limit (applied once a checkpoint is complete)",
    "resume_from_checkpoint": "use trainer.resume", "use_cpu": "CUDA when there is a GPU",
    # The Trainer's own NEFTune is neftlab's uniform kind at the row's length, with padding: one road to NEFTune.
    "neftune_noise_alpha": "use noise=uniform noise.alpha=ALPHA noise.length_mode=padded (the Trainer's own NEFTune)",
}


@dataclass
class TrainerConfig:
    """What neftlab itself reads or checks; every other Hugging Face TrainingArguments option goes in `args`."""

    max_steps: Optional[int] = 8  # 0 = evaluate the untouched model; null = train args.num_train_epochs
    learning_rate: float = 5e-5
    per_device_train_batch_size: int = 4
    eval_steps: Any = None  # also evaluate every this many steps, or at every epoch's end (epoch); null = at the end only
    save_steps: Optional[int] = None  # checkpoint every this many steps; null = no checkpoints
    save_total_limit: Optional[int] = 2  # applied by neftlab once a checkpoint is complete
    save_model: bool = True  # keep the final model in <run dir>/model (LoRA: the adapter), for re-evaluation
    # Under torchrun / accelerate launch: FSDP with the Trainer's fsdp_config (version 2, the default, whose
    # row-sharded weights neftlab reads).
    fsdp: bool = False
    fsdp_config: Dict[str, Any] = field(default_factory=dict)
    # auto: continue the newest unfinished run with this config that has a checkpoint, in the job's directory or
    # under output_root | true: the same, but an error if there is none | false | a run or checkpoint-N directory.
    resume: Any = "auto"
    take_over: bool = False  # resume even though the run's lock looks alive (its process on a node that died)
    nonfinite_loss: str = "fail"  # fail: stop at a NaN/inf train loss | skip: drop that batch's gradient
    max_skipped_steps: int = 10  # with skip: stop after this many dropped batches
    # Passed to TrainingArguments as they are (trainer.args.weight_decay=0.1, +trainer.args.use_liger_kernel=true).
    args: Dict[str, Any] = field(default_factory=lambda: dict(NEFTLAB_DEFAULTS))

    def validate(self, key: str) -> None:
        check(self.max_steps is None or self.max_steps >= 0, f"{key}.max_steps", self.max_steps,
              "an integer >= 0 (0 = evaluate only) or null (use args.num_train_epochs)")
        check(self.learning_rate > 0 and math.isfinite(self.learning_rate), f"{key}.learning_rate",
              self.learning_rate, "a finite number > 0")
        check(self.per_device_train_batch_size >= 1, f"{key}.per_device_train_batch_size",
              self.per_device_train_batch_size, "an integer >= 1")
        e = self.eval_steps
        check(e is None or e == "epoch" or (isinstance(e, int) and not isinstance(e, bool) and e >= 1),
              f"{key}.eval_steps", e, "null, an integer >= 1 or epoch")
        for name in ("save_steps", "save_total_limit"):
            value = getattr(self, name)
            check(value is None or value >= 1, f"{key}.{name}", value, "null or an integer >= 1")
        check(isinstance(self.resume, (bool, str)), f"{key}.resume", self.resume,
              "auto, true, false, or a run or checkpoint directory")
        check_choice(f"{key}.nonfinite_loss", self.nonfinite_loss, ("fail", "skip"))
        if self.fsdp:
            version = self.fsdp_config.get("version", 2)
            check(version == 2, f"{key}.fsdp_config.version", version,
                  "2 (FSDP2): noise and pruning read its row-sharded weights")
        check(self.max_skipped_steps >= 0, f"{key}.max_skipped_steps", self.max_skipped_steps, "an integer >= 0")
        for name, value in self.args.items():
            if name in NEFTLAB_TRAINING_ARGS:
                raise ConfigError(f"{key}.args.{name} is set by neftlab: {NEFTLAB_TRAINING_ARGS[name]}")
            check(name not in typed_training_args(), f"{key}.args.{name}", value, f"unset: use {key}.{name}")
            check(name in training_argument_names(), f"{key}.args.{name}", value,
                  "a TrainingArguments option of the installed transformers")
            least = lower_bound(name)
            if least is not None:
                check(isinstance(value, int) and not isinstance(value, bool) and value >= least, f"{key}.args.{name}",
                      value, f"an integer >= {least}")


def lower_bound(name: str) -> Optional[int]:
    """The least value the Trainer can use for an option TrainingArguments accepts at any integer: it divides by
    batch sizes and accumulation steps, and hands worker counts to the DataLoader."""
    if name.endswith("batch_size") or name in ("gradient_accumulation_steps", "eval_accumulation_steps"):
        return 1
    if name == "dataloader_num_workers":
        return 0
    return None


@functools.lru_cache(maxsize=1)
def training_argument_names() -> frozenset:
    from transformers import TrainingArguments
    return frozenset(f.name for f in fields(TrainingArguments) if f.init)


@functools.lru_cache(maxsize=1)
def typed_training_args() -> frozenset:
    """The TrainingArguments options neftlab types (trainer.<name>), not passed through trainer.args."""
    return frozenset(f.name for f in fields(TrainerConfig)) & training_argument_names()


def moved_training_arg(override: str) -> Optional[str]:
    """The message for `trainer.<name>=…` where <name> is a TrainingArguments option neftlab does not type."""
    name = re.match(r"^[+~]*trainer\.([A-Za-z_]+)=", override)
    if not name or name.group(1) in {f.name for f in fields(TrainerConfig)}:
        return None
    if name.group(1) in NEFTLAB_TRAINING_ARGS:
        return f"{override}: trainer.{name.group(1)} is set by neftlab: {NEFTLAB_TRAINING_ARGS[name.group(1)]}"
    if name.group(1) in training_argument_names():
        return (f"{override}: trainer.{name.group(1)} is trainer.args.{name.group(1)} (every TrainingArguments "
                "option not read by neftlab goes under trainer.args)")
    return None
