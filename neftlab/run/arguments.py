"""The Trainer's TrainingArguments, from neftlab's typed `trainer.*` fields and `trainer.args` as they are; a value
TrainingArguments refuses is named by its key before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import TrainingArguments

from ..config import Config
from ..config.checks import check
from ..core import rundir
from ..core.errors import ConfigError, first_line


def training_arguments(cfg: Config, out_dir: Path):
    """TrainingArguments from neftlab's typed fields and `trainer.args`; a value the Trainer refuses is a
    ConfigError naming its `trainer.args.<key>` (found by adding the user's keys one at a time)."""
    t = cfg.trainer
    check(not t.fsdp or torch.cuda.is_available(), "trainer.fsdp", t.fsdp, "false without CUDA: accelerate shards "
          "only on GPUs, and on CPUs the run would train as plain DDP, every rank holding the whole model")
    if zero_stage(t.args.get("deepspeed")) == 3 and (cfg.pruning.kind != "off" or cfg.noise.kind == "dynamic"):
        raise ConfigError(f"trainer.args.deepspeed={t.args['deepspeed']!r} is ZeRO stage 3, where each rank's embedding "
                          "weight is an empty placeholder (transformers #32021), so pruning and the dynamic noise "
                          "statistic would read nothing: use ZeRO stage 1 or 2, or trainer=fsdp (FSDP2), with them")
    base = dict(
        output_dir=str(out_dir / rundir.CHECKPOINTS), seed=cfg.seed, report_to=[],  # neftlab logs to W&B itself
        max_steps=t.max_steps or -1, learning_rate=t.learning_rate, per_device_train_batch_size=t.per_device_train_batch_size,
        eval_strategy="epoch" if t.eval_steps == "epoch" else "steps" if t.eval_steps else "no",
        eval_steps=t.eval_steps if t.eval_steps != "epoch" else None,
        save_strategy="steps" if t.save_steps else "no", save_steps=t.save_steps, save_total_limit=None,
        dataloader_pin_memory=torch.cuda.is_available(),
        use_cpu=not torch.cuda.is_available(),  # also what makes torchrun on CPUs data-parallel (gloo)
        fsdp=t.fsdp, fsdp_config=dict(t.fsdp_config) or None,
    )
    user = dict(t.args)
    try:
        return TrainingArguments(**{**base, **user})
    except Exception as e:  # noqa: BLE001 - TrainingArguments raises ValueError, TypeError, ImportError, ...
        first = first_line(e)
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
