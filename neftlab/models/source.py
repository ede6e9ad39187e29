"""Where a model's weights are, found once per run: a local directory, a `.gguf` file (de-quantised once into the
cache), or a hub id that is already in the local Hugging Face cache. Nothing is downloaded where the hub cannot be
reached: the run stops at once with the offline alternatives. Broken files (no weights, a safetensors file cut
short, a `.gguf` that is really an HTML page) are named with what is wrong before anything loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from ..config import ModelConfig
from ..core.cache import cache_root, load_or_rebuild
from ..core.errors import NeftlabError
from ..core.files import problem_with

log = logging.getLogger(__name__)

WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.gguf")
DIGEST_BYTES = 1 << 20


class ModelLoadError(NeftlabError, RuntimeError):
    """Weights or tokenizer that cannot be had here; the message says what to do instead."""


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def _check_gguf(path: Path) -> None:
    """A `.gguf` file starts with the bytes GGUF; an HTML page saved under that name (a download that hit a login
    page) does not."""
    with path.open("rb") as f:
        head = f.read(64)
    if not head.startswith(b"GGUF"):
        shown = head[:24].decode("utf-8", "replace").strip()
        kind = " (an HTML page?)" if shown.lower().startswith(("<!doctype", "<html")) else ""
        raise ModelLoadError(f"model.name_or_path={path} is not a GGUF file: it starts with {shown!r}{kind}")


def _gguf_to_hf(gguf: Path) -> Path:
    """De-quantise a GGUF file into an HF directory once; later loads, and other processes, read the cache."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch
    _check_gguf(gguf)
    stat = gguf.stat()
    key = hashlib.sha1(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root() / "gguf" / f"{gguf.stem}-{key}"

    def convert(out: Path) -> None:
        log.info("Converting %s to safetensors in %s (once; later runs load the cache)", gguf.name, target)
        kwargs = dict(gguf_file=gguf.name)
        AutoTokenizer.from_pretrained(gguf.parent, **kwargs).save_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kwargs)
        # The weights are already de-quantised; dropping the GGUF marker lets them be saved as plain safetensors.
        model.hf_quantizer = None
        model.config.__dict__.pop("quantization_config", None)
        model.save_pretrained(out)
    return load_or_rebuild(target, convert, check_conversion, "GGUF conversion cache")


def check_conversion(path: Path) -> Path:
    """A converted model directory whose files no longer load (a truncated model.safetensors) fails here, so that
    it is rebuilt rather than failing every later run."""
    json.loads((path / "config.json").read_text())
    for weights in path.glob("*.safetensors"):
        if (why := problem_with(weights)) is not None:
            raise ValueError(why)
    return path


def check_directory(path: Path, key: str, weights: bool) -> None:
    """A model directory has a config.json and, for weights, at least one intact weight file."""
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{key}={path}: no config.json there, not a Hugging Face model directory")
    if not weights:
        return
    found = [p for pattern in WEIGHTS[:4] for p in path.glob(pattern)]
    if not found:
        raise ModelLoadError(f"{key}={path}: no weights there (no *.safetensors or *.bin file beside config.json)")
    for file in found:
        if (why := problem_with(file)) is not None:
            raise ModelLoadError(f"{key}: {why}")


def resolve(name_or_path: str, arch: str, key: str = "model.name_or_path", weights: bool = True) -> str:
    """A local directory for `name_or_path`: GGUF converted, hub ids only from the cache or a reachable hub."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"{key}={name_or_path}: no such GGUF file")
        return str(_gguf_to_hf(path))
    if path.is_dir():
        check_directory(path, key, weights)
        return str(path)
    if path.exists() or name_or_path.startswith(("/", ".", "~")):
        raise ModelLoadError(f"{key}={name_or_path}: no such directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:  # noqa: BLE001 - not in the cache: the hub is asked next
        pass
    if not hub_reachable():
        raise ModelLoadError(
            f"{key}={name_or_path} is not in the local Hugging Face cache and the hub cannot be "
            f"reached from here. Use a local copy (model.name_or_path=/path/to/dir) or the offline "
            f"model={arch}_tiny; packaged pretrained weights: model=llama, model=bert")
    return name_or_path


def _digest(path: Path) -> str:
    """The first and last MiB of a weight file, hashed with its size: changed weights change it, and it costs the
    same for a 7B model as for a tiny one."""
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        h.update(f.read(DIGEST_BYTES))
        if size > 2 * DIGEST_BYTES:
            f.seek(size - DIGEST_BYTES)
            h.update(f.read(DIGEST_BYTES))
    return h.hexdigest()[:24]


@dataclass(frozen=True)
class ModelFiles:
    """A run's model and tokenizer, located once (`locate`): local directories (None for a randomly initialised
    model's weights) and what identifies the weights (`fingerprint`)."""
    model: Optional[str]
    tokenizer: str
    source: Optional[Path]  # the file or directory the user named (a .gguf, a directory), for the fingerprint

    def fingerprint(self) -> dict:
        """The base weights a run starts from: a resume refuses other ones (a LoRA adapter belongs to its base)."""
        if self.source is None:
            return {"random_init": True}
        files = [self.source] if self.source.is_file() else sorted(
            p for pattern in WEIGHTS for p in self.source.glob(pattern))
        return {"path": str(self.source.resolve()), "weights": {p.name: _digest(p) for p in files}}


def locate(cfg: ModelConfig) -> ModelFiles:
    tokenizer = resolve(cfg.tokenizer or cfg.name_or_path, cfg.arch, weights=False)
    if cfg.random_init:
        return ModelFiles(None, tokenizer, None)
    same = cfg.tokenizer is None or cfg.tokenizer == cfg.name_or_path
    model = tokenizer if same else resolve(cfg.name_or_path, cfg.arch)
    if same and not model.endswith(".gguf") and Path(cfg.name_or_path).suffix != ".gguf":
        check_directory(Path(model), "model.name_or_path", weights=True)
    source = Path(cfg.name_or_path).expanduser()
    return ModelFiles(model, tokenizer, source if source.exists() else Path(model))
