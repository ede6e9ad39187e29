"""How a config comes to be: the schemas in Hydra's ConfigStore, the command line checked before Hydra reads it
(options that do not exist, spellings that moved), and `compose`, the checked config a command line runs with."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from ..core.errors import ConfigError
from .checks import check_keys
from .groups import DataConfig, LoggerConfig, ModelConfig, NoiseConfig, PruningConfig
from .resolvers import register_resolvers
from .root import Config
from .trainer import NEFTLAB_DEFAULTS, TrainerConfig, moved_training_arg

CONF = Path(__file__).resolve().parents[2] / "conf"
# Options that moved, and their new spelling: `arm` presets are noise options now (a preset sets its own group's
# keys), the paper's and the study's recipes are sizes (they set the data and the evaluation too), and searches
# have a group of their own.
MOVED = {
    "arm": {"no_noise": "noise=none", "uniform_5": "noise=uniform", "uniform_10": "noise=uniform_10",
            "uniform_15": "noise=uniform_15", "gaussian_5": "noise=gaussian", "freelb": "noise=freelb",
            "noisytune": "noise=noisytune", "uniform_5_linear": "noise=uniform_linear",
            "uniform_5_response": "noise=uniform_response"},
    "trainer": {"paper": "size=paper", "study": "size=gpu"},
    "experiment": {"neftune_search": "hparams_search=neftune", "perturbation_search": "hparams_search=perturbations",
                   "sparse_neft_search": "hparams_search=sparse_neft"},
}
WHY = {"arm": "noise presets are noise options", "trainer": "it sets the data and the evaluation too, so it is a size",
       "experiment": "searches have a group of their own, which also sets multirun"}
# Groups a user picks; their options are the files under conf/<group> (experiment: experiments/).
PICKED = ("model", "data", "noise", "pruning", "method", "trainer", "logger", "size", "harness", "experiment",
          "hparams_search")


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def groups_help() -> str:
    """`${neftlab_groups:}`: each group a user picks, with its options, for --help."""
    return "\n".join(f"{group}: {', '.join(options(group))}" for group in PICKED) + \
        f"\nhydra/launcher: {', '.join(options('hydra/launcher'))}"


def new_training_arg(override: str) -> Optional[str]:
    """`trainer.args.<option>=` for an option trainer.args does not hold yet: Hydra would refuse it in many lines."""
    name = re.match(r"^trainer\.args\.([A-Za-z_]+)=(.*)$", override)
    if not name or name.group(1) in NEFTLAB_DEFAULTS:
        return None
    return (f"{override}: trainer.args holds only the TrainingArguments options you set; add this one with "
            f"+trainer.args.{name.group(1)}={name.group(2)}")


def check_command_line(overrides: Iterable[str]) -> Optional[str]:
    """The one line for a command line Hydra would refuse in many lines, or would run as something it is not: an
    option that does not exist, or a spelling that moved (`arm=uniform_5` is `noise=uniform`)."""
    for override in overrides:
        if (moved := moved_training_arg(override)) is not None:
            return moved
        if (unset := new_training_arg(override)) is not None:
            return unset
        match = re.match(r"^[+~]*([A-Za-z_]+)=(.*)$", override)
        if not match or match.group(1) not in PICKED + tuple(MOVED):
            continue
        group, values = match.groups()
        if "(" in values or "$" in values:  # a sweeper's choice(...), glob(...), an interpolation: Hydra's to read
            continue
        for value in (v.strip().strip("'\"") for v in values.split(",")):
            if group in MOVED and value in MOVED[group]:
                return f"{override}: {group}={value} is now {MOVED[group][value]} ({WHY[group]})"
            if group not in PICKED:
                return f"{override}: there is no group {group}"
            if value and value not in ("null", *options(group)):
                return f"{override}: {group}={value} is not an option of {group}: one of {', '.join(options(group))}"
    return None


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/*/*.yaml extend them via their defaults list."""
    register_resolvers()
    if not OmegaConf.has_resolver("neftlab_groups"):
        OmegaConf.register_resolver("neftlab_groups", groups_help)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config, replace=True)  # register() runs once per composition
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("noise", NoiseConfig),
                        ("pruning", PruningConfig), ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"base_{group}", node=node, replace=True)


def to_config(composed) -> Config:
    """A composed DictConfig as the checked `Config`: unknown keys, types and ranges, once."""
    check_keys(composed, Config)
    return OmegaConf.to_object(composed).validate()


def compose(*overrides: str) -> Config:
    """The checked config `python -m neftlab *overrides` would run with, without running anything: for the
    benchmarks and the tests, which must not drift from the command line's composition."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    if (moved := check_command_line(overrides)) is not None:
        raise ConfigError(moved)
    register()
    with initialize_config_dir(config_dir=str(CONF)):
        return to_config(hydra_compose(config_name="config", overrides=list(overrides)))
