"""Sparse-NEFT during training: the embedding (or every linear layer) pruned before the first step and every
`pruning.interval` steps, and the pruned entries kept at zero after every step."""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

import torch
from transformers import TrainerCallback

from ..config import PruningConfig
from ..core import measures
from ..core.dist import all_sum, local_rows, reshard
from ..models.params import parameter_counts
from .pruning import output_tied, prune_tensors_, ratio_at, targets

log = logging.getLogger(__name__)


class PruningCallback(TrainerCallback):
    """Prunes before the first step and every `interval` optimizer steps; re-applies the masks after every step.
    Its state (the masks) goes into checkpoints."""

    state_key = "pruning"

    def __init__(self, model: torch.nn.Module, cfg: PruningConfig, log_event: Callable[[int, dict], None]):
        self.model, self.cfg, self.log_event = model, cfg, log_event
        self.weights: list[torch.Tensor] = []  # looked up when training begins: FSDP replaces the parameters
        self.masks: list[torch.Tensor] = []
        self.tied = cfg.scope == "embedding" and output_tied(model)
        if self.tied:
            log.warning("The output layer shares its weight with the input embedding: pruning the embedding "
                        "prunes the output layer too (%s=true)", measures.TIED_OUTPUT.key)

    def prune(self, step: int) -> dict:
        ratio = ratio_at(self.cfg, step)
        self.masks = prune_tensors_(self.weights, ratio, self.cfg.kind)
        shards, groups = zip(*map(local_rows, self.weights))
        zeros, rows = all_sum([sum(int((w == 0).sum()) for w in shards),
                               sum(int((~m[:, 0]).sum()) for m in self.masks) if self.cfg.kind == "l2" else 0],
                              groups[0])
        metrics = {measures.RATIO_TARGET.key: ratio,
                   measures.SPARSITY.key: zeros / sum(w.numel() for w in self.weights),
                   measures.TIED_OUTPUT.key: self.tied}
        if self.cfg.kind == "l2":
            metrics[measures.ROWS_PRUNED.key] = int(rows)
        metrics.update(parameter_counts(self.model))
        self.log_event(step, metrics)
        return metrics

    @contextlib.contextmanager
    @torch.no_grad()
    def dense(self):
        """The pruned entries temporarily refilled with random values of the kept ones' scale, to time the
        same model unpruned: dense kernels do the same work whatever the values, so expect no difference."""
        reshard(self.model)  # FSDP2 keeps an unsharded copy after a forward: the edit must reach what runs
        shards = [local_rows(w)[0] for w in self.weights]
        saved = [(w[~m].clone(), w[m].std()) for w, m in zip(shards, self.masks)]
        for w, mask, (_, scale) in zip(shards, self.masks, saved):
            w[~mask] = torch.randn(int((~mask).sum()), dtype=w.dtype, device=w.device) * scale
        try:
            yield
        finally:
            reshard(self.model)
            for w, mask, (values, _) in zip(shards, self.masks, saved):
                w[~mask] = values

    @torch.no_grad()
    def apply_masks(self) -> None:
        for w, mask in zip(self.weights, self.masks):
            local_rows(w)[0].mul_(mask)

    def state_dict(self) -> dict:
        """The masks of this rank's rows (a sharded weight's masks differ by rank), on the CPU."""
        return {"masks": [m.contiguous().cpu() for m in self.masks]}

    def load_state_dict(self, state: dict) -> None:
        """Kept on the CPU until training begins, then moved to their weights' devices (every rank would otherwise
        open a CUDA context on the GPU that saved the file)."""
        self.masks = list(state["masks"] or [])

    def on_train_begin(self, args, state, control, **kwargs):
        self.weights = targets(self.model, self.cfg.scope)
        log.debug("Pruning %d weight(s) in scope %s: %s", len(self.weights), self.cfg.scope,
                  sorted({str(getattr(w, "placements", "unsharded")) for w in self.weights}))
        if self.masks:  # restored from a checkpoint (on the CPU): keep them until the next scheduled prune
            self.masks = [m.to(local_rows(w)[0].device) for w, m in zip(self.weights, self.masks)]
            self.apply_masks()
        else:
            self.prune(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.cfg.interval == 0:
            self.prune(state.global_step)
        else:
            self.apply_masks()
