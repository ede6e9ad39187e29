"""Every measure a run reports, declared once: its summary key, label, direction, number format and the stage that
computes it. Objectives, W&B summaries, the report's columns and paired rows, the workspace's panels, the plots and
the closing line all read these declarations; nothing else spells a measure's key.

A `Measure` is registered once (`register`): neftlab's own below, a noise kind's or pruning kind's from its own
module (`register(Measure("noise/x", "x", stage="noise", curve=True))` at import), a user's from `eval.measures`
(`declare`, built by Hydra's instantiate), and the user's measures of a finished run from its summary.json
(`from_json`), so that a report reads them without importing the user's code. A key registered twice must be
declared the same way both times.

Stages (who computes it): train (the Trainer's training log), held-out (after training, on the held-out split: the
Trainer's evaluation loop, or a user's function of the model, tokenizer and held-out split), noise-off, answers (of
the greedy answers: neftlab's or a user's function of the answer rows), efficiency, convergence, judge, noise and
pruning (the methods' internals, logged during training).
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Optional

DIRECTIONS = ("minimize", "maximize")
STAGES = ("train", "held-out", "noise-off", "answers", "efficiency", "convergence", "judge", "noise", "pruning")
USER_STAGES = ("answers", "held-out")  # what a user's function can be computed from
INTERNALS = ("noise", "pruning")  # the methods' own numbers, plotted over the steps

# The axes the measures are logged against (not measures themselves).
STEP, EPOCH = "train/global_step", "train/epoch"


@dataclass(frozen=True)
class Measure:
    """One measure, declared once. `direction` is None for a diagnostic: reported, never optimized."""

    key: str  # its summary.json and metrics.jsonl key, "<namespace>/<name>"
    label: str  # how a table, a plot or the closing line names it
    direction: Optional[str] = None  # minimize | maximize | None
    fmt: str = "{:.4f}"  # how its value is written
    stage: str = "answers"  # what computes it (STAGES)
    column: bool = True  # a column of the report's runs table and a panel of the W&B workspace's evaluation
    paired: bool = False  # a row of the paired table (each arm against the baseline arm over seeds)
    curve: bool = False  # a curve over the steps (W&B's training or internals sections)
    headline: bool = False  # named in the few lines that end a run
    absent: Optional[float] = None  # its value as an objective when its stage did not run (no pruning: 0 sparsity)
    compute: Optional[Callable] = field(default=None, compare=False, repr=False)  # a user's function

    def __post_init__(self):
        if self.direction not in (*DIRECTIONS, None):
            raise ValueError(f"measure {self.key}: direction={self.direction!r}; allowed: minimize, maximize, null")
        if self.stage not in STAGES:
            raise ValueError(f"measure {self.key}: stage={self.stage!r}; allowed: {', '.join(STAGES)}")
        if "/" not in self.key:
            raise ValueError(f"measure {self.key!r}: a key is <namespace>/<name>, e.g. eval/{self.key}")

    def format(self, value: Any) -> str:
        """The value as the declaration writes it; "" for None, a non-number as it is."""
        if value is None:
            return ""
        return self.fmt.format(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)

    def to_json(self) -> dict:
        """The declaration without its function, as a finished run's summary.json keeps it."""
        return {k: v for k, v in asdict(self).items() if k != "compute"}

    @classmethod
    def from_json(cls, data: dict) -> "Measure":
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__ and k != "compute"})


