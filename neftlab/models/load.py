"""Tokenizers and models for the `model` group, from the files `source.locate` found: pretrained or randomly
initialised (the *_tiny test models), optionally LoRA. A model that fails to load is named, with what went wrong,
in one line."""

from __future__ import annotations

import logging

import torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, OPTConfig,
                          OPTForCausalLM, PreTrainedModel, PreTrainedTokenizerBase)

from ..config import ModelConfig
from ..core.errors import first_line
from .source import ModelFiles, ModelLoadError, locate

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


def load_tokenizer(cfg: ModelConfig, files: ModelFiles | None = None) -> PreTrainedTokenizerBase:
    files = files or locate(cfg)
    try:
        tok = AutoTokenizer.from_pretrained(files.tokenizer)
    except Exception as e:  # noqa: BLE001 - a broken tokenizer file, named in one line
        raise ModelLoadError(f"the tokenizer in {files.tokenizer} cannot be loaded ({first_line(e)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    if cfg.causal and not tok.chat_template:
        tok.chat_template = PLAIN_CHAT_TEMPLATE
    return tok


def load_model(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, num_labels: int = 2, seed: int = 0,
               files: ModelFiles | None = None) -> torch.nn.Module:
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
        files = files or locate(cfg)
        auto = AutoModelForCausalLM if cfg.causal else AutoModelForSequenceClassification
        try:
            model = auto.from_pretrained(files.model, dtype=dtype, **labels)
        except Exception as e:  # noqa: BLE001 - whatever broken weights make transformers raise
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path}: the weights in {files.model} cannot be "
                                 f"loaded ({first_line(e)})") from None
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


def context_length(cfg: ModelConfig, files: ModelFiles | None = None) -> int | None:
    """The model's context window from its config alone, before any weights load (None if it names none)."""
    if cfg.random_init:
        config = RANDOM_INIT[cfg.arch][0](**dict(cfg.arch_config))
    else:
        files = files or locate(cfg)
        try:
            config = AutoConfig.from_pretrained(files.model)
        except Exception as e:  # noqa: BLE001 - a broken config.json, named in one line
            raise ModelLoadError(f"model.name_or_path={cfg.name_or_path}: its config in {files.model} cannot be "
                                 f"read ({first_line(e)})") from None
    return getattr(config, "max_position_embeddings", None)
