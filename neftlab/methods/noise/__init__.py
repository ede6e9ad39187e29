"""Noise kinds: each is a class in its own module here (or in a user's own module) with its YAML under
`conf/noise/`, whose `_target_` names the class. `kind` says what a kind declares; `embedding` holds the hooks the
embedding kinds share.

Bring-your-own-loop use::

    with neftlab.methods.noise.attach(model, "uniform", alpha=5.0) as noise:
        ...train...            # noise.alpha is the current alpha

FreeLB and antithetic noise need their passes driven (`neftlab.methods.passes.PassesTrainer`); a schedule and the
dynamic rule act through the kind's own TrainerCallback methods (pass the kind to the Trainer's callbacks).
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ...config.noise import kind_class, kind_options, option_file, option_node
from .embedding import ALPHA, DrawnConfig, DrawnNoise, EmbeddingConfig, EmbeddingNoise, ScheduledConfig
from .kind import NoiseError, NoiseKind, Param

__all__ = ["ALPHA", "DrawnConfig", "DrawnNoise", "EmbeddingConfig", "EmbeddingNoise", "NoiseError", "NoiseKind",
           "Param", "ScheduledConfig", "attach"]


def attach(model: torch.nn.Module, kind: Union[str, type] = "uniform", seed: Optional[int] = None,
           **params) -> NoiseKind:
    """Attach noise of `kind` (a name of neftlab's kinds, or a kind class) to the input embedding of `model` (any HF
    model, PEFT-wrapped or not), with the kind's config keys as keyword arguments, checked as a run's are; `seed`
    gives it its own random stream."""
    if isinstance(kind, str) and option_file("noise", kind) is None:
        raise NoiseError(f"unknown noise kind {kind!r}: use one of neftlab's ({', '.join(kind_options())}) or a "
                         "kind class")
    cls = kind if isinstance(kind, type) else kind_class({"kind": kind}, key="kind")
    return cls.attach(model, seed=seed, **params)


def builtin() -> list[type]:
    """neftlab's own kind classes, imported: what they log is then declared, for reports of runs written before
    runs declared it themselves."""
    return [kind_class(option_node(name)) for name in kind_options()]
