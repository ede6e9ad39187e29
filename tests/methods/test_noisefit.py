"""noise=noisefit: NoiseFiT's hidden-state noise, its SNR layer rule and its hybrid loss, each against a small
re-implementation of the authors' NoiseFiT.py on fixed tensors; its masks, its packing, its state and its runs."""

import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import neftlab
from neftlab.config import ConfigError
from neftlab.methods import noise
from neftlab.methods.noise.noisefit import NoiseFiT, snr_layers
from tests.helpers import TINY, compose_cfg, run
from tests.methods.test_noise import DIM, padded_batch


def reference_scale(h, base_std, beta=0.1):
    """The authors' adaptive_noise_injection (both versions), its noise's std per value: base_std * MAD * weight *
    factor, with the batch's mean var."""
    embed_var = h.var(dim=-1, keepdim=True)
    noise_factor = torch.clamp(torch.exp(embed_var / (embed_var.mean() + 1e-6)), max=5.0)
    median = h.median(dim=-1, keepdim=True).values
    mad = (h - median).abs().median(dim=-1, keepdim=True).values
    mad = mad.clamp(min=1e-6 * h.norm(dim=-1, keepdim=True))
    weight = torch.exp(-beta * torch.abs(h - median) / (mad + 1e-6))
    return base_std * mad * weight * noise_factor


def reference_full_loss(ce, logits, noisy1, noisy2, labels, alpha, lam, t):
    """The authors' compute_loss, loss_mode "full" (NoiseFiT.py today), with the mask of the positions that predict
    a labelled next token."""
    logits, noisy1, noisy2, mask = logits[:, :-1], noisy1[:, :-1], noisy2[:, :-1], (labels[:, 1:] != -100).float()

    def masked_mean(x):
        return (x * mask).sum() / mask.sum().clamp_min(1.0)

    soft_targets = F.softmax((logits / t).detach(), dim=-1)
    soft1 = F.kl_div(F.log_softmax(noisy1 / t, dim=-1), soft_targets, reduction="none").sum(dim=-1)
    soft2 = F.kl_div(F.log_softmax(noisy2 / t, dim=-1), soft_targets, reduction="none").sum(dim=-1)
    soft = masked_mean(0.5 * (soft1 + soft2)) * t ** 2
    consistency = masked_mean(F.kl_div(F.log_softmax(noisy1 / t, dim=-1), F.softmax((noisy2 / t).detach(), dim=-1),
                                       reduction="none").sum(dim=-1)) * t ** 2
    return alpha * ce + (1 - alpha) * soft + lam * consistency


def llama(layers=4):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=DIM, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2))


def forward_of(model):
    def forward(batch):
        out = model(**batch)
        return out.loss, out
    return forward


def mean(values, mask):
    mask = mask.float()
    return (values * mask).sum() / mask.sum()


@pytest.mark.parametrize("rule, expected", [("largest", [4, 0, 2]), ("lowest", [1, 3, 2])])
def test_the_snr_rule_picks_the_layers_of_largest_or_lowest_snr(rule, expected):
    snr = torch.tensor([5.0, 1.0, 3.0, 2.0, 9.0])
    assert snr_layers(snr, 3, rule) == expected == torch.topk(snr, 3, largest=rule == "largest").indices.tolist()
    assert sorted(snr_layers(snr, 8, rule)) == [0, 1, 2, 3, 4]  # a model with fewer layers: all of them


def test_the_noise_is_the_references_adaptive_noise_at_base_std_scale_over_sqrt_d():
    model = llama()
    kind = noise.attach(model, "noisefit", seed=4, scale=2.0, beta=0.3)
    torch.manual_seed(1)
    h = torch.randn(1, 7, DIM) * torch.linspace(0.5, 3, 7)[None, :, None]
    expected = reference_scale(h, 2.0 / math.sqrt(DIM), beta=0.3)
    assert torch.allclose(kind.adaptive_scale(h), expected, rtol=1e-5, atol=0)
    unit = torch.randn(h.shape, generator=torch.Generator().manual_seed(4))
    assert torch.allclose(kind.draw(h), unit * expected, rtol=1e-5, atol=0)  # z from the kind's own stream


