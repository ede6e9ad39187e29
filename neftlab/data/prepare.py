"""A run's data, ready to train on: its records split by seed into training and held-out examples, tokenized
(from the cache), cut to `data.max_length`, packed when asked; and, for a causal model, the held-out prompts it
answers at the end."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..config import DataConfig
from .chat import cut
from .packing import pack_bfd
from .read import DataError, Source, locate
from .records import chats, labelled
from .tokens import tokens

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    train: Dataset
    eval: Dataset
    # Causal only: held-out (prompt messages, reference answer) pairs for greedy generation.
    prompts: list[tuple[list[dict], str]] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)


def split(n: int, cfg: DataConfig, seed: int, source: str) -> tuple[list[int], list[int]]:
    """(training, held-out) indices of `n` examples: a seeded shuffle, the first `data.max_samples`, of which the
    first `data.eval_size` are held out."""
    items = list(range(n))
    random.Random(seed).shuffle(items)
    if cfg.max_samples is not None:
        items = items[: cfg.max_samples]
    n_eval = round(cfg.eval_size * len(items)) if cfg.eval_size < 1 else int(cfg.eval_size)
    n_eval = max(n_eval, 1)
    if n_eval >= len(items):
        raise DataError(f"data.eval_size={cfg.eval_size} holds out {n_eval} of the {len(items)} usable examples "
                        f"of {source}, leaving none to train on: lower data.eval_size or raise data.max_samples")
    return items[n_eval:], items[:n_eval]


def prompt_of(conversation: list[dict]) -> list[dict]:
    """The messages before the first answer."""
    return conversation[: next(i for i, m in enumerate(conversation) if m["role"] == "assistant")]


def warn_overlap(train: list, held_out: list, source: str, key) -> None:
    """Held-out examples whose input also occurs in training measure memory, not generalisation."""
    seen = {key(x) for x in train}
    overlap = sum(key(x) in seen for x in held_out)
    if overlap:
        log.warning("%s: %d of %d held-out examples have an input that also occurs in the training split",
                    Path(source).name, overlap, len(held_out))


def chat_data(cfg: DataConfig, tokenizer, source: Source, seed: int) -> Prepared:
    conversations = chats(source.records(), cfg.format, dict(cfg.columns), source.name)
    train, held_out = split(len(conversations), cfg, seed, source.name)
    warn_overlap([conversations[i] for i in train], [conversations[i] for i in held_out], source.name,
                 key=lambda c: json.dumps(prompt_of(c)))
    table, rows = tokens(source, tokenizer, conversations, train + held_out)

    def cut_split(indices: list[int], name: str) -> Dataset:
        ds, dropped = cut(table, [rows[i] for i in indices], cfg.max_length)
        if dropped:
            log.info("%s: %d of %d conversations have no assistant token within data.max_length=%d; skipped",
                     name, dropped, len(indices), cfg.max_length)
        if not len(ds):
            raise DataError(f"{source.name}: no {name} example keeps an assistant token within "
                            f"data.max_length={cfg.max_length}: raise data.max_length")
        return ds

    prompts = [(prompt_of(conversations[i]), conversations[i][len(prompt_of(conversations[i]))]["content"])
               for i in held_out]
    train_ds = cut_split(train, "train")
    if cfg.packing and cfg.packing_strategy == "bfd":
        train_ds = pack_bfd(train_ds, cfg.max_length)
    return Prepared(train_ds, cut_split(held_out, "eval"), prompts)


def classification_data(cfg: DataConfig, tokenizer, source: Source, seed: int) -> Prepared:
    pairs, names = labelled(source.records(), cfg.format, dict(cfg.columns), source.name)
    if not pairs:
        raise DataError(f"{source.name}: no non-empty text to classify")
    classes = {y for _, y in pairs}
    if len(classes) == 1:
        log.warning("%s: every row has label %s: accuracy and macro-F1 will be 1.0 whatever the model learns",
                    Path(source.name).name, names[classes.pop()])
    train, held_out = split(len(pairs), cfg, seed, source.name)
    warn_overlap([pairs[i] for i in train], [pairs[i] for i in held_out], source.name, key=lambda pair: pair[0])

    def tokenize(indices: list[int]) -> Dataset:
        enc = tokenizer([pairs[i][0] for i in indices], truncation=True, max_length=cfg.max_length)
        return Dataset.from_dict({**enc, "labels": [pairs[i][1] for i in indices]})

    return Prepared(tokenize(train), tokenize(held_out), label_names=list(names))


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, causal: bool, seed: int,
            source: Optional[Source] = None) -> Prepared:
    """The run's data from `source` (located from `cfg` when not given: a run locates it once, for its fingerprint
    too)."""
    source = source or locate(cfg)
    prepared = (chat_data if causal else classification_data)(cfg, tokenizer, source, seed)
    log.info("Data: %d train / %d eval examples from %s", len(prepared.train), len(prepared.eval), source.name)
    return prepared
