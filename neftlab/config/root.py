"""The root schema: one run's whole config, its groups, and the rules no single group can see."""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any

from omegaconf import MISSING

from ..core.errors import ConfigError
from .checks import check, check_finite
from .evaluation import EvalConfig
from .groups import DataConfig, LoggerConfig, ModelConfig, PruningConfig
from .objectives import SearchConfig
from .trainer import TrainerConfig


@dataclass
class Config:
    seed: int = 42
    # Where runs, sweeps and studies go (hydra.run.dir and the sweep dirs are under it), and the only place an
    # auto-resume looks for a run to continue besides the job's own directory.
    output_root: str = "outputs"
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    noise: Any = MISSING  # the kind's own typed config (`noise.typed`): its class names it, so it is not typed here
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
        if self.data.packing and not self.model.causal:
            raise ConfigError(f"data.packing=true packs causal-LM examples; model.arch={self.model.arch} classifies")
        self.noise.validate_run(self)
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
