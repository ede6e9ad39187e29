"""Every model family loads offline; hub ids fail fast with the alternatives; GGUF is converted once."""

import socket

import pytest
import torch
import transformers
from safetensors.torch import save_file

from neftlab import models
from neftlab.models.source import check_conversion
from tests.helpers import compose_cfg


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
    """Offline, nothing tries the network (a retrying download would take minutes), and the line names what to
    use instead."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_network(*args, **kwargs):
        raise AssertionError("tried to reach the network")
    monkeypatch.setattr(socket, "create_connection", no_network)
    with pytest.raises(models.ModelLoadError) as e:
        models.resolve("facebook/opt-125m", "opt")
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
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
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


def test_a_truncated_gguf_conversion_does_not_pass_its_check(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    save_file({"w": torch.zeros(64, 64)}, tmp_path / "model.safetensors")
    assert check_conversion(tmp_path) == tmp_path
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="model.safetensors is corrupt"):
        check_conversion(tmp_path)


def _model_dir(tmp_path):
    """A tiny LLaMA saved as a local model directory."""
    cfg = compose_cfg("model=llama_tiny").model
    tok = models.load_tokenizer(cfg)
    folder = tmp_path / "model"
    models.load_model(cfg, tok).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_broken_model_files_are_named_in_one_line(tmp_path):
    """Issue 32, case 28: no weights, a safetensors file cut in half, a .gguf that is an HTML page."""
    folder = _model_dir(tmp_path)
    cfg = compose_cfg(f"model.name_or_path={folder}").model
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(models.ModelLoadError, match=r"model.safetensors is corrupt"):
        models.locate(cfg)
    weights.unlink()
    with pytest.raises(models.ModelLoadError, match=r"no weights there \(no \*.safetensors or \*.bin file"):
        models.locate(cfg)
    page = tmp_path / "model.gguf"
    page.write_text("<!DOCTYPE html><html><body>Sign in to continue</body></html>")
    with pytest.raises(models.ModelLoadError, match=r"model.gguf is not a GGUF file: it starts with '<!DOCTYPE html.*"
                                                    r"\(an HTML page\?\)"):
        models.locate(compose_cfg(f"model.name_or_path={page}").model)


def test_a_changed_base_model_changes_its_fingerprint(tmp_path):
    """What a resume compares: a LoRA adapter belongs to the base weights it was trained on (case 23)."""
    folder = _model_dir(tmp_path)
    cfg = compose_cfg(f"model.name_or_path={folder}").model
    before = models.locate(cfg).fingerprint()
    assert before == models.locate(cfg).fingerprint()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    model.save_pretrained(folder)
    assert models.locate(cfg).fingerprint() != before
