"""The `noise` group: each option is a noise kind's own YAML, which names the kind's class with `_target_`; the
class declares its typed config (`Config`), and that config holds only the keys the kind reads.

So a kind is found the same way whether it is neftlab's or a user's (a module on the path and named in
$NEFTLAB_PLUGINS, its YAML added with `hydra.searchpath`): by its `_target_`. neftlab imports that class itself, only
from a trusted module (`plugins.check_trusted`: a config alone never makes neftlab import code), and accepts only a
class with a kind's declarations (`name`, `Config`), so no other class is ever built from a config. A preset
(`noise=uniform_10`) names its kind's option in its defaults list instead of a `_target_` of its own.

A run written before kinds had classes saved a flat `noise` (`kind: uniform` and every kind's fields): `typed` and
`canonical` read it by its kind's name, keeping only that kind's keys, so the run is still reported and resumed.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Optional

from omegaconf import DictConfig, OmegaConf

from ..core.errors import ConfigError
from .plugins import check_trusted

CONF = Path(__file__).resolve().parents[2] / "conf"
TARGET = "_target_"


@dataclass
class NoiseConfig:
    """What every kind's config holds: its class (`_target_`) and its name (`kind`, the class's `name`, filled in
    by neftlab so that a run's saved config, its W&B record and the reports name the kind)."""

    _target_: str = "neftlab.methods.noise.none.NoNoise"
    kind: str = "none"

    def validate(self, key: str) -> None:
        """The ranges of the kind's own keys."""

    def validate_run(self, cfg: Any) -> None:
        """The rules this kind has with other groups (the model, the data, the trainer); `cfg` is the whole Config."""


def search_dirs(searchpath: Iterable[str] = ()) -> list[Path]:
    """The config directories Hydra reads, as local paths: `hydra.searchpath` entries (file://DIR or pkg://MODULE),
    then neftlab's own conf/."""
    dirs = []
    for entry in searchpath:
        entry = str(entry)
        if entry.startswith("file://"):
            dirs.append(Path(entry[len("file://"):]))
        elif entry.startswith("pkg://"):
            spec = importlib.util.find_spec(entry[len("pkg://"):].split("/")[0])
            if spec is not None and spec.submodule_search_locations:
                dirs.append(Path(spec.submodule_search_locations[0], *entry[len("pkg://"):].split("/")[1:]))
        elif entry:
            dirs.append(Path(entry))
    return [*dirs, CONF]


def option_file(group: str, option: str, searchpath: Iterable[str] = ()) -> Optional[Path]:
    for folder in search_dirs(searchpath):
        if (path := folder / group / f"{option}.yaml").is_file():
            return path
    return None


def option_node(option: str, searchpath: Iterable[str] = ()) -> dict:
    """A noise option's own keys, with those of the option its defaults list extends (a preset's kind)."""
    path = option_file("noise", option, searchpath)
    if path is None:
        raise ConfigError(f"noise={option} is not an option of noise: no noise/{option}.yaml in "
                          + ", ".join(str(d) for d in search_dirs(searchpath)))
    node = OmegaConf.to_container(OmegaConf.load(path))
    base: dict = {}
    for entry in node.pop("defaults", []) or []:
        if isinstance(entry, str) and entry != "_self_":
            base.update(option_node(entry, searchpath))
    return {**base, **node}


def is_kind_file(option: str, searchpath: Iterable[str] = ()) -> bool:
    """A kind's own YAML (it names its class), not a preset of another option."""
    path = option_file("noise", option, searchpath)
    return path is not None and TARGET in (OmegaConf.load(path) or {})


def options(group: str, searchpath: Iterable[str] = ()) -> list[str]:
    """Every option of a config group (`noise`: a kind's own file or a preset), neftlab's and those on the search
    path, in name order."""
    return sorted({p.stem for folder in search_dirs(searchpath) for p in (folder / group).glob("*.yaml")})


def kind_options(searchpath: Iterable[str] = ()) -> list[str]:
    """The noise options that are a kind's own file, neftlab's and those on the search path, in name order."""
    return [n for n in options("noise", searchpath) if is_kind_file(n, searchpath)]


def kind_class(node: Any, key: str = "noise") -> type:
    """The kind class a noise node names: its `_target_`, or for a run saved before kinds had classes, the class
    of neftlab's option of its `kind`."""
    target = node._target_ if isinstance(node, NoiseConfig) else node.get(TARGET)
    if target is None:
        name = node.get("kind", "none")
        if option_file("noise", str(name)) is None:
            raise ConfigError(f"{key}.kind={name!r} names no kind of neftlab's and the config has no {key}.{TARGET}")
        target = option_node(str(name))[TARGET]
    module, _, attr = str(target).rpartition(".")
    check_trusted(str(target), f"{key}.{TARGET}")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(f"{key}.{TARGET}={target!r} cannot be imported ({e}): put its module on the Python path "
                          "(PYTHONPATH, or run from its folder)") from None
    config = getattr(cls, "Config", None)
    if not (isinstance(cls, type) and isinstance(getattr(cls, "name", None), str) and isinstance(config, type)
            and issubclass(config, NoiseConfig)):
        raise ConfigError(f"{key}.{TARGET}={target!r} is not a noise kind: a class with a `name` and a `Config` "
                          "(subclass neftlab.methods.noise.NoiseKind)")
    return cls


def _plain(node: Any) -> dict:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


def own_keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls.Config) if f.name not in (TARGET, "kind")]


def typed(node: Any, key: str = "noise", cls: Optional[type] = None) -> NoiseConfig:
    """The kind's own typed config from a composed noise node: a key the kind does not read is refused in one line
    naming the kind's keys. A node without `_target_` is a flat config saved before kinds had classes: the keys of
    the other kinds, which it holds at their defaults, are dropped instead. `cls`: the kind class itself, which a
    script hands over (`NoiseKind.attach`), so nothing is imported by name."""
    cls = cls or kind_class(node, key)
    values = _plain(node)
    legacy = TARGET not in values
    target = values.pop(TARGET, None) or f"{cls.__module__}.{cls.__qualname__}"
    name = values.pop("kind", cls.name)
    if name != cls.name:
        raise ConfigError(f"{key}.kind={name!r} is not allowed: the kind's name is its class's ({cls.name}); pick "
                          f"another kind with noise=<option>")
    own = own_keys(cls)
    if legacy:
        values = {k: v for k, v in values.items() if k in own}
    for k in values:
        if k not in own:
            raise ConfigError(f"{key}.{k} is not a key of noise kind {cls.name}: its keys are "
                              + (", ".join(f"{key}.{o}" for o in own) or "none"))
    merged = OmegaConf.merge(OmegaConf.structured(cls.Config), {**values, TARGET: target, "kind": cls.name})
    return OmegaConf.to_object(merged)


def canonical(node: Any) -> dict:
    """A noise node as it means: the kind's name and class and its own keys with their defaults, however it was
    written (a kind's YAML, a preset, or a flat config saved before kinds had classes). What a fingerprint compares."""
    return _plain(OmegaConf.structured(typed(node)))
