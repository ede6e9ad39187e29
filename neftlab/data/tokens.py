"""The tokenized cache: conversations tokenized once, untruncated, and kept on disk for every later run.

A run tokenizes only the conversations it uses (its seed's `data.max_samples`), so a tiny run on the 17,392
packaged ShareGPT conversations tokenizes 48 of them, not all. The cache is keyed by what shapes the tokens (the
tokenizer's vocabulary and chat template, the data's content, its format and columns), not by the seed, the sample
count or `data.max_length`, which only select and cut rows afterwards; a later run that needs other conversations
adds them as one more part, and never rebuilds what is there. Parts are Arrow files written whole (temporary file,
then rename) under a lock, so concurrent jobs and torchrun ranks tokenize each conversation once between them; a
part that cannot be read is moved aside, named, and its conversations tokenized again. Past `COMPACT_AFTER` parts
they are merged into one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import pyarrow as pa
from tqdm.auto import tqdm

from ..core.cache import cache_root, locked
from ..core.errors import first_line
from .chat import encode_chats
from .read import Source
from .records import MAX_RECORD_CHARS

log = logging.getLogger(__name__)

LAYOUT = 2  # part of the cache key: bump when encode_chats or the stored columns change
COMPACT_AFTER = 16
SCHEMA = pa.schema([("index", pa.int32()), ("input_ids", pa.list_(pa.int32())),
                    ("assistant_mask", pa.list_(pa.int8()))])


def _tokenizer_digest(tokenizer) -> str:
    vocab = tokenizer.backend_tokenizer.to_str() if tokenizer.is_fast else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256((vocab + (tokenizer.chat_template or "")).encode()).hexdigest()


def folder(source: Source, tokenizer) -> Path:
    key = {"layout": LAYOUT, "tokenizer": _tokenizer_digest(tokenizer), "data": source.content_key(),
           "format": source.cfg.format, "columns": dict(source.cfg.columns), "max_record_chars": MAX_RECORD_CHARS}
    return cache_root() / "tokenized" / hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]


def _read(part: Path) -> pa.Table | None:
    """A part's table, memory-mapped; None (and the part moved aside, named) when it cannot be read."""
    try:
        with pa.memory_map(str(part)) as source:
            table = pa.ipc.open_file(source).read_all()
        if table.schema != SCHEMA:
            raise ValueError(f"columns {table.schema.names}")
        return table
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes Arrow raise
        aside = part.with_name(f"{part.name}.unreadable-{os.getpid()}")
        log.warning("tokenized cache part %s cannot be read (%s): moved to %s, its conversations are tokenized "
                    "again", part, first_line(e), aside.name)
        try:
            part.rename(aside)
        except FileNotFoundError:
            pass
        return None


def _write(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, SCHEMA) as writer:
            writer.write_table(table)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tokenize(tokenizer, conversations: list[list[dict]], indices: list[int], packaged: bool) -> pa.Table:
    ids, masks = [], []
    with tqdm(total=len(indices), desc="Tokenizing (once; later runs read the cache)") as bar:
        for start in range(0, len(indices), 1000):
            chunk = indices[start:start + 1000]
            enc = encode_chats(tokenizer, [conversations[i] for i in chunk])
            ids += enc["input_ids"]
            masks += enc["assistant_mask"]
            bar.update(len(chunk))
    if packaged:
        log.info("The packaged ShareGPT V3 file ends inside its last record, as it was published: %d of its %d "
                 "complete conversations with an exchange tokenized for this run", len(indices), len(conversations))
    return pa.table([pa.array(indices, pa.int32()), pa.array(ids, pa.list_(pa.int32())),
                     pa.array(masks, pa.list_(pa.int8()))], schema=SCHEMA)


def tokens(source: Source, tokenizer, conversations: list[list[dict]], needed: list[int]) -> tuple[pa.Table, dict]:
    """(a table of input_ids and assistant_mask, {conversation index: its row}) holding every conversation of
    `needed`, from the cache, tokenizing those it lacks."""
    where = folder(source, tokenizer)

    def present() -> tuple[list[pa.Table], dict]:
        tables = [t for part in sorted(where.glob("part-*.arrow")) if (t := _read(part)) is not None]
        return tables, {i for t in tables for i in t.column("index").to_pylist()}

    tables, have = present()
    if not set(needed) <= have:
        with locked(where):
            where.mkdir(parents=True, exist_ok=True)
            tables, have = present()  # another process may have added them while this one waited
            missing = sorted(set(needed) - have)
            if missing:
                new = _tokenize(tokenizer, conversations, missing, source.packaged)
                name = hashlib.sha256(json.dumps(missing).encode()).hexdigest()[:16]
                _write(where / f"part-{name}.arrow", new)
                tables.append(new)
            if len(tables) > COMPACT_AFTER:
                parts = sorted(where.glob("part-*.arrow"))
                merged = pa.concat_tables(tables)
                _write(where / "part-0compacted.arrow", merged)
                for part in parts:
                    if part.name != "part-0compacted.arrow":
                        part.unlink(missing_ok=True)
                tables = [merged]
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    rows = {}
    for row, index in enumerate(table.column("index").to_pylist()):
        rows.setdefault(index, row)
    return table, rows
