"""The checks every schema uses: a value in its range or among its choices, finite numbers, known keys. Each
failure is a `ConfigError` naming the key, the value and what is allowed."""

from __future__ import annotations

import difflib
import math
import typing
from dataclasses import fields, is_dataclass
from typing import Any

from ..core.errors import ConfigError


def check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def check_choice(key: str, value: Any, choices: tuple) -> None:
    check(value in choices, key, value, "one of " + ", ".join(map(str, choices)))


def check_finite(node: Any, prefix: str = "") -> None:
    """No typed number anywhere is inf or nan: `noise.alpha=inf` would load the model and then fail as a
    non-finite loss, with advice that does not apply."""
    for f in fields(node):
        value, key = getattr(node, f.name), prefix + f.name
        if is_dataclass(value):
            check_finite(value, key + ".")
        elif isinstance(value, float):
            check(math.isfinite(value), key, value, "a finite number")


def check_keys(node: Any, schema: type, prefix: str = "") -> None:
    """Every key of a composed config is a field of its schema. Hydra refuses an unknown key, but `+key=value`
    (which its own error message suggests) appends one, and the run would end `completed` with it ignored.
    Dict fields (trainer.args, model.arch_config, data.columns, ...) take any key: their owners check them."""
    known = {f.name: f for f in fields(schema)}
    hints = typing.get_type_hints(schema)
    for key in node:
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f": did you mean {prefix}{close[0]}?" if close else f"; {prefix or 'the config'} has " + \
                ", ".join(f"{prefix}{k}" for k in known)
            raise ConfigError(f"{prefix}{key} is not a key neftlab knows{hint}")
        child = hints[key]
        if is_dataclass(child) and hasattr(node[key], "keys"):
            check_keys(node[key], child, f"{prefix}{key}.")
