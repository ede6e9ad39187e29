"""How a config comes to be: the schemas in Hydra's ConfigStore, the command line checked before Hydra reads it
(options that do not exist, spellings that moved), and `compose`, the checked config a command line runs with."""

from __future__ import annotations

import re
from typing import Iterable, Optional

from omegaconf import DictConfig, OmegaConf, open_dict

from ..core.errors import ConfigError
from .checks import check_keys
from .groups import DataConfig, LoggerConfig, ModelConfig, PruningConfig
from .noise import CONF, canonical, kind_class, option_file, option_node, options, own_keys, typed
from .resolvers import register_resolvers
from .root import Config
from .trainer import NEFTLAB_DEFAULTS, TrainerConfig, moved_training_arg

# Options that moved, and their new spelling: `arm` presets are noise options now (a preset sets its own group's
# keys), the paper's and the study's recipes are sizes (they set the data and the evaluation too), searches have a
# group of their own, and options that only composed other options' runs are gone (one spelling for each run).
MOVED = {
    "arm": {"no_noise": "noise=none", "uniform_5": "noise=uniform", "uniform_10": "noise=uniform_10",
            "uniform_15": "noise=uniform_15", "gaussian_5": "noise=gaussian", "freelb": "noise=freelb",
            "noisytune": "noise=noisytune", "uniform_5_linear": "noise=uniform_linear",
            "uniform_5_response": "noise=uniform_response"},
    "trainer": {"paper": "size=paper", "study": "size=gpu"},
    "experiment": {"neftune_search": "hparams_search=neftune", "perturbation_search": "hparams_search=perturbations",
                   "sparse_neft_search": "hparams_search=sparse_neft", "pruning_method": "experiment=pruning_kind"},
    "method": {"finetune": "the default (noise=none pruning=off)", "neftune": "noise=uniform",
               "pruning": "pruning=l1", "sparse_neft": "noise=uniform pruning=l1", "original": "trainer.max_steps=0"},
    "noise": {"dynamic_large": "noise=dynamic", "symnoise_antithetic": "noise=symnoise noise.antithetic=true"},
}
WHY = {"arm": "noise presets are noise options", "trainer": "it sets the data and the evaluation too, so it is a size",
       "experiment": "searches have a group of their own, which also sets multirun; a study is named by the key it "
                     "varies, and pruning.method is pruning.kind",
       "method": "the method group only composed the noise and pruning groups' options",
       "noise": "it composed the same run"}
# Groups a user picks; their options are the files under conf/<group>, and under a `hydra.searchpath` directory.
PICKED = ("model", "data", "noise", "pruning", "trainer", "logger", "size", "harness", "experiment", "hparams_search")


def searchpath_of(overrides: Iterable[str]) -> list[str]:
    """The `hydra.searchpath=[...]` a command line sets, as a list of entries."""
    found: list[str] = []
    for override in overrides:
        if override.lstrip("+").startswith("hydra.searchpath="):
            value = override.split("=", 1)[1].strip().strip("[]")
            found = [v.strip().strip("'\"") for v in value.split(",") if v.strip()]
    return found


def default_option(group: str) -> Optional[str]:
    """The option conf/config.yaml's defaults list picks for `group`."""
    for entry in OmegaConf.load(CONF / "config.yaml").defaults:
        if isinstance(entry, DictConfig) and group in entry:
            return entry[group]
    return None


def noise_key(override: str, overrides: list[str], searchpath: list[str]) -> Optional[str]:
    """The one line for `noise.KEY=` that the noise kind the command line picks does not read (Hydra would refuse
    it in many lines, or `+noise.KEY=` would append it)."""
    match = re.match(r"^[+~]*noise\.([A-Za-z_]+)=", override)
    if not match:
        return None
    picked = [o.split("=", 1)[1] for o in overrides if re.match(r"^noise=", o)]
    if not picked and any(re.match(r"^[+~]*(experiment|hparams_search)=", o) for o in overrides):
        return None  # a study picks its noise: checked when it is composed
    for option in (picked[-1].split(",") if picked else [default_option("noise")]):
        option = option.strip().strip("'\"")
        if "(" in option or option_file("noise", option, searchpath) is None:
            return None
        if match.group(1) == "kind":
            return f"{override}: noise.kind is the kind's name, from its class: pick a kind with noise=OPTION"
        cls = kind_class(option_node(option, searchpath))
        if match.group(1) not in own_keys(cls):
            return (f"{override}: noise.{match.group(1)} is not a key of noise kind {cls.name} (noise={option}): its "
                    "keys are " + (", ".join(f"noise.{k}" for k in own_keys(cls)) or "none"))
    return None


