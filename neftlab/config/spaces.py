"""Conditional search spaces for Hydra's Optuna sweeper (`hydra.sweeper.custom_search_space`): the sweeper draws
the fixed parameters of `hydra.sweeper.params` (the pruning kind, a noise kind where the search lists them),
then calls one of these with the trial, which draws only what that choice reads. A trial's parameters are then the
drawn kind's own magnitude, not every kind's: the sampler learns from values that did something.

A kind's space is its class's (`NoiseKind.space`): a user's kind, its YAML on `hydra.searchpath`, is searched with
its own space like neftlab's. To write another: a function of (cfg, trial) that reads `trial.params` and calls
`trial.suggest_*` with the dotted config key as the name (each becomes the override `key=value`); name it in the
search's `hydra.sweeper.custom_search_space`."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from .noise import kind_class, kind_options, option_node

PRUNING_RATIO = ("pruning.ratio", 0.05, 0.7)


def searched_kinds(searchpath: list) -> list[str]:
    """Every noise option that is a kind's own file (not a preset) with a search space, neftlab's and those on
    `hydra.searchpath`, in name order."""
    return [n for n in kind_options(searchpath) if kind_class(option_node(n, searchpath)).space]


def noise_magnitude(cfg: Any, trial: Any) -> None:
    """The noise kind (the one `hydra.sweeper.params` drew, else drawn here among `searched_kinds`), then that
    kind's own space: alpha for the drawn kinds, FreeLB's starting magnitude, passes and step, NoisyTune's
    intensity, a user's kind's own keys."""
    searchpath = list((OmegaConf.select(cfg, "hydra.searchpath", default=None) if cfg is not None else None) or [])
    option = (trial.params.get("noise") or trial.user_attrs.get("noise")  # drawn, or fixed by the command line
              or trial.suggest_categorical("noise", searched_kinds(searchpath)))
    kind_class(option_node(option, searchpath)).suggest(trial)


def noise_and_pruning(cfg: Any, trial: Any) -> None:
    """The noise kind's magnitude, and the pruning ratio only when the drawn pruning kind prunes."""
    noise_magnitude(cfg, trial)
    if trial.params.get("pruning", "off") != "off":
        trial.suggest_float(*PRUNING_RATIO)
