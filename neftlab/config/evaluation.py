"""The `eval` schema: what a run measures after training, its answers, the local judge and lm-evaluation-harness."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional

from ..core import measures as declared
from ..core.errors import ConfigError
from .checks import check, check_choice
from .plugins import build


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
    # A user's measures, each `{_target_: module.name, ...}` naming a function declared with
    # neftlab.core.measures.declare (its module listed in $NEFTLAB_PLUGINS): computed after training with the others
    measures: List[Any] = field(default_factory=list)

    def validate(self, key: str) -> None:
        self.judge.validate(f"{key}.judge")
        self.harness.validate(f"{key}.harness")
        user_measures(self.measures, f"{key}.measures")
        check(self.num_generations is None or self.num_generations >= 0, f"{key}.num_generations",
              self.num_generations, "null (all prompts) or an integer >= 0")
        check(self.max_new_tokens >= 1, f"{key}.max_new_tokens", self.max_new_tokens, "an integer >= 1")
        check(self.batch_size >= 1, f"{key}.batch_size", self.batch_size, "an integer >= 1")
        check(self.prompts is None or Path(self.prompts).suffix.lower() in (".json", ".jsonl"), f"{key}.prompts",
              self.prompts, "null or a .json or .jsonl file of {instruction, input?, output?} records")
        check(self.repetition_penalty > 0, f"{key}.repetition_penalty", self.repetition_penalty, "> 0")
        check(self.loss_window >= 2, f"{key}.loss_window", self.loss_window, "an integer >= 2")


def user_measures(specs: list, key: str) -> list[declared.Measure]:
    """The user's measures of `eval.measures`, built and registered (so that objectives, the W&B summary and the
    report know them); an entry that is not a declared measure, or whose key is neftlab's own, fails in one line."""
    out = []
    for i, spec in enumerate(specs or []):
        m = build(spec, f"{key}[{i}]")
        if not isinstance(m, declared.Measure) or m.compute is None:
            raise ConfigError(f"{key}[{i}]._target_={spec.get('_target_')} is not a user's measure: decorate its "
                              "function with neftlab.core.measures.declare(key, label, ...)")
        known = declared.get(m.key)
        if known is not None and known.compute is None and known != m:
            raise ConfigError(f"{key}[{i}]: {m.key} is a measure of neftlab's own ({known.label}): give yours "
                              "another key")
        try:
            declared.register(m)
        except ValueError as e:
            raise ConfigError(f"{key}[{i}]: {e}") from None
        out.append(m)
    check(len({m.key for m in out}) == len(out), key, [m.key for m in out], "each measure's key once")
    return out