def option_name_key(override: str) -> Optional[str]:
    """The one line for setting which option a group took by its key (`pruning.kind=l1`, or its old name
    `pruning.method=l1`): a second spelling of `pruning=l1`, which Hydra would take or refuse in many lines."""
    match = re.match(r"^[+~]*([a-z]+)\.([a-z_]+)=(.*)$", override)
    if not match:
        return None
    group, key, value = match.groups()
    if RENAMED.get((group, key)) is not None:
        return (f"{override}: {group}.{key} is now {group}.{RENAMED[group, key]}, the name of the option: "
                f"pick it with {group}={value}")
    if group == "pruning" and key == "kind":
        return f"{override}: pruning.kind is the name of the option: pick it with pruning={value}"
    return None


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
    option that does not exist, a key the picked noise kind does not read, or a spelling that moved
    (`arm=uniform_5` is `noise=uniform`)."""
    overrides = list(overrides)
    searchpath = searchpath_of(overrides)
    for override in overrides:
        if (moved := moved_training_arg(override)) is not None:
            return moved
        if (unset := new_training_arg(override)) is not None:
            return unset
        if (unread := noise_key(override, overrides, searchpath)) is not None:
            return unread
        if (named := option_name_key(override)) is not None:
            return named
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
            if value and value not in ("null", *options(group, searchpath)):
                return (f"{override}: {group}={value} is not an option of {group}: one of "
                        f"{', '.join(options(group, searchpath))}")
    return None


def register() -> None:
    """Put the schemas in Hydra's ConfigStore; conf/*/*.yaml extend them via their defaults list."""
    from hydra.core.config_store import ConfigStore  # here, not above: the config's schemas import without Hydra
    register_resolvers()
    if not OmegaConf.has_resolver("neftlab_groups"):
        OmegaConf.register_resolver("neftlab_groups", groups_help)
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config, replace=True)  # register() runs once per composition
    for group, node in (("model", ModelConfig), ("data", DataConfig), ("pruning", PruningConfig),
                        ("trainer", TrainerConfig), ("logger", LoggerConfig)):
        cs.store(group=group, name=f"base_{group}", node=node, replace=True)


# Keys renamed since: which option of a group a run took is `kind` in every group (noise, pruning, logger)
RENAMED = {("pruning", "method"): "kind"}


def renamed(saved: dict) -> dict:
    """A run's saved config with the keys renamed since in today's names (`pruning.method` is `pruning.kind`): what
    the reports read, so that a run written before the rename is grouped and labelled with today's."""
    out = dict(saved)
    for (group, old), new in RENAMED.items():
        node = out.get(group)
        if isinstance(node, dict) and old in node and new not in node:
            out[group] = {(new if k == old else k): v for k, v in node.items()}
    return out


def upgraded(saved: dict) -> dict:
    """A run's saved config (resolved, plain) in today's spelling: its keys renamed (`renamed`), its noise spelled
    out (a flat noise saved before kinds had classes is read by its kind's name) and `trainer.neftune_noise_alpha`,
    gone since, dropped where it was null. What a rerun's fingerprint and a re-evaluation read."""
    out = renamed(saved)
    if isinstance(out.get("noise"), dict):
        out["noise"] = canonical(out["noise"])
    trainer = out.get("trainer")
    if isinstance(trainer, dict) and "neftune_noise_alpha" in trainer and trainer["neftune_noise_alpha"] is None:
        out["trainer"] = {k: v for k, v in trainer.items() if k != "neftune_noise_alpha"}
    return out


def spelled_out(composed: DictConfig) -> DictConfig:
    """A copy of a composed config with its noise spelled out: the kind's class, its name and each of its keys
    (`noise.canonical`). What a run saves and logs, so that its config names its kind and every value it ran with."""
    out = composed.copy()
    with open_dict(out):
        out.noise = canonical(composed.noise)
    return out


def to_config(composed) -> Config:
    """A composed DictConfig as the checked `Config`: unknown keys, types and ranges, once. The noise is its kind's
    own typed config (`noise.typed`)."""
    check_keys(composed, Config)
    rest = OmegaConf.masked_copy(composed, [k for k in composed if k != "noise"])
    with open_dict(rest):
        rest.noise = OmegaConf.structured(typed(composed.noise))
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), rest)).validate()


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
