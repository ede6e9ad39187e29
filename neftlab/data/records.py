"""Records as the data's format says they are: ShareGPT conversations and Alpaca instructions become chat messages,
classification rows become (text, label) pairs. Checked strictly: a record that does not fit stops the run with a
`DataError` naming the file, the row and the column; a file that mixes formats is named as such, not by its first
misfit row. A record too long to tokenize sensibly (`MAX_RECORD_CHARS`) is skipped and counted."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Optional

from .read import DataError

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "system": "system",
         "gpt": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
         "assistant": "assistant", "model": "assistant"}
SPEAKER_LABELS = ["human", "assistant"]  # bert on ShareGPT: who wrote this turn?
DEFAULT_COLUMNS = {"sharegpt": {"conversations": "conversations"},
                   "alpaca": {"instruction": "instruction", "input": "input", "output": "output"},
                   "classification": {"text": "text", "label": "label"}}
NAMES = {"sharegpt": "ShareGPT", "alpaca": "Alpaca", "classification": "text/label"}
# A record longer than this (all its texts together) is skipped: no run trains on more than a few thousand of its
# tokens, and tokenizing one of 50 MB would take gigabytes of memory.
MAX_RECORD_CHARS = 1_000_000


def field_of(record: Any, row: int, source: str, column: str, optional: bool = False) -> Any:
    if not isinstance(record, dict):
        raise DataError(f"{source}: row {row} is a {type(record).__name__}, expected an object with named fields")
    if column not in record:
        if optional:
            return None
        raise DataError(f"{source}: row {row} has no column {column!r} (it has: {', '.join(map(str, record))}); "
                        f"map another column with data.columns")
    return record[column]


def text_field(value: Any, row: int, source: str, column: str) -> str:
    if not isinstance(value, str):
        raise DataError(f"{source}: row {row} column {column!r} is {type(value).__name__} {value!r:.60}, "
                        "expected a string")
    return value


def format_of(record: Any) -> str | None:
    """Which known format a record is in, by its default column names (None: none of them)."""
    if not isinstance(record, dict):
        return None
    return next((name for name, columns in DEFAULT_COLUMNS.items()
                 if all(c in record for c in columns.values() if c != "input")), None)


def check_one_format(records: list, source: str, fmt: str, columns: dict) -> None:
    """A file whose records are in several known formats is refused as such (with the first row of each)."""
    if columns != DEFAULT_COLUMNS[fmt]:
        return  # mapped columns: the rows themselves are checked
    first: dict[str, int] = {}
    for row, record in enumerate(records):
        first.setdefault(format_of(record), row)
    known = {f: r for f, r in first.items() if f is not None}
    if len(known) > 1:
        found = ", ".join(f"{NAMES[f]} (first at row {r})" for f, r in sorted(known.items(), key=lambda x: x[1]))
        raise DataError(f"{source}: mixes record formats, {found}; one format per file (data.format={fmt})")


def conversation(record: Any, row: int, source: str, columns: dict) -> list[dict]:
    """A ShareGPT record as chat messages: roles mapped, same-speaker turns merged, leading assistant turns dropped."""
    col = columns["conversations"]
    turns = field_of(record, row, source, col)
    if not isinstance(turns, list):
        raise DataError(f"{source}: row {row} column {col!r} is {type(turns).__name__}, expected a list of turns")
    messages: list[dict] = []
    for i, turn in enumerate(turns):
        speaker = text_field(field_of(turn, row, source, "from"), row, source, f"{col}[{i}].from")
        text = text_field(field_of(turn, row, source, "value"), row, source, f"{col}[{i}].value")
        role = ROLES.get(speaker.lower())
        if role is None:
            raise DataError(f"{source}: row {row} turn {i} has speaker {speaker!r}; known: {', '.join(ROLES)}")
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n\n" + text
        elif role != "assistant" or any(m["role"] == "user" for m in messages):
            messages.append({"role": role, "content": text})
    return messages


def alpaca(record: Any, row: int, source: str, columns: dict) -> list[dict]:
    instruction = text_field(field_of(record, row, source, columns["instruction"]), row, source, columns["instruction"])
    extra = field_of(record, row, source, columns["input"], optional=True)
    output = text_field(field_of(record, row, source, columns["output"]), row, source, columns["output"])
    if extra:
        instruction += "\n\n" + text_field(extra, row, source, columns["input"])
    return [{"role": "user", "content": instruction}, {"role": "assistant", "content": output}]


def has_exchange(messages: list[dict]) -> bool:
    return any(m["role"] == "assistant" for m in messages) and messages[0]["role"] in ("user", "system")


def _skip_long(items: list, size: Callable[[Any], int], source: str, notes: Optional[list] = None) -> list:
    """The items of at most MAX_RECORD_CHARS; how many were not is logged, or noted in `notes` to log later."""
    kept = [x for x in items if size(x) <= MAX_RECORD_CHARS]
    if len(kept) < len(items):
        note = (logging.WARNING, f"{Path(source).name}: skipped {len(items) - len(kept)} record(s) of more than "
                                 f"{MAX_RECORD_CHARS} characters")
        if notes is None:
            log.log(*note)
        else:
            notes.append(note)
    return kept


# The last conversion, by the records it was made from: the jobs of a sweep that run in one process (Hydra's basic
# launcher) read the same list of records (`read._read_file`) and convert it once.
_CONVERTED: dict[tuple, tuple] = {}


def chats(records: list, fmt: str, columns: dict, source: str) -> list[list[dict]]:
    """The records as conversations that hold an exchange (a user turn, then an answer); those without are
    counted, and a file with none is refused. Converted once per process for a given list of records, and what
    the conversion found is logged by every run that uses it; nobody changes the list it returns."""
    columns = {**DEFAULT_COLUMNS[fmt], **columns}
    key = (id(records), fmt, tuple(sorted(columns.items())), source)
    found = _CONVERTED.get(key)
    if found is None or found[0] is not records:
        found = (records, *_converted(records, fmt, columns, source))
        _CONVERTED.clear()
        _CONVERTED[key] = found
    _, usable, notes = found
    for level, message in notes:
        log.log(level, message)
    return usable


def _converted(records: list, fmt: str, columns: dict, source: str) -> tuple[list[list[dict]], list[tuple]]:
    check_one_format(records, source, fmt, columns)
    convert = conversation if fmt == "sharegpt" else alpaca
    notes: list[tuple] = []
    converted = _skip_long([convert(r, row, source, columns) for row, r in enumerate(records)],
                           lambda c: sum(len(m["content"]) for m in c), source, notes)
    usable = [c for c in converted if c and has_exchange(c)]
    if not usable:
        raise DataError(f"{source}: no record has a user turn followed by an assistant reply, so there is nothing to "
                        "train on")
    if len(usable) < len(converted):
        notes.append((logging.INFO, f"{Path(source).name}: {len(converted) - len(usable)} of {len(converted)} records "
                                    "have no user turn followed by an assistant reply; skipped"))
    empty = sum(not any(m["content"].strip() for m in c if m["role"] == "assistant") for c in usable)
    if empty:
        every = empty == len(usable)
        notes.append((logging.WARNING, f"{Path(source).name}: {'all' if every else empty} of {len(usable)} examples "
                                       "have an empty answer" + (": the model can only learn to stop at once" if every
                                                                 else "")))
    return usable, notes


def labelled(records: list, fmt: str, columns: dict, source: str) -> tuple[list[tuple[str, int]], list[str]]:
    """(text, label id) pairs and the label names: a ShareGPT file's turns labelled by who wrote them, or a
    classification file's rows (integer labels, or class names sorted)."""
    if fmt == "sharegpt":
        columns = {**DEFAULT_COLUMNS["sharegpt"], **columns}
        check_one_format(records, source, fmt, columns)
        pairs = [(m["content"], int(m["role"] == "assistant"))
                 for row, r in enumerate(records) for m in conversation(r, row, source, columns)
                 if m["role"] != "system" and m["content"].strip()]
        return _skip_long(pairs, lambda p: len(p[0]), source), list(SPEAKER_LABELS)
    columns = {**DEFAULT_COLUMNS["classification"], **columns}
    check_one_format(records, source, fmt, columns)
    texts = [text_field(field_of(r, row, source, columns["text"]), row, source, columns["text"])
             for row, r in enumerate(records)]
    raw = [field_of(r, row, source, columns["label"]) for row, r in enumerate(records)]
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
    return _skip_long(pairs, lambda p: len(p[0]), source), names
