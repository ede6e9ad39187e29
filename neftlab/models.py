"""Tokenizers and models for the `model` group: pretrained, GGUF-converted or randomly initialised, optionally LoRA.

Everything loads without the hub: packaged weights are found with the `${pkg:...}`
resolver, GGUF files are de-quantised once and cached as safetensors, and a hub id that
is neither cached nor reachable fails at once with the alternatives instead of retrying.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM,
                          PreTrainedModel, PreTrainedTokenizerBase)

from .cache import cache_root, load_or_rebuild
from .config import ModelConfig
from .errors import NeftlabError

log = logging.getLogger(__name__)

RANDOM_INIT = {"llama": (LlamaConfig, LlamaForCausalLM), "opt": (OPTConfig, OPTForCausalLM),
               "bert": (BertConfig, BertForSequenceClassification)}

# Used where a tokenizer brings no chat template (GPT-2/OPT tokenizers): a plain Human/Assistant layout.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Human: {{ m['content'] }}\n"
    "{% else %}### Assistant: {{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}### Assistant:{% endif %}"
)


class ModelLoadError(NeftlabError, RuntimeError):
    """Weights or tokenizer that cannot be had here; the message says what to do instead."""


def _gguf_to_hf(gguf: Path) -> Path:
    """De-quantise a GGUF file into an HF directory once; later loads, and other processes, read the cache."""
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
    from safetensors import safe_open
    json.loads((path / "config.json").read_text())
    for weights in path.glob("*.safetensors"):
        with safe_open(str(weights), framework="pt"):
            pass
    return path


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=3).close()
        return True
    except OSError:
        return False


def resolve(name_or_path: str, arch: str) -> str:
    """A local directory for `name_or_path`: GGUF converted, hub ids only from the cache or a reachable hub."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model.name_or_path={name_or_path}: no such GGUF file")
        return str(_gguf_to_hf(path))
    if path.exists():
        return str(path)
    if name_or_path.startswith(("/", ".", "~")):
        raise ModelLoadError(f"model.name_or_path={name_or_path}: no such directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, local_files_only=True)
    except Exception:
        pass
    if not _hub_reachable():
        raise ModelLoadError(
            f"model.name_or_path={name_or_path} is not in the local Hugging Face cache and the hub cannot be "
            f"reached from here. Use a local copy (model.name_or_path=/path/to/dir) or the offline "
            f"model={arch}_tiny; packaged pretrained weights: model=llama, model=bert")
    return name_or_path


def load_tokenizer(cfg: ModelConfig) -> PreTrainedTokenizerBase:
    tok = AutoTokenizer.from_pretrained(resolve(cfg.tokenizer or cfg.name_or_path, cfg.arch))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if cfg.causal and not tok.chat_template:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int = 2,
               seed: int = 0) -> torch.nn.Module:
    """The model of `cfg`, with its vocabulary matched to `tokenizer` and LoRA applied when enabled."""
    dtype = getattr(torch, cfg.dtype)
    labels = {} if cfg.causal else {"num_labels": num_labels}
    if cfg.random_init:
        config_cls, model_cls = RANDOM_INIT[cfg.arch]
        config = config_cls(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                            **dict(cfg.arch_config), **labels)
        torch.manual_seed(seed)
        model = model_cls(config).to(dtype)
    else:
        auto = AutoModelForCausalLM if cfg.causal else AutoModelForSequenceClassification
        model = auto.from_pretrained(resolve(cfg.name_or_path, cfg.arch), dtype=dtype, **labels)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if cfg.lora.enabled:
        model = _with_lora(model, cfg)
    return model


def _with_lora(model: PreTrainedModel, cfg: ModelConfig) -> torch.nn.Module:
    from peft import LoraConfig, TaskType, get_peft_model
    targets = cfg.lora.target_modules
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM if cfg.causal else TaskType.SEQ_CLS, r=cfg.lora.r,
                      lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=targets[0] if list(targets) == ["all-linear"] else list(targets))
    model = get_peft_model(model, lora)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA: %d of %d parameters trainable (%.2f%%)", trainable, total, 100 * trainable / total)
    return model


def context_length(cfg: ModelConfig) -> int | None:
    """The model's context window from its config alone, before any weights load (None if it names none)."""
    if cfg.random_init:
        config = RANDOM_INIT[cfg.arch][0](**dict(cfg.arch_config))
    else:
        from transformers import AutoConfig
        config = AutoConfig.from_pretrained(resolve(cfg.name_or_path, cfg.arch))
    return getattr(config, "max_position_embeddings", None)
