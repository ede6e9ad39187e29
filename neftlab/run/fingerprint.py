"""What makes two runs the same run: their config in everything that shapes training, their data's content and
their base model's weights. A rerun continues or reuses a run only when all three match (`differences`).

The config is compared as it means, not as it is spelled: `eval.*`, `logger.*` and the other keys of
`NOT_SHAPING` may change between an interruption and its rerun (the resumed run records their new values), and a
`trainer.args` option set to TrainingArguments' own default is the same as one left unset, so a run written
before neftlab stopped listing those defaults is still recognised.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from ..config.compose import upgraded
from ..core import rundir
from ..core.errors import ConfigError
from ..core.files import read_json, read_text, write_json

# Keys that do not shape training: they may change between an interruption and its rerun.
NOT_SHAPING = ("eval", "logger", "search", "output_root", "trainer.resume", "trainer.take_over", "trainer.save_steps",
               "trainer.save_total_limit")


@functools.lru_cache(maxsize=1)
def _training_defaults() -> dict:
    from transformers import TrainingArguments
    defaults = {f.name: f.default for f in fields(TrainingArguments) if f.init}
    return {**defaults, "activation_checkpointing": False}  # what its __post_init__ makes of the default None


def shaping_config(config) -> dict:
    """The resolved config in today's spelling (`upgraded`), less the keys of NOT_SHAPING and `trainer.args`
    options at their defaults."""
    plain = OmegaConf.to_container(OmegaConf.create(config), resolve=True)
    try:
        plain = upgraded(plain)  # a run saved before today's spelling means what it meant
    except ConfigError:
        pass  # a noise whose kind cannot be read: compared as written, so it differs
    for key in NOT_SHAPING:
        *parents, last = key.split(".")
        node = plain
        for part in parents:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    args = (plain.get("trainer") or {}).get("args")
    if isinstance(args, dict):
        defaults = _training_defaults()
        plain["trainer"]["args"] = {k: v for k, v in args.items() if k not in defaults or defaults[k] != v}
    return plain


def config_hash(config) -> str:
    return hashlib.sha256(json.dumps(shaping_config(config), sort_keys=True, default=str).encode()).hexdigest()


def config_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for every dotted key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new), key=str):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def saved_config(run_dir: Path) -> Optional[dict]:
    """The run's own config (.hydra/config.yaml), resolved; None when it has none or it cannot be read."""
    text = read_text(Path(run_dir) / rundir.CONFIG, root=run_dir)
    if text is None:
        return None
    try:
        return OmegaConf.to_container(OmegaConf.create(text), resolve=True)
    except Exception:  # noqa: BLE001 - a damaged config.yaml: the run is not this one's
        return None


@dataclass(frozen=True)
class Identity:
    """A run's config (composed), its data's and its base model's fingerprints."""
    config: Any
    data: dict
    model: dict

    def record(self, run_dir: Path) -> None:
        """fingerprint.json, which later reruns compare against."""
        write_json(Path(run_dir) / rundir.FINGERPRINT,
                   {"config": config_hash(self.config), "data": self.data, "model": self.model}, root=run_dir)

    def config_differences(self, run_dir: Path) -> Optional[list[str]]:
        """How the config of the run in `run_dir` differs from this one's, or None when it has none to compare."""
        saved = saved_config(run_dir)
        if saved is None:
            return None
        old, new = shaping_config(saved), shaping_config(self.config)
        found = config_differences(old, new)
        if (old.get("noise") or {}).get("kind") != (new.get("noise") or {}).get("kind"):  # another kind: its name says it
            found = [d for d in found if not d.startswith("noise.") or d.startswith("noise.kind:")]
        return found

    def content_changes(self, run_dir: Path) -> list[str]:
        """How its data and base model differ from this run's (a run recorded before the model was fingerprinted
        matches any)."""
        recorded = read_json(Path(run_dir) / rundir.FINGERPRINT, root=run_dir) or {}
        found = []
        if recorded.get("data", self.data) != self.data:
            found.append(data_change(recorded["data"], self.data))
        if recorded.get("model", self.model) != self.model:
            found.append(f"the base model's weights changed ({self.model.get('path')})")
        return found

    def differences(self, run_dir: Path) -> Optional[list[str]]:
        """How the run in `run_dir` differs from this one (empty: the same run), or None when it has no config."""
        config = self.config_differences(run_dir)
        return None if config is None else config + self.content_changes(run_dir)


def data_change(old: dict, new: dict) -> str:
    if old.get("path") != new.get("path"):
        return f"the data changed (data file {old.get('path') or old.get('hub')} then, {new.get('path') or new.get('hub')} now)"
    return f"the data changed ({new['path']} has other contents: {old.get('size')} bytes then, {new.get('size')} now)"
