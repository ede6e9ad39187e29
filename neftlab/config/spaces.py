"""Conditional search spaces for Hydra's Optuna sweeper (`hydra.sweeper.custom_search_space`): the sweeper draws
the fixed parameters of `hydra.sweeper.params` (the pruning kind, a noise kind where the search lists them),
then calls one of these with the trial, which draws only what that choice reads. A trial's parameters are then the
drawn kind's own magnitude, not every kind's: the sampler learns from values that did something.

A kind's space is its class's (`NoiseKind.search_space`: its `space`, and the keys an option turns on, so that a preset
turning on a drawn kind's consistency term searches its weight too); a user's kind, its YAML on `hydra.searchpath`, is
searched with its own space like neftlab's. To write another: a function of (cfg, trial) that reads `trial.params` and
calls `trial.suggest_*` with the dotted config key as the name (each becomes the override `key=value`); name it in the
search's `hydra.sweeper.custom_search_space`."""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from .noise import kind_class, kind_options, option_node, options

PRUNING_RATIO = ("pruning.ratio", 0.05, 0.7)


def searched_kinds(searchpath: list) -> list[str]:
    """Every noise option that is a kind's own file with a search space, and every preset whose space holds keys
    its kind's does not (it turns on an option with a range of its own: `noise=uniform_kl` draws the consistency
    term's weight too), neftlab's and those on `hydra.searchpath`, in name order."""
    kinds = set(kind_options(searchpath))
    out = []
    for name in options("noise", searchpath):
        node = option_node(name, searchpath)
        cls = kind_class(node)
        space = cls.search_space(node)
        if space and (name in kinds or set(space) - set(cls.space)):
            out.append(name)
    return out


def noise_magnitude(cfg: Any, trial: Any) -> None:
    """The noise kind (the one `hydra.sweeper.params` drew, else drawn here among `searched_kinds`), then that
    kind's own space: alpha for the drawn kinds, FreeLB's starting magnitude, passes and step, NoisyTune's
    intensity, a user's kind's own keys."""
    searchpath = list((OmegaConf.select(cfg, "hydra.searchpath", default=None) if cfg is not None else None) or [])
    option = (trial.params.get("noise") or trial.user_attrs.get("noise")  # drawn, or fixed by the command line
              or trial.suggest_categorical("noise", searched_kinds(searchpath)))
    node = option_node(option, searchpath)
    kind_class(node).suggest(trial, node=node)


def noise_and_pruning(cfg: Any, trial: Any) -> None:
    """The noise kind's magnitude, and the pruning ratio only when the drawn pruning kind prunes."""
    noise_magnitude(cfg, trial)
    if trial.params.get("pruning", "off") != "off":
        trial.suggest_float(*PRUNING_RATIO)
