"""Conversations as token ids with the loss on the assistant's tokens only, rendered by the model's own chat
template, and cut to `data.max_length`."""

from __future__ import annotations

import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from datasets import Dataset
from transformers import PreTrainedTokenizerBase


def assistant_spans(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
    """Character ranges of the assistant replies (end token included) in the rendered conversation, found by
    rendering growing prefixes with the chat template: any template works, with or without generation markers."""
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True))
            spans.append((start, len(tokenizer.apply_chat_template(messages[: i + 1], tokenize=False))))
    return spans


def _has_generation_markers(tokenizer) -> bool:
    return re.search(r"\{%-?\s*generation\s*-?%\}", tokenizer.chat_template or "") is not None


def encode_chats(tokenizer: PreTrainedTokenizerBase, conversations: list[list[dict]]) -> dict[str, list]:
    """Whole (untruncated) conversations as `input_ids` and `assistant_mask` (1 on the tokens the loss is on).

    A template with `{% generation %}` markers is rendered once per conversation and masked by the tokenizer
    (`return_assistant_tokens_mask`); any other template gets the assistant spans from prefix renders and one
    batched call to the fast tokenizer, whose Rust side spreads the work over the cores.
    """
    if _has_generation_markers(tokenizer):
        rows = [tokenizer.apply_chat_template(c, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
                for c in conversations]
        return {"input_ids": [r["input_ids"] for r in rows], "assistant_mask": [r["assistant_masks"] for r in rows]}
    texts = [tokenizer.apply_chat_template(c, tokenize=False) for c in conversations]
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    masks = []
    for conversation, offsets in zip(conversations, enc["offset_mapping"]):
        spans = np.array(assistant_spans(tokenizer, conversation), dtype=np.int64).reshape(-1, 2)
        starts = np.array([a for a, _ in offsets], dtype=np.int64)
        inside = np.searchsorted(spans[:, 0], starts, side="right") - 1  # the last span starting at or before
        masks.append(((inside >= 0) & (starts < spans[inside.clip(0), 1])).astype(np.int8).tolist())
    return {"input_ids": enc["input_ids"], "assistant_mask": masks}


def cut(table: pa.Table, rows: list[int], max_length: int) -> tuple[Dataset, int]:
    """Rows `rows` of a table of (input_ids, assistant_mask), cut at `max_length` with labels; (dataset, how many
    were dropped for keeping no assistant token)."""
    table = table.take(pa.array(rows, pa.int64()))
    ids = pc.list_slice(table.column("input_ids").combine_chunks(), 0, max_length)
    mask = pc.list_slice(table.column("assistant_mask").combine_chunks(), 0, max_length)
    lengths = pc.list_value_length(ids).to_numpy()
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    flat_ids, flat_mask = pc.list_flatten(ids).to_numpy(), pc.list_flatten(mask).to_numpy()
    trained = np.concatenate([[0], np.cumsum(flat_mask, dtype=np.int64)])
    answered = trained[offsets[1:]] > trained[offsets[:-1]]
    as_list = lambda flat: pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(flat))  # noqa: E731
    table = pa.table({"input_ids": as_list(flat_ids.astype(np.int64)),
                      "attention_mask": as_list(np.ones(len(flat_ids), np.int64)),
                      "labels": as_list(np.where(flat_mask > 0, flat_ids, -100).astype(np.int64))})
    return Dataset(table.filter(pa.array(answered))), int((~answered).sum())