def test_no_noise_on_padding_and_each_packed_sequence_has_its_own_statistics():
    """A padded row's real tokens get what the row alone would get and its padding none; in one packed row (position
    ids restarting at 0) each sequence gets what it would alone, its mean var its own."""
    model = llama()
    kind = noise.attach(model, "noisefit", seed=1)
    torch.manual_seed(2)
    parts = [torch.randn(1, n, DIM) * s for n, s in ((5, 1.0), (3, 4.0), (6, 0.5))]
    alone = [reference_scale(p, 1 / math.sqrt(DIM)) for p in parts]
    ids, mask = padded_batch([5, 3, 6], vocab=500)
    padded = torch.zeros(3, 6, DIM)
    for i, p in enumerate(parts):
        padded[i, :p.shape[1]] = p[0]
    kind._catch_inputs(model, (), {"attention_mask": mask})
    scale = kind.adaptive_scale(padded)
    for i, (p, a) in enumerate(zip(parts, alone)):
        assert torch.allclose(scale[i, :p.shape[1]], a[0], rtol=1e-5, atol=0)
        assert torch.count_nonzero(scale[i, p.shape[1]:]) == 0
    packed = torch.cat(parts, dim=1)
    positions = torch.cat([torch.arange(p.shape[1]) for p in parts])[None]
    for inputs in ({"position_ids": positions}, {"cu_seq_lens_q": torch.tensor([0, 5, 8, 14])}):
        kind._catch_inputs(model, (), inputs)
        assert torch.allclose(kind.adaptive_scale(packed), torch.cat(alone, dim=1), rtol=1e-5, atol=0)
    assert not torch.allclose(reference_scale(packed, 1 / math.sqrt(DIM)), torch.cat(alone, dim=1))


def test_the_hybrid_loss_is_the_references_full_mode_with_its_detached_targets():
    torch.manual_seed(3)
    logits = [torch.randn(2, 6, 11, requires_grad=True) for _ in range(3)]
    labels = torch.tensor([[-100, -100, 4, 5, 6, -100], [-100, 1, 2, 3, 7, 8]])
    ce = logits[0].square().mean()  # any differentiable function of the clean logits
    kind = noise.attach(llama(1), "noisefit", hybrid_alpha=0.3, lambda_consistency=0.7, temperature=2.0)
    kind.chosen = [0]
    passes = iter(logits)

    def forward(batch):
        out = next(passes)
        assert kind._noisy == (out is not logits[0])  # noise on the two noisy passes only
        return ce if out is logits[0] else None, SimpleNamespace(logits=out)

    ours, outputs = kind.loss(forward, {"labels": labels}, mean)
    theirs = reference_full_loss(ce, *logits, labels, 0.3, 0.7, 2.0)
    assert outputs.logits is logits[0] and ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    ours_grads = torch.autograd.grad(ours, logits, retain_graph=True)
    for mine, ref in zip(ours_grads, torch.autograd.grad(theirs, logits, retain_graph=True)):
        assert torch.allclose(mine, ref, atol=1e-7)
    soft_only = torch.autograd.grad(ours - 0.3 * ce, logits[0], allow_unused=True)[0]
    assert soft_only is None or torch.count_nonzero(soft_only) == 0  # the clean pass is only the KL's target
    assert set(kind.metrics()) == {"noise/noisefit_ce", "noise/noisefit_soft", "noise/noisefit_consistency"}


def test_layers_are_chosen_once_by_snr_in_eval_mode_and_noised_in_training_only():
    model = llama()
    kind = noise.attach(model, "noisefit", seed=5, layers=2)
    events, modes = [], []
    kind.log_event = lambda step, values: events.append(values)
    model.model.layers[0].register_forward_pre_hook(lambda m, a: modes.append(m.training))
    ids, mask = padded_batch([9, 4], vocab=500)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model.eval()
    clean = model(**batch).logits
    model.train()
    loss, _ = kind.loss(forward_of(model), batch, mean)
    assert modes == [False, False, True, True, True]  # SNR in eval mode, then a clean pass and two noisy ones
    assert len(kind.chosen) == 2 and len(kind.snr) == 4
    assert kind.chosen == torch.topk(torch.tensor(kind.snr), 2).indices.tolist()
    assert events == [{f"noise/noisefit_snr_layer{i}": kind.snr[i] for i in kind.chosen}]
    kind.loss(forward_of(model), batch, mean)
    assert len(events) == 1 and len(modes) == 8  # chosen once
    kind._noisy = True  # even within a noisy pass, eval mode gets no noise
    model.eval()
    assert torch.equal(model(**batch).logits, clean)
    model.train()
    assert not torch.allclose(model(**batch).logits, clean)
    kind.remove()
    assert torch.equal(model(**batch).logits, clean)


