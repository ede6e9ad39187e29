"""Every model family loads offline; hub ids fail fast with the alternatives; GGUF is converted once."""

import time

import pytest
import torch

from conftest import compose_cfg
from neftlab import models


@pytest.mark.parametrize("name, cls", [("llama_tiny", "LlamaForCausalLM"), ("opt_tiny", "OPTForCausalLM"),
                                       ("bert_tiny", "BertForSequenceClassification")])
def test_tiny_models_are_small_random_and_match_the_tokenizer(name, cls):
    cfg = compose_cfg(f"model={name}").model
    tok = models.load_tokenizer(cfg)
    model = models.load_model(cfg, tok, num_labels=3)
    assert type(model).__name__ == cls
    assert model.config.hidden_size <= 64 and model.config.num_hidden_layers == 2
    assert model.get_input_embeddings().num_embeddings == len(tok)
    assert tok.pad_token is not None and (cfg.arch == "bert" or tok.chat_template)
    if cfg.arch == "bert":
        assert model.config.num_labels == 3


def test_lora_wraps_with_peft():
    cfg = compose_cfg("model=llama_tiny", "model.lora.enabled=true", "model.lora.r=4").model
    model = models.load_model(cfg, models.load_tokenizer(cfg))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_unreachable_hub_model_fails_fast_naming_alternatives(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(models.ModelLoadError) as e:
        models.resolve("facebook/opt-125m", "opt")
    assert time.perf_counter() - start < 10
    assert "not in the local Hugging Face cache" in str(e.value)
    assert "model=opt_tiny" in str(e.value) and "model.name_or_path=/path/to/dir" in str(e.value)


def test_missing_local_paths_are_clear():
    with pytest.raises(models.ModelLoadError, match="no such GGUF file"):
        models.resolve("/nowhere/model.gguf", "llama")
    with pytest.raises(models.ModelLoadError, match="no such directory"):
        models.resolve("./nowhere", "llama")


def test_gguf_is_converted_once_then_read_from_cache(monkeypatch):
    gguf = compose_cfg("model=llama").model.name_or_path
    first = models.resolve(gguf, "llama")  # converts if this machine has not yet

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted the GGUF file again")
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert models.resolve(gguf, "llama") == first


@pytest.mark.slow
def test_packaged_smollm2_loads_as_a_pretrained_llama():
    cfg = compose_cfg("model=llama").model
    tok = models.load_tokenizer(cfg)
    model = models.load_model(cfg, tok)
    assert model.get_input_embeddings().weight.shape == (49152, 576)
    assert model.config.tie_word_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    assert model.dtype == torch.float32
