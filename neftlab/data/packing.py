"""Packing: several examples laid end to end in one row without padding, their position ids restarting at each
example, so attention and the noise still see each example on its own. `pack_bfd` packs a split's examples into
rows best-fit decreasing; `PackedCollator` lays a batch's rows end to end."""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset

log = logging.getLogger(__name__)


def best_fit_decreasing(lengths: list[int], capacity: int) -> list[list[int]]:
    """Bins of item indices whose lengths sum to at most `capacity`, longest items first, each into the fullest
    bin it fits (best fit decreasing: within 11/9 of the fewest bins). No item is split; ties keep index order,
    so the packing is the same in every run and on every rank."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (room left, bin id), ascending
    bins: list[list[int]] = []
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            bins.append([i])
            room, b = capacity - lengths[i], len(bins) - 1
        else:
            room, b = free.pop(at)
            bins[b].append(i)
            room -= lengths[i]
        bisect.insort(free, (room, b))
    return bins


def pack_bfd(ds: Dataset, capacity: int) -> Dataset:
    """The examples of `ds` packed best-fit decreasing into rows of at most `capacity` tokens: input_ids and labels
    laid end to end, the label at each example's first token -100, position_ids restarting at every example."""
    lengths = pc.list_value_length(ds.data.table.column("input_ids").combine_chunks()).to_numpy()
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    order = np.fromiter((i for b in bins for i in b), np.int64, count=len(lengths))
    table = ds.data.table.take(pa.array(order))
    seq = lengths[order]
    starts = np.concatenate([[0], np.cumsum(seq)[:-1]])
    positions = np.arange(int(seq.sum())) - np.repeat(starts, seq)
    labels = pc.list_flatten(table.column("labels").combine_chunks()).to_numpy().copy()
    labels[starts] = -100  # no example predicts its first token from the one before it
    per_bin = np.add.reduceat(seq, np.cumsum([0] + [len(b) for b in bins[:-1]]))
    offsets = pa.array(np.concatenate([[0], np.cumsum(per_bin)]), pa.int32())
    as_list = lambda flat: pa.ListArray.from_arrays(offsets, pa.array(flat.astype(np.int64)))  # noqa: E731
    ids = pc.list_flatten(table.column("input_ids").combine_chunks()).to_numpy()
    log.info("Packed %d examples into %d rows of at most %d tokens (%.1f %% full)", len(lengths), len(bins),
             capacity, 100 * per_bin.sum() / (len(bins) * capacity))
    return Dataset(pa.table({"input_ids": as_list(ids), "labels": as_list(labels),
                             "position_ids": as_list(positions)}))


@dataclass
class PackedCollator:
    """A batch's rows laid end to end in one row of shape [1, tokens], without padding, as transformers'
    DataCollatorWithFlattening does, but keeping the position ids of rows that are already packed
    (`pack_bfd`): they restart at every example, which is how attention and the noise find the examples."""

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pos = list(f["position_ids"]) if "position_ids" in f else list(range(n))
            ids += list(f["input_ids"])
            labels += [-100 if p == 0 else int(y) for p, y in zip(pos, f["labels"])]
            positions += pos
        return {k: torch.tensor([v], dtype=torch.long)
                for k, v in (("input_ids", ids), ("labels", labels), ("position_ids", positions))}