def test_a_resumed_kind_noises_the_same_layers_from_the_same_stream_without_measuring_again():
    model = llama()
    ids, mask = padded_batch([9, 4], vocab=500)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    model.train()
    first = noise.attach(model, "noisefit", seed=6, layers=1, snr="lowest")
    first.loss(forward_of(model), batch, mean)
    state = first.state_dict()
    first._noisy = True
    expected = model(**batch).logits
    first.remove()
    resumed = noise.attach(model, "noisefit", seed=6, layers=1, snr="lowest")
    resumed.load_state_dict(state)
    assert resumed.chosen == first.chosen and resumed.snr == first.snr
    resumed.choose = None  # a second measurement would fail here
    resumed._noisy = True
    assert torch.equal(model(**batch).logits, expected)


@pytest.mark.parametrize("override, message", [
    ("scale=0", "scale=0.0 is not allowed: > 0"), ("layers=0", "layers=0 is not allowed: an integer >= 1"),
    ("snr=middle", "snr='middle' is not allowed: one of largest, lowest"),
    ("beta=-1", "beta=-1.0 is not allowed: >= 0"),
    ("hybrid_alpha=1.5", "hybrid_alpha=1.5 is not allowed: in [0, 1]"),
    ("lambda_consistency=-1", "lambda_consistency=-1.0 is not allowed: >= 0"),
    ("temperature=0", "temperature=0.0 is not allowed: > 0")])
def test_each_key_out_of_its_range_is_refused_in_one_line(override, message):
    with pytest.raises(ConfigError, match=f"^noise.{re.escape(message)}$"):
        compose_cfg("noise=noisefit", f"noise.{override}")


def test_activation_checkpointing_is_refused_in_one_line():
    """Its hooks would be rerun in the backward pass, after the noisy passes, without their noise."""
    with pytest.raises(ConfigError, match=r"^trainer\.args\.activation_checkpointing=True is not allowed: false with "
                                          r"noise\.kind=noisefit: its noise is drawn by hooks [^\n]*$"):
        compose_cfg("noise=noisefit", "+trainer.args.activation_checkpointing=true")
    model = llama(1)
    model.gradient_checkpointing_enable()
    kind = noise.attach(model, "noisefit")
    with pytest.raises(noise.NoiseError, match=r"^noise=noisefit cannot train with activation checkpointing on: "):
        kind.loss(forward_of(model), {"input_ids": torch.ones(1, 3, dtype=torch.long)}, mean)


def test_a_model_without_one_stack_of_layers_is_refused_in_one_line():
    bare = torch.nn.Linear(2, 2)
    bare.config = SimpleNamespace(num_hidden_layers=2)
    with pytest.raises(noise.NoiseError, match=r"^noise=noisefit needs the model's one stack of [^\n]*$"):
        NoiseFiT.attach(bare)


def test_noise_for_refuses_it_in_one_line(tmp_path):
    model = llama(1)
    trainer = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True))
    with pytest.raises(noise.NoiseError, match=r"^noise kind noisefit computes its own training loss [^\n]*$"):
        neftlab.noise_for(trainer, "noisefit")
    assert not model._forward_pre_hooks  # nothing left attached


@pytest.mark.parametrize("study", [[*TINY, "model=llama_tiny"], [*TINY, "model=opt_tiny"], [*TINY, "model=bert_tiny"],
                                   ["experiment=overfit", "size=tiny"]], ids=["llama", "opt", "bert", "overfit"])
def test_noisefit_trains_and_logs_its_terms_and_layers(tmp_path, study):
    """Each of the layer stacks it finds, and a BERT classifier's one row per example; the overfit study's shape."""
    outcome, summary = run(*study, "logger=none", "noise=noisefit", out_dir=tmp_path)
    assert summary["status"] == "completed", outcome.message
    assert math.isfinite(summary["train/loss"]) and math.isfinite(summary["noise/noisefit_consistency"])
    events = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    chosen = [e for e in events if any(k.startswith("noise/noisefit_snr_layer") for k in e)]
    assert len(chosen) == 1 and len([k for k in chosen[0] if k.startswith("noise/noisefit_snr")]) == 2
