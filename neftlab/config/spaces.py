"""Conditional search spaces for Hydra's Optuna sweeper (`hydra.sweeper.custom_search_space`): the sweeper draws
the fixed parameters of `hydra.sweeper.params` (the noise kind, the pruning method), then calls one of these with
the trial, which draws only what that choice reads. A trial's parameters are then the drawn kind's own magnitude,
not every kind's: the sampler learns from values that did something. To write one: a function of (cfg, trial)
that reads `trial.params` and calls `trial.suggest_*` with the dotted config key as the name (each becomes the
override `key=value`); name it in the search's `hydra.sweeper.custom_search_space`."""

from __future__ import annotations

from typing import Any

# (config key, low, high, log scale, integer) for each noise kind: what that kind reads.
ALPHA = ("noise.alpha", 1.0, 20.0, True, False)
NOISE_MAGNITUDES = {
    "uniform": [ALPHA], "gaussian": [ALPHA], "symnoise": [ALPHA], "dynamic": [ALPHA],
    "freelb": [("noise.adv_init_mag", 1.0, 20.0, True, False), ("noise.adv_steps", 1, 3, False, True),
               ("noise.adv_lr", 0.01, 0.5, True, False)],
    "noisytune": [("noise.intensity", 0.05, 0.5, False, False)],
}
PRUNING_RATIO = ("pruning.ratio", 0.05, 0.7, False, False)


def _suggest(trial: Any, name: str, low, high, log: bool, integer: bool) -> None:
    if integer:
        trial.suggest_int(name, low, high, log=log)
    else:
        trial.suggest_float(name, low, high, log=log)


def noise_magnitude(cfg: Any, trial: Any) -> None:
    """The drawn noise kind's own magnitude (`trial.params["noise"]`): α for uniform, gaussian, symnoise and
    dynamic; FreeLB's starting magnitude, passes and step size; NoisyTune's intensity."""
    for spec in NOISE_MAGNITUDES[trial.params["noise"]]:
        _suggest(trial, *spec)


def noise_and_pruning(cfg: Any, trial: Any) -> None:
    """The noise kind's magnitude, and the pruning ratio only when the drawn pruning method prunes."""
    noise_magnitude(cfg, trial)
    if trial.params.get("pruning", "off") != "off":
        _suggest(trial, *PRUNING_RATIO)
