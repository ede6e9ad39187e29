"""What a noise kind is: one class that declares its name, its typed config, its search space and what it logs,
and acts on the model during training. Everything else (the factory, the search, the checks, W&B, the report)
learns about a kind from these declarations, so a kind is its own file and its own `conf/noise/<name>.yaml` whose
`_target_` names the class: neftlab's kinds and a user's alike (docs/methods.md, examples/).

The instance is built once per run with the model, its config and a seed, and owns its state (`state_dict`): a
hook's random stream, for instance. The kinds that act through hooks on the input embedding subclass
`embedding.EmbeddingNoise`; a drawn kind only says how its unit noise is drawn (`sample`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from transformers import TrainerCallback

from ...config.noise import NoiseConfig
from ...core.errors import NeftlabError
from ...core.measures import Measure, register


class NoiseError(NeftlabError, RuntimeError):
    pass


def rank_seed(seed: int, rank: int) -> int:
    """The noise stream of data-parallel rank `rank` from a run's `seed`: each rank its own, so that ranks draw
    different noise (the runner's and `neftlab.noise_for`'s alike)."""
    return seed + 1_000_003 * rank


@dataclass(frozen=True)
class Param:
    """One key of a kind's config that a search draws (`hparams_search=perturbations`): its range, on a log scale
    or not, an integer or not; `choices` instead of a range draws one of them (a single choice fixes the key)."""

    key: str
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    integer: bool = False
    choices: Optional[tuple] = None

    def suggest(self, trial: Any, prefix: str = "noise") -> None:
        """Draw this key on an Optuna trial, named by its dotted config key (the sweeper's override)."""
        name = f"{prefix}.{self.key}"
        if self.choices is not None:
            trial.suggest_categorical(name, list(self.choices))
        elif self.integer:
            trial.suggest_int(name, int(self.low), int(self.high), log=self.log)
        else:
            trial.suggest_float(name, self.low, self.high, log=self.log)


class NoiseKind(TrainerCallback):
    """A kind of noise, and the Trainer callback that moves it during training (a schedule, the dynamic rule).
    Subclasses set the class attributes and override what they do; the base does nothing, which is `noise=none`."""

    name: ClassVar[str] = "none"
    Config: ClassVar[type] = NoiseConfig
    space: ClassVar[tuple[Param, ...]] = ()  # what a search draws for this kind; empty: not searched
    logs: ClassVar[tuple[Measure, ...]] = ()  # what it logs during training, declared (stage "noise")
    drawn: ClassVar[bool] = False  # noise drawn afresh per token each batch: antithetic passes and schedules apply
    state_key: ClassVar[str] = "noise"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        register(*cls.logs)  # the report and W&B's internals panels read them from the measures' registry

    def __init__(self, model: torch.nn.Module, cfg: Optional[NoiseConfig] = None, seed: Optional[int] = None,
                 log_event: Optional[Callable[[int, dict], None]] = None):
        self.log_event = log_event or (lambda step, values: None)  # where it logs events (the run's files)
        target = f"{type(self).__module__}.{type(self).__qualname__}"
        self.cfg = cfg if cfg is not None else self.Config(_target_=target, kind=self.name)
        self.seed = seed
        # With a seed the noise has its own random stream (the runner gives each rank its own seed, so data-
        # parallel ranks draw different noise), made on the device at its first draw; without, torch's global one.
        self._generator: Optional[torch.Generator] = None
        self._pending_state: Optional[torch.Tensor] = None  # a loaded stream position, set on it when it is made
        self.passes = 1  # forward and backward passes per batch (`passes.PassesTrainer` drives more than one)

    @classmethod
    def attach(cls, model: torch.nn.Module, seed: Optional[int] = None, **params) -> "NoiseKind":
        """This kind on `model` with its config's keys as keyword arguments, checked as a run's would be."""
        from ...config.noise import typed
        return cls(model, typed({"_target_": f"{cls.__module__}.{cls.__qualname__}", **params}, cls=cls), seed=seed)

    def _generator_on(self, device: torch.device) -> Optional[torch.Generator]:
        """The kind's own random stream on `device`, from its seed (None without one: torch's global generator),
        continued from a loaded state."""
        if self.seed is None:
            return None
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def _stream_state(self) -> Optional[torch.Tensor]:
        """The stream's position for a checkpoint (None: the global generator, which the Trainer saves)."""
        return self._generator.get_state() if self._generator is not None else self._pending_state

    def _load_stream_state(self, rng: Optional[torch.Tensor]) -> None:
        if self._generator is not None and rng is not None:
            self._generator.set_state(rng)
        else:
            self._pending_state = rng

    @property
    def driven(self) -> bool:
        """Whether `passes.PassesTrainer` must drive it: more than one pass per batch."""
        return self.passes > 1

    @property
    def own_loss(self) -> bool:
        """Whether its training loss is its own (`loss` runs more forwards or adds terms): only
        `passes.PassesTrainer` computes it, so `neftlab.noise_for` refuses such a kind for a Trainer of one's own."""
        return False

    def prepare(self, model: torch.nn.Module, seed: int) -> None:
        """Once, before a run trains from its pretrained weights (never on resume), with the run's seed (the same on
        every rank): NoisyTune's perturbation."""

    def loss(self, forward: Callable[[dict], tuple], inputs: dict,
             reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> tuple:
        """One training pass's (loss, outputs). `forward(batch)` runs the model as the Trainer does and returns its
        (loss, outputs); `reduce(per_token, mask)` averages a per-token term the way that loss averages its
        cross-entropy, so an added term weighs alike under gradient accumulation and data parallelism
        (`passes.PassesTrainer.token_mean`). A kind that adds terms (a consistency term, NoiseFiT's hybrid loss)
        runs its other forwards here; the base returns the Trainer's own."""
        return forward(inputs)

    def metrics(self) -> dict:
        """What it reports at each log (one host sync at most)."""
        return {}

    def next_pass(self) -> None:
        """The batch's next pass (FreeLB's ascent, antithetic's mirror)."""

    def reset(self) -> None:
        """The batch is done."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def remove(self) -> None:
        """Detach from the model: no noise after training."""

    def __enter__(self) -> "NoiseKind":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @classmethod
    def search_space(cls, node: dict) -> tuple[Param, ...]:
        """What a search draws for the noise option `node` (its keys, as `config.noise.option_node` reads them): the
        kind's `space`, and the keys of an option the node turns on (a drawn kind's `noise.consistency`: its
        weight). An option whose space holds keys its kind's does not is searched in its own right
        (`config.spaces.searched_kinds`)."""
        return cls.space

    @classmethod
    def suggest(cls, trial: Any, prefix: str = "noise", node: Optional[dict] = None) -> None:
        """Draw the search space of this kind's option `node` (none: the kind's `space`) on a trial; a key the
        search's params drew or fixed already (a command line's `noise.alpha=choice(1,5)` or `noise.alpha=3`) is
        theirs."""
        for param in cls.search_space(node or {}):
            if f"{prefix}.{param.key}" not in {**trial.params, **trial.user_attrs}:
                param.suggest(trial, prefix)
