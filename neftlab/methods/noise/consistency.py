"""`noise.consistency`, an option of every drawn kind: a divergence between the model's distributions on a clean
pass (this kind's noise silenced) and on the noisy pass, added to the noisy pass's cross-entropy, the consistency
term of R-Drop and of NoiseFiT's hybrid loss:

    kl:         loss = CE(noisy) + w * mean_t KL(p_clean,t || p_noisy,t), the clean pass under no_grad: a fixed
                target (one more forward per pass, no more backward)
    symmetric:  loss = CE(noisy) + w * mean_t (KL(p_clean,t || p_noisy,t) + KL(p_noisy,t || p_clean,t)) / 2,
                gradients through both passes (R-Drop's term)

with w = `noise.consistency_weight`. t runs over what the cross-entropy counts: a causal LM's positions whose next
token has a label (logits[:, :-1] against labels[:, 1:] != -100, or a padding-free collator's `shift_labels`), a
sequence classifier's sequences (one term each, over its classes, as R-Drop has it on GLUE). The mean is the
Trainer's own reduction of its cross-entropy (`NoiseKind.loss`'s `reduce`), so the term weighs alike under
gradient accumulation. With `noise.antithetic` each of the two passes has its own clean pass and its own term.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional

import torch
import torch.nn.functional as F

from ...config.checks import check, check_choice
from ...config.noise import NoiseConfig
from ...core.measures import Measure
from .kind import NoiseError, Param

MODES = ("none", "kl", "symmetric")
WEIGHT = Param("consistency_weight", 0.1, 10.0, log=True)  # what a search draws for an option that turns it on
# The mean over counted tokens of the divergence, over the micro-batches since the last log.
DIVERGENCE = Measure("noise/consistency", "noise consistency divergence", None, "{:.4f}", "noise", column=False,
                     curve=True)


@dataclass
class ConsistencyConfig(NoiseConfig):
    consistency: str = "none"  # none | kl: + w * KL(clean || noisy), clean pass fixed | symmetric: both ways, both
    consistency_weight: float = 1.0  # w, the term's weight against the cross-entropy

    def validate(self, key: str) -> None:
        super().validate(key)
        check_choice(f"{key}.consistency", self.consistency, MODES)
        check(self.consistency_weight > 0, f"{key}.consistency_weight", self.consistency_weight, "> 0")


def consistency_space(node: dict) -> tuple:
    """The weight, for an option that turns the term on (`noise=uniform_kl`): a search draws it there only."""
    return (WEIGHT,) if node.get("consistency", "none") != "none" else ()


def kl(target: torch.Tensor, logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(target / T) || softmax(logits / T)) per position (over the last dim, the classes), from logits, in
    fp32. F.kl_div(input, target) is KL(target || input), both log-probabilities here; a target that must not
    learn is detached by the caller."""
    target, logits = (F.log_softmax(x.float() / temperature, -1) for x in (target, logits))
    return F.kl_div(logits, target, reduction="none", log_target=True).sum(-1)


def divergence(clean: torch.Tensor, noisy: torch.Tensor, mode: str) -> torch.Tensor:
    """Per position: KL(p_clean || p_noisy) (`kl`), or its mean with KL(p_noisy || p_clean) (`symmetric`)."""
    forward = kl(clean, noisy)
    return forward if mode == "kl" else 0.5 * (forward + kl(noisy, clean))


def counted(logits: torch.Tensor, inputs: dict) -> tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """(what keeps of a pass's logits the positions the cross-entropy counts, which of them have a label): a causal
    LM's position t predicts token t + 1 (logits[:, :-1] against labels[:, 1:] != -100, or a padding-free
    collator's `shift_labels` as they are); a sequence classifier's one row per sequence. The loss terms that
    weigh each token as the cross-entropy does read it: this option's and NoiseFiT's."""
    labels = inputs.get("shift_labels", inputs.get("labels"))
    if labels is None:
        raise NoiseError("a loss term of the noise weighs each token as the cross-entropy does and needs the batch's "
                         "labels, which this batch has not")
    if logits.dim() == 3 and "shift_labels" not in inputs:
        return (lambda x: x[:, :-1]), labels[:, 1:] != -100
    return (lambda x: x), labels != -100


def per_token(clean: torch.Tensor, noisy: torch.Tensor, inputs: dict, mode: str) -> tuple:
    """(the divergence at each position the cross-entropy counts, zero elsewhere; the mask of those positions)."""
    cut, mask = counted(clean, inputs)
    return divergence(cut(clean), cut(noisy), mode).masked_fill(~mask, 0.0), mask


class Consistency:
    """The term, owned by a drawn kind: runs the clean pass and the noisy pass of each training loss, and keeps
    the divergence's mean since the last log on the device (read once, at logging)."""

    def __init__(self, mode: str, weight: float):
        self.mode, self.weight = mode, weight
        self._total: Optional[torch.Tensor] = None  # (sum of the divergence over counted tokens, their count)

    def loss(self, forward: Callable[[dict], tuple], inputs: dict,
             reduce: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
             silenced: Callable[[], ContextManager]) -> tuple:
        """(CE(noisy) + w * term, the noisy pass's outputs). Each forward gets its own copy of the batch (the
        Trainer may pop its labels)."""
        with silenced(), torch.no_grad() if self.mode == "kl" else contextlib.nullcontext():
            _, clean = forward(dict(inputs))
        loss, outputs = forward(dict(inputs))
        values, mask = per_token(clean.logits, outputs.logits, inputs, self.mode)
        sums = torch.stack([values.detach().sum(), mask.sum().to(values.dtype)])
        self._total = sums if self._total is None else self._total + sums
        return loss + self.weight * reduce(values, mask), outputs

    def metrics(self) -> dict:
        if self._total is None:
            return {}
        total, count = self._total.tolist()
        self._total = None
        return {DIVERGENCE.key: total / max(count, 1.0)}
