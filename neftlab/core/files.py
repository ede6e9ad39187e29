"""Files in directories neftlab may not have written itself: the one writer, which never leaves its root, and the one
loader of whatever such a directory holds.

A run or sweep directory can be handed over, copied, unpacked from an archive or edited by hand, so neither side
trusts it:

- **No symbolic link below a root is followed**, for writing or for reading: every component from the root (the
  run, sweep or report directory; the root itself is the user's choice and may be a link) down to the file must
  be a real directory or file. A link where neftlab writes is refused in one line (`UnsafePath`); a link where it
  reads is named and treated as absent. So a crafted `checkpoints -> ../other_run/checkpoints` is never resumed,
  and a `report.md -> ~/.bashrc` is never written through.
- **Writes are atomic**: a temporary file beside the target, renamed over it, so a crash, kill -9 or full disk
  leaves the old file or the new one. A temporary file left by a writer that was killed is removed by the next
  write of the same file. Appends are one whole line per write.
- **Loads run no code**: pickles (`torch.save` files) load with `weights_only=True`, YAML with `safe_load`; a file
  that cannot be read is named with what is wrong.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import stat
import zipfile
from pathlib import Path
from typing import IO, Any, Callable, Optional

from .errors import NeftlabError, first_line
from .rank import started

log = logging.getLogger(__name__)


class UnsafePath(NeftlabError):
    """A path that would lead out of its root, or through a symbolic link below it."""


class UnreadableFile(NeftlabError):
    """A file that cannot be loaded; the message names it and what is wrong."""


# ---------------------------------------------------------------- where a path leads

def link_below(path: Path, root: Path) -> Optional[Path]:
    """The first symbolic link on the way from `root` down to `path` (`path` itself included), or None. A path that
    is not below `root` once `..` is resolved lexically is refused as a whole."""
    base, target = Path(os.path.abspath(root)), Path(os.path.abspath(path))
    try:
        parts = target.relative_to(base).parts
    except ValueError:
        raise UnsafePath(f"{path} lies outside {root}: neftlab writes nothing outside the directory it was given")
    here = base
    for part in parts:
        here = here / part
        if here.is_symlink():
            return here
    return None


def confined(path: Path, root: Path) -> Path:
    """`path` (absolute), checked to lie under `root` through no symbolic link; `UnsafePath` otherwise."""
    link = link_below(path, root)
    if link is not None:
        raise UnsafePath(f"{link} is a symbolic link (to {os.readlink(link)}): neftlab neither writes nor reads "
                         f"through a link inside {root}; remove it, or give another directory")
    return Path(os.path.abspath(path))


def make_dirs(path: Path, *, root: Path) -> Path:
    """`mkdir -p` below `root`, through no link."""
    path = confined(path, root)
    path.mkdir(parents=True, exist_ok=True)
    return confined(path, root)  # a link raced in while the folders were made


# ---------------------------------------------------------------- writing

def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """Whether `path` is one of `atomic_write`'s temporary files (left by a writer that was killed)."""
    return path.name.startswith(".") and ".tmp" in path.name


