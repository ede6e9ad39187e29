"""Reads an offline W&B run file (run-*.wandb: a LevelDB-style log of protobuf records) for assertions."""

import struct
import time
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
FULL, LAST = 1, 4


def records(path: Path) -> list:
    data = Path(path).read_bytes()
    ident, _magic, _version = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B", f"{path} is not a W&B run file"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _checksum, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def offline_run(run_dir: Path, session: int | None = None, wait: float = 30) -> dict:
    """The run record, logged history rows, summary keys and exit code of the one offline run under run_dir, or
    of its `session`-th offline session (a W&B run resumed later, e.g. to add judge results, has several).
    W&B's service process writes the file: read at once after `finish()` on a loaded machine (the suite under
    pytest-xdist), it once had no run record yet. So it is read again for up to `wait` seconds until its exit
    record is there."""
    paths = sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb"))
    (path,) = paths if session is None else [paths[session]]
    deadline = time.monotonic() + wait
    while True:
        try:
            parsed = _parse(records(path))
        except Exception:  # noqa: BLE001 - a record still being written
            if time.monotonic() > deadline:
                raise
        else:
            if parsed["exit_code"] is not None or time.monotonic() > deadline:
                return parsed
        time.sleep(0.2)


def _parse(recs: list) -> dict:
    run, history, summary, exit_code = None, [], {}, None
    for r in recs:
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): i.value_json for i in r.history.item})
        elif kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): i.value_json for i in r.summary.update})
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return {"run": run, "history": history, "summary": summary, "exit_code": exit_code}
