"""Where a batch's sequences are, for the kinds that scale or reduce their noise per sequence: a pre-hook on the whole
model catches the forward's attention mask, position ids, labels and flash-attention boundaries (`_catch_inputs`),
and a sequence is a row of a padded batch (its mask's real tokens), or in a packed or padding-free row a run of
position ids restarting at 0, or without position ids a span of `cu_seq_lens_q`. The embedding kinds' L_i
(`_real_lengths`) and NoiseFiT's per-sequence statistics (`_sequence_sums`) read it alike."""

from __future__ import annotations

from typing import Optional

import torch


class Sequences:
    """A kind's view of the batch's sequences, from the inputs its pre-hook caught."""

    _mask = _positions = _labels = _cu_seq_lens = None

    def _catch_inputs(self, module, args, kwargs):
        self._mask, self._positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        self._labels = kwargs.get("labels")
        # A padding-free batch's flash-attention boundaries (TRL's and transformers' flattening collators)
        cu = kwargs.get("cu_seq_lens_q")
        self._cu_seq_lens = cu if isinstance(cu, torch.Tensor) and cu.dim() == 1 else None

    def _real_lengths(self, mask: Optional[torch.Tensor], shape: tuple, device) -> torch.Tensor:
        """L for every token, shape (batch, length): its own sequence's real length (its real tokens; a batch with
        none of mask, position ids or boundaries counts one sequence per row, which is right without padding)."""
        real = torch.ones(shape, device=device) if mask is None else mask.to(device).float()
        return self._sequence_sums(real).clamp(min=1)

    def _sequence_sums(self, values: torch.Tensor) -> torch.Tensor:
        """For every token of a (batch, length) tensor, the sum of `values` over the tokens of its own sequence
        (zero the padding's values first to sum over real tokens only)."""
        batch, length = values.shape
        positions = self._positions if self._positions is not None and self._positions.shape[-1] == length else None
        if positions is not None:  # no restart: one sequence per row, the row's sum as below (no host sync)
            starts = (positions.to(values.device).expand(batch, length) == 0).long()
            starts[:, 0] = 1
            return self._per_sequence(starts.cumsum(1) - 1, values)  # which packed sequence each token belongs to
        if self._cu_seq_lens is not None:  # over the batch's tokens flattened, as the varlen kernels read them
            tokens = torch.arange(batch * length, device=values.device)
            sequence = torch.searchsorted(self._cu_seq_lens.to(values.device)[1:].contiguous(), tokens, right=True)
            return self._per_sequence(sequence.view(1, -1), values.reshape(1, -1)).view(batch, length)
        return values.sum(1, keepdim=True).expand(batch, length)

    @staticmethod
    def _per_sequence(sequence: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """For every token, the sum of `values` over its sequence (`sequence`: each token's sequence index in its
        row)."""
        sums = torch.zeros_like(values).scatter_add_(1, sequence, values)
        return sums.gather(1, sequence)

    def _forget_inputs(self) -> None:
        self._mask = self._positions = self._labels = self._cu_seq_lens = None