def _clear_stale(path: Path) -> None:
    """Temporary files of `path` whose writer is no longer running (killed while writing)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and int(pid) != os.getpid() and started(int(pid)) is None and not tmp.is_symlink():
            tmp.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], None], *, root: Path) -> None:
    """Call `write(tmp)` for a temporary path beside `path`, then rename it into place (same filesystem). The rename
    replaces a link at `path` itself rather than writing through it; a link above it is refused."""
    path = Path(os.path.abspath(path))
    make_dirs(path.parent, root=root)
    _clear_stale(path)
    tmp = _temporary(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: Path, text: str, *, root: Path) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"), root=root)


def write_json(path: Path, data: Any, *, root: Path) -> None:
    write_text(path, json.dumps(data, indent=2, default=str) + "\n", root=root)


def open_append(path: Path, *, root: Path) -> IO[str]:
    """The file opened to append whole lines, created if absent; never through a link (O_NOFOLLOW)."""
    path = confined(path, root)
    make_dirs(path.parent, root=root)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    return os.fdopen(fd, "a", encoding="utf-8")


def append_line(path: Path, line: str, *, root: Path) -> None:
    """One whole line appended in one write (several processes may append to a sweep's ledger at once)."""
    with open_append(path, root=root) as out:
        out.write(line)


def remove_tree(path: Path, *, root: Path) -> None:
    """Delete a folder (or a file) below `root`; a link there is unlinked, never followed."""
    path = Path(os.path.abspath(path))
    if link_below(path.parent, root) is not None:
        raise UnsafePath(f"{path}: a symbolic link on its way from {root}: not removed")
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible rather than fail to write
    return value


def jsonl_line(row: dict) -> str:
    """One row as one line: raw UTF-8 (U+2028 stays inside its string), ending in the only separator, "\\n"."""
    return json.dumps(row, ensure_ascii=False) + "\n"


# ---------------------------------------------------------------- reading

def _followed_link(path: Path, root: Optional[Path]) -> bool:
    """Whether reading `path` would follow a link below `root` (said once, in the log); a path outside it too."""
    if root is None:
        return False
    try:
        link = link_below(path, root)
    except UnsafePath as e:
        log.warning("%s: not read", e)
        return True
    if link is not None:
        log.warning("%s is a symbolic link: not followed (neftlab reads nothing through a link inside %s)", link, root)
    return link is not None


def read_text(path: Path, *, root: Optional[Path] = None) -> Optional[str]:
    """The file's text, None when it is absent, a link below `root`, or unreadable (said, naming it)."""
    if _followed_link(Path(path), root):
        return None
    try:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("%s is unreadable (%s): ignored", path, e.strerror or type(e).__name__)
        return None


def read_json(path: Path, *, root: Optional[Path] = None) -> Optional[Any]:
    """The file's JSON, or None (with a warning naming it) when it is absent, empty, cut off, not JSON or a link."""
    if _followed_link(Path(path), root):
        return None
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        log.warning("%s is unreadable (%s): ignored", path, type(e).__name__ if isinstance(e, OSError) else e)
        return None


def read_jsonl(path: Path, required: str = "step", *, root: Optional[Path] = None) -> list[dict]:
    """The rows of a JSONL file that are objects with the key `required`. JSONL is split on "\\n" only: U+2028 and
    U+0085 are valid inside a JSON string, and `str.splitlines` would split a row at them. A torn last line (a crash
    or a full disk mid-write) is skipped and reported, a corrupt line elsewhere is skipped and reported with its
    number."""
    text = read_text(path, root=root)
    if text is None:
        return []
    lines = text.split("\n")
    rows = []
    last = max((i for i, line in enumerate(lines, 1) if line.strip()), default=0)
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and required in row:
            rows.append(row)
        else:
            where = "its last line, cut off" if number == last else f"line {number}, not a JSON event"
            log.warning("%s: skipped %s", path, where)
    return rows


def read_yaml(path: Path, default: Any, *, root: Optional[Path] = None) -> Any:
    """The YAML file's data (`yaml.safe_load`: no tags that build objects), or `default` when absent or unreadable."""
    import yaml
    text = read_text(path, root=root)
    if text is None:
        return default
    try:
        return yaml.safe_load(text) or default
    except yaml.YAMLError as e:
        log.warning("%s is unreadable (%s): ignored", path, type(e).__name__)
        return default


def load_torch(path: Path, *, root: Optional[Path] = None) -> Any:
    """A `torch.save` file loaded with `weights_only=True` onto the CPU (not onto the GPU that saved it): a pickle
    that would build arbitrary objects (and run their code) is refused, named."""
    import torch
    path = Path(path)
    if root is not None:
        confined(path, root)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UnreadableFile(f"{path} is missing") from None
    except Exception as e:  # noqa: BLE001 - an unpickler refusal, a torn zip, ...: named in one line
        raise UnreadableFile(f"{path} cannot be loaded safely ({first_line(e, 160)})") from None


# numpy's arrays and dtypes in the Trainer's rng_state.pth, which it loads with weights_only and these allowed
SAFE_GLOBALS = ("numpy.ndarray", "numpy.dtype", "numpy._core.multiarray._reconstruct",
                "numpy.core.multiarray._reconstruct", "numpy.dtypes.")
NEVER_LOADED = ("training_args.bin",)  # a checkpoint's pickled TrainingArguments: nothing of neftlab's reads it


def unsafe_globals(path: Path) -> list[str]:
    """The objects a `torch.save` file would build that `weights_only` loading refuses, read from its pickle
    without loading it (torch's own scan)."""
    import torch
    found = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [name for name in found if not name.startswith(SAFE_GLOBALS)]


def problem_with(path: Path) -> Optional[str]:
    """Why a saved file cannot be read, from its structure alone (cheap: no tensor is loaded), or None. A
    `torch.save` file's zip directory and the objects its pickle would build, a safetensors file's header, a JSON
    file's text. A file whose size is right but whose bytes were damaged (a zeroed zip directory) fails here, and
    so does a pickle that would run code."""
    path = Path(path)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return f"{path} is missing"
    if stat.S_ISLNK(mode) or not stat.S_ISREG(mode):
        return f"{path} is not a regular file"
    try:
        if path.suffix in (".pt", ".pth", ".bin"):
            with zipfile.ZipFile(path) as archive:
                if not archive.namelist():
                    return f"{path} is corrupt (an empty archive)"
            if path.name not in NEVER_LOADED and (unsafe := unsafe_globals(path)):
                return f"{path} holds objects that would run code when loaded ({', '.join(unsafe[:3])}): refused"
        elif path.suffix == ".safetensors":
            from safetensors import safe_open
            with safe_open(str(path), framework="pt"):
                pass
        elif path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
    except Exception as e:  # noqa: BLE001 - whatever a damaged file makes its reader raise
        return f"{path} is corrupt ({first_line(e, 120)})"
    return None
