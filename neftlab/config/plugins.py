"""A user's code that a config names by `_target_` (a measure of `eval.measures`), built by Hydra's instantiate.

A config may come from a directory someone handed over (`neftlab.evaluate RUN` reads the run's own), so a config
alone never makes neftlab import code: a user's module is built only when the user's environment names it in
$NEFTLAB_PLUGINS (comma-separated module names, e.g. `export NEFTLAB_PLUGINS=my_measures`), and it is imported from
the Python path as usual (PYTHONPATH, or an installed package). neftlab's own `_target_`s need no such line.
"""

from __future__ import annotations

import os
from typing import Any

from ..core.errors import ConfigError, first_line

PLUGINS_ENV = "NEFTLAB_PLUGINS"


def trusted() -> list[str]:
    """The `_target_` patterns a config may name: neftlab's own and the modules of $NEFTLAB_PLUGINS."""
    modules = [m.strip() for m in os.environ.get(PLUGINS_ENV, "").split(",") if m.strip()]
    return ["neftlab.*", *(f"{m}.*" for m in modules)]


def check_trusted(target: str, key: str) -> None:
    """Refuse, in one line naming `key`, a `_target_` outside `trusted()`: before anything of it is imported."""
    module = target.rsplit(".", 1)[0]
    if not any(module == p[:-2] or module.startswith(p[:-1]) for p in trusted()):
        raise ConfigError(f"{key}={target} is not trusted: neftlab imports a config's code only from the modules the "
                          f"environment names, so name it: export {PLUGINS_ENV}={module.split('.')[0]}")


def build(spec: Any, key: str) -> Any:
    """The object a config entry `{_target_: module.name, ...}` describes; a target outside `trusted()`, or one that
    cannot be built, is refused in one line naming `key`."""
    from hydra.utils import instantiate
    target = spec.get("_target_") if hasattr(spec, "get") else None
    if not isinstance(target, str) or "." not in target:
        raise ConfigError(f"{key}={spec!r} is not allowed: a mapping with _target_: <module>.<name>")
    check_trusted(target, f"{key}._target_")
    try:
        return instantiate(spec, _execution_whitelist_=trusted())
    except Exception as e:  # noqa: BLE001 - an import error, a missing module, a wrong argument: told in one line
        cause = e.__cause__ or e
        raise ConfigError(f"{key}._target_={target} cannot be built: {first_line(cause)}") from None