def is_number(value: Any) -> bool:
    """A measure's value that is a number (a bool is a flag, not a number)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_REGISTRY: dict[str, Measure] = {}


def register(*measures: Measure) -> None:
    """Add declarations; one already registered under the same key must be the same declaration."""
    for m in measures:
        known = _REGISTRY.get(m.key)
        if known is not None and known != m:
            raise ValueError(f"measure {m.key} is declared twice, differently: {known} and {m}")
        if known is None or m.compute is not None:
            _REGISTRY[m.key] = m


def get(key: str) -> Optional[Measure]:
    return _REGISTRY.get(key)


def declared(*stages: str) -> list[Measure]:
    """The registered measures in the order they were declared, those of `stages` only when given."""
    return [m for m in _REGISTRY.values() if not stages or m.stage in stages]


def directions() -> dict[str, str]:
    """{key: minimize | maximize} of every measure with a direction."""
    return {m.key: m.direction for m in _REGISTRY.values() if m.direction}


def objectives() -> dict[str, str]:
    """{key: minimize | maximize} of every measure a search can optimize: those with a direction that a run
    reports once it is done (the training log's last loss is no result of a run)."""
    return {k: d for k, d in directions().items() if _REGISTRY[k].stage != "train"}


def vs_baseline(key: str) -> str:
    """A judge measure's key in W&B when the baseline is another run's answers (judge/win_rate ->
    judge_vs_baseline/win_rate), beside its key against the references."""
    return "judge_vs_baseline/" + key.removeprefix("judge/")


def declare(key: str, label: str, direction: Optional[str] = None, fmt: str = "{:.4f}",
            stage: str = "answers") -> Callable:
    """Decorator for a user's measure. `stage="answers"`: `fn(answers, **params) -> float`, answers being the rows of
    one generation (samples.jsonl's: prompt, reference, generation, tokens, stop); `stage="held-out"`:
    `fn(model, tokenizer, held_out, **params) -> float`, held_out the tokenized held-out split. The decorated name,
    called with a config's keys (`eval.measures: [{_target_: my_module.my_measure, param: 1}]`), returns the Measure
    with those keys bound."""
    if stage not in USER_STAGES:
        raise ValueError(f"measure {key}: stage={stage!r}; a user's measure is computed from: {', '.join(USER_STAGES)}")

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def build(**params: Any) -> Measure:
            inspect.signature(fn).bind_partial(**params)  # a parameter the function has not: a TypeError now
            return Measure(key, label, direction, fmt, stage, paired=True,
                           compute=functools.partial(fn, **params) if params else fn)
        return build
    return wrap


# ---------------------------------------------------------------- neftlab's own, in the order a reader looks for them

TRAIN_LOSS = Measure("train/loss", "train loss", "minimize", "{:.4f}", "train", column=False, curve=True)
SKIPPED_BATCHES = Measure("train/skipped_batches", "batches skipped (non-finite loss)", None, "{:.0f}", "train",
                          column=False)
EVAL_LOSS = Measure("eval/loss", "eval loss", "minimize", "{:.4f}", "held-out", paired=True, curve=True,
                    headline=True)
# Of a run evaluated twice or more during training (trainer.eval_steps): its best held-out loss and when it came,
# the measures of overfitting (`rundir.best_evaluation`)
BEST_LOSS = Measure("eval/best_loss", "best eval loss during training", "minimize", "{:.4f}", "held-out", paired=True)
BEST_EPOCH = Measure("eval/best_epoch", "epoch of the best eval loss", None, "{:.1f}", "held-out", paired=True)
PERPLEXITY = Measure("eval/perplexity", "perplexity", "minimize", "{:.2f}", "held-out")
ACCURACY = Measure("eval/accuracy", "accuracy", "maximize", "{:.4f}", "held-out", headline=True)
MACRO_F1 = Measure("eval/macro_f1", "macro-F1", "maximize", "{:.4f}", "held-out")
NOISE_OFF_LOSS = Measure("eval/train_loss_noise_off", "train loss, noise off", "minimize", "{:.4f}", "noise-off",
                         paired=True, curve=True)
GAP = Measure("eval/generalization_gap", "generalization gap", "minimize", "{:.4f}", "noise-off", paired=True)
RESPONSE_LENGTH = Measure("eval/response_length", "answer length (tokens)", None, "{:.1f}", "answers", paired=True,
                          headline=True)
RESPONSE_WORDS = Measure("eval/response_words", "answer length (words)", "maximize", "{:.1f}", "answers",
                         paired=True)
HIT_MAX = Measure("eval/hit_max_new_tokens", "answers cut at eval.max_new_tokens", None, "{:.0%}", "answers",
                  headline=True)
DIVERSITY = Measure("eval/diversity", "diversity", "maximize", "{:.3f}", "answers", paired=True)
DISTINCT_2 = Measure("eval/distinct_2", "distinct-2", None, "{:.3f}", "answers")
DISTINCT_4 = Measure("eval/distinct_4", "distinct-4", None, "{:.3f}", "answers", paired=True)
REP = {n: Measure(f"eval/rep_{n}", f"rep-{n}", None, "{:.3f}", "answers", column=False) for n in (2, 3, 4)}
PROMPTS_TRUNCATED = Measure("eval/prompts_truncated", "prompts cut to fit the context", None, "{:.0f}", "answers",
                            column=False)
SPARSITY = Measure("pruning/sparsity", "sparsity", "maximize", "{:.3f}", "pruning", curve=True, absent=0.0)
ROWS_PRUNED = Measure("pruning/rows_pruned", "rows pruned", None, "{:.0f}", "pruning", column=False, curve=True)
RATIO_TARGET = Measure("pruning/ratio_target", "pruning ratio, target", None, "{:.3f}", "pruning", column=False)
TIED_OUTPUT = Measure("pruning/tied_output", "output layer pruned too (tied)", None, "{}", "pruning", column=False)
PARAM_REDUCTION = Measure("efficiency/param_reduction", "parameter reduction", "maximize", "{:.3f}", "efficiency",
                          absent=0.0)
TOTAL_PARAMS = Measure("efficiency/total_params", "parameters", None, "{:.0f}", "efficiency", column=False)
NONZERO_PARAMS = Measure("efficiency/nonzero_params", "nonzero parameters", None, "{:.0f}", "efficiency",
                         column=False)
LATENCY_TOKEN = Measure("efficiency/latency_ms_per_token", "ms/token", None, "{:.2f}", "efficiency")
UNPRUNED_LATENCY_TOKEN = Measure("efficiency/unpruned_latency_ms_per_token", "ms/token unpruned", None, "{:.2f}",
                                 "efficiency")
LATENCY_SAMPLE = Measure("efficiency/latency_ms_per_sample", "ms/sample", None, "{:.2f}", "efficiency")
PEAK_MEMORY = Measure("efficiency/peak_memory_mb", "peak memory (MB)", None, "{:.0f}", "efficiency", column=False)
LOSS_STD = Measure("convergence/loss_std", "loss std", None, "{:.4f}", "convergence")
HALF_DROP = Measure("convergence/half_drop_step", "half-drop step", None, "{:.0f}", "convergence")
WIN_RATE = Measure("judge/win_rate", "judge win rate", "maximize", "{:.3f}", "judge", column=False, headline=True)
LC_WIN_RATE = Measure("judge/lc_win_rate", "judge LC win rate", "maximize", "{:.3f}", "judge", column=False)
RELIABLE = Measure("judge/reliable", "judge passed its controls", None, "{}", "judge", column=False)
LC_TERMS = Measure("judge/lc_instruction_terms", "LC fit with per-instruction terms", None, "{}", "judge",
                   column=False)
LENGTH_DIFF = Measure("judge/mean_length_diff_chars", "answer length less the baseline's (chars)", None, "{:.1f}",
                      "judge", column=False)
DECISIVE_WIN_RATE = Measure("judge/decisive_win_rate", "judge win rate, ties decided", "maximize", "{:.3f}", "judge",
                            column=False)
N_PAIRS = Measure("judge/n_pairs", "judged pairs", None, "{:.0f}", "judge", column=False)

register(TRAIN_LOSS, SKIPPED_BATCHES, EVAL_LOSS, BEST_LOSS, BEST_EPOCH, PERPLEXITY, ACCURACY, MACRO_F1,
         NOISE_OFF_LOSS, GAP, RESPONSE_LENGTH, RESPONSE_WORDS, HIT_MAX, DIVERSITY, DISTINCT_2, DISTINCT_4, *REP.values(),
         PROMPTS_TRUNCATED,
         SPARSITY, ROWS_PRUNED, RATIO_TARGET, TIED_OUTPUT, PARAM_REDUCTION, TOTAL_PARAMS, NONZERO_PARAMS,
         LATENCY_TOKEN, UNPRUNED_LATENCY_TOKEN, LATENCY_SAMPLE, PEAK_MEMORY, LOSS_STD, HALF_DROP, WIN_RATE, LC_WIN_RATE,
         RELIABLE, LC_TERMS, LENGTH_DIFF, DECISIVE_WIN_RATE, N_PAIRS)
