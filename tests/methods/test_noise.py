"""Noise statistics on padded batches, the dynamic-alpha rule, and where noise must never apply."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM, BertConfig, BertForSequenceClassification
from transformers.integrations.neftune import neftune_post_forward_hook

from neftlab.config import ConfigError
from neftlab.methods import noise
from neftlab.methods.noise import dynamic as dynamic_kind
from neftlab.methods.noise.dynamic import Dynamic, stability
from neftlab.methods.noise.embedding import schedule_factor
from neftlab.methods.noise.noisytune import noisytune

DIM = 64
LENGTHS = [300, 80, 12]  # a padded batch of mixed lengths


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=500, hidden_size=DIM, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2))


def padded_batch(lengths=LENGTHS, vocab=500):
    ids = torch.randint(1, vocab, (len(lengths), max(lengths)))
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    return ids, mask


def added_noise(model, ids, mask, train=True, **kwargs):
    """Noisy minus clean embedding output, as the model's own forward sees it."""
    seen = []
    emb = model.get_input_embeddings()
    capture = emb.register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model.train(train)
    model(input_ids=ids, attention_mask=mask, **kwargs)
    capture.remove()
    return seen[0] - F.embedding(ids, emb.weight).detach()


def test_uniform_noise_follows_neftune_per_sample():
    model, (ids, mask) = tiny_llama(), padded_batch()
    torch.manual_seed(1)
    with noise.attach(model, "uniform", alpha=5.0):
        delta = added_noise(model, ids, mask)
    for i, n in enumerate(LENGTHS):
        bound = 5.0 / math.sqrt(n * DIM)
        real = delta[i, :n]
        assert real.abs().max() <= bound * (1 + 1e-5)
        assert real.abs().max() >= 0.95 * bound
        samples = real.numel()
        assert abs(real.mean()) < 5 * bound / math.sqrt(3 * samples)  # 5 standard errors of the mean
        assert real.var().item() == pytest.approx(bound ** 2 / 3, rel=0.15)
        assert torch.count_nonzero(delta[i, n:]) == 0  # padding gets none


@pytest.mark.parametrize("with_mask", [False, True])
def test_packed_sequences_each_get_noise_for_their_own_length(with_mask):
    """One packed row of LENGTHS: position ids restart at each sequence. HF's formula, alpha/sqrt(row * d),
    would give the 12-token sequence 5x too little noise; each sequence must get alpha/sqrt(L_i * d)."""
    model = tiny_llama()
    ids = torch.randint(1, 500, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    torch.manual_seed(1)
    with noise.attach(model, "uniform", alpha=5.0) as hook:
        delta = added_noise(model, ids, torch.ones_like(ids) if with_mask else None, position_ids=positions,
                            use_cache=False)
        ratio = hook.padded_ratio
    start = 0
    for n in LENGTHS:
        bound, part = 5.0 / math.sqrt(n * DIM), delta[0, start:start + n]
        assert bound * 0.95 <= part.abs().max() <= bound * (1 + 1e-5)
        assert part.var().item() == pytest.approx(bound ** 2 / 3, rel=0.15)
        start += n
    expected = sum(n * math.sqrt(n / sum(LENGTHS)) for n in LENGTHS) / sum(LENGTHS)  # token mean of sqrt(L_i/row)
    assert ratio == pytest.approx(expected, rel=1e-5)
    with noise.attach(model, "uniform", alpha=5.0, length_mode="padded"):  # the HF formula, for comparison runs
        padded = added_noise(model, ids, None, position_ids=positions, use_cache=False)
    assert padded.abs().max() <= 5.0 / math.sqrt(sum(LENGTHS) * DIM) * (1 + 1e-5)


def test_no_noise_in_eval_mode_or_after_remove():
    model, (ids, mask) = tiny_llama(), padded_batch()
    handle = noise.attach(model, "uniform", alpha=5.0)
    assert torch.count_nonzero(added_noise(model, ids, mask, train=False)) == 0
    assert torch.count_nonzero(added_noise(model, ids, mask)) > 0
    handle.remove()
    assert torch.count_nonzero(added_noise(model, ids, mask)) == 0


def test_context_manager_removes_noise_when_training_raises():
    model, (ids, mask) = tiny_llama(), padded_batch()
    with pytest.raises(RuntimeError, match="boom"):
        with noise.attach(model, "uniform", alpha=5.0):
            raise RuntimeError("boom")
    assert torch.count_nonzero(added_noise(model, ids, mask)) == 0


def test_generation_gets_no_noise():
    model, (ids, mask) = tiny_llama(), padded_batch([6])
    reference = model.eval().generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
    with noise.attach(model, "uniform", alpha=1000.0):
        model.train()
        model.eval()
        assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False), reference)


def test_padded_length_mode_reproduces_the_trainers_hook():
    model, (ids, mask) = tiny_llama(), padded_batch()
    torch.manual_seed(3)
    with noise.attach(model, "uniform", alpha=5.0, length_mode="padded"):
        ours = added_noise(model, ids, mask)
    emb = model.get_input_embeddings()
    emb.neftune_noise_alpha = 5.0
    hook = emb.register_forward_hook(neftune_post_forward_hook)
    torch.manual_seed(3)
    theirs = added_noise(model, ids, mask)
    hook.remove()
    assert torch.allclose(ours, theirs, atol=1e-7)


def test_gaussian_std_from_alpha_and_absolute():
    lengths = [512] * 4
    model, (ids, mask) = tiny_llama(), padded_batch(lengths)
    with noise.attach(model, "gaussian", alpha=5.0):
        delta = added_noise(model, ids, mask)
    assert delta.std().item() == pytest.approx(5.0 / math.sqrt(512 * DIM), rel=0.05)
    with noise.attach(model, "gaussian", std=0.02):
        assert added_noise(model, ids, mask).std().item() == pytest.approx(0.02, rel=0.05)


def test_bert_and_peft_models_get_noise():
    from peft import LoraConfig, get_peft_model
    bert = BertForSequenceClassification(BertConfig(vocab_size=500, hidden_size=DIM, intermediate_size=64,
                                                    num_hidden_layers=1, num_attention_heads=2))
    peft_llama = get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (bert, peft_llama):
        ids, mask = padded_batch([20, 10])
        with noise.attach(model, "uniform", alpha=5.0):
            delta = added_noise(model, ids, mask)
        assert torch.count_nonzero(delta[1, :10]) == 10 * DIM and torch.count_nonzero(delta[1, 10:]) == 0


def test_noise_is_never_attached_twice():
    model = tiny_llama()
    with noise.attach(model, "uniform"):
        with pytest.raises(noise.NoiseError, match="never applied twice"):
            noise.attach(model, "gaussian")
    model.get_input_embeddings().neftune_noise_alpha = 5.0  # what the Trainer's own NEFTune sets
    with pytest.raises(noise.NoiseError, match="neftune_noise_alpha"):
        noise.attach(model, "uniform")


def test_none_attaches_no_hook():
    model = tiny_llama()
    emb = model.get_input_embeddings()
    with noise.attach(model, "none"):
        assert not emb._forward_hooks and not model._forward_pre_hooks


def test_unknown_kind_is_refused():
    with pytest.raises(noise.NoiseError, match="unknown noise kind 'pink'"):
        noise.attach(tiny_llama(), "pink")


def test_stability_statistic_is_about_one_over_sqrt_d():
    torch.manual_seed(0)
    weight = torch.randn(3000, 576)
    assert stability(weight) == pytest.approx(1 / math.sqrt(576), rel=0.01)
    weight[:1000] = 0  # pruned rows have no direction and are left out
    assert stability(weight) == pytest.approx(1 / math.sqrt(576), rel=0.01)


def dynamic(**kw):
    """The dynamic kind, which is its own callback, and the events it logs."""
    from neftlab.config.noise import typed
    cfg = typed({"_target_": "neftlab.methods.noise.dynamic.Dynamic", **{
        "alpha": 1.0, "alpha_min": 0.5, "alpha_max": 2.0, "alpha_step": 0.5, "adjust_interval": 3,
        "stability_threshold": 0.1, **kw}})
    events = []
    handle = Dynamic(tiny_llama(), cfg, log_event=lambda step, m: events.append((step, m)))
    return handle, handle, events


def test_dynamic_rule_moves_alpha_up_down_and_into_clamps_at_the_right_steps(monkeypatch):
    handle, callback, events = dynamic()
    scripted = iter([0.05, 0.05, 0.05, 0.2, 0.2, 0.2, 0.2])
    monkeypatch.setattr(dynamic_kind, "stability", lambda weight: next(scripted))
    for step in range(1, 22):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert [step for step, _ in events] == [3, 6, 9, 12, 15, 18, 21]
    assert [m["noise/alpha"] for _, m in events] == [1.5, 2.0, 2.0, 1.5, 1.0, 0.5, 0.5]
    assert [m["noise/direction"] for _, m in events] == [1, 1, 0, -1, -1, -1, 0]
    assert handle.alpha == 0.5 and callback.metrics()["noise/alpha"] == 0.5


def test_auto_threshold_is_fixed_by_the_first_measurement(monkeypatch):
    handle, callback, events = dynamic(stability_threshold="auto")
    scripted = iter([0.04, 0.03, 0.05])
    monkeypatch.setattr(dynamic_kind, "stability", lambda weight: next(scripted))
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    for step in (3, 6):
        callback.on_step_end(None, SimpleNamespace(global_step=step), None)
    assert [m["noise/threshold"] for _, m in events] == [0.04, 0.04]
    assert [m["noise/direction"] for _, m in events] == [1, -1]


def test_the_noise_hook_never_waits_for_the_device(monkeypatch):
    """Reading a tensor's value on the host is a device sync on GPUs: the hook does none on a forward, and the
    magnitude is read only when it is logged."""
    model, (ids, mask) = tiny_llama().train(), padded_batch()
    emb = model.get_input_embeddings()
    out = emb(ids).detach()
    with noise.attach(model, "uniform", alpha=5.0) as handle:
        handle._mask = mask
        with monkeypatch.context() as m:
            for read in ("__float__", "__int__", "__bool__", "item", "tolist"):
                m.setattr(torch.Tensor, read, lambda *args: pytest.fail("the noise hook read a value on the host"))
            handle._add_noise(emb, None, out)
            packed = emb(ids.reshape(1, -1)).detach()
            handle._mask, handle._positions = None, torch.arange(ids.shape[1]).repeat(ids.shape[0])[None]
            handle._add_noise(emb, None, packed)  # a packed row: lengths from its position ids, no sync either
            handle._mask, handle._positions = mask, None
            handle._add_noise(emb, None, out)
        expected = sum(5.0 / math.sqrt(n * DIM) for n in LENGTHS) / len(LENGTHS)
        assert handle.mean_magnitude == pytest.approx(expected)
        assert handle.metrics()["noise/mean_magnitude"] == pytest.approx(expected)


def test_noise_is_drawn_and_added_in_fp32_for_bf16_weights():
    """bf16 would draw and scale the noise itself in 8 bits: it is drawn in fp32, added in fp32, cast once."""
    model = tiny_llama().to(torch.bfloat16)
    ids = torch.randint(1, 500, (2, 30))
    hook = noise.attach(model, "uniform", alpha=5.0, seed=3)
    seen = []
    capture = model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    model.train()
    model(input_ids=ids)
    capture.remove()
    hook.remove()
    clean = model.get_input_embeddings()(ids)
    drawn = torch.empty(2, 30, DIM).uniform_(-1, 1, generator=torch.Generator().manual_seed(3))
    assert seen[0].dtype == torch.bfloat16
    assert torch.equal(seen[0], (clean.float() + drawn * 5.0 / (30 * DIM) ** 0.5).to(torch.bfloat16))


@pytest.mark.parametrize("schedule, expected", [
    ("constant", [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("linear", [1.0, 0.75, 0.5, 0.25, 0.0]),
    ("cosine", [1.0, (1 + math.cos(math.pi / 4)) / 2, 0.5, (1 + math.cos(3 * math.pi / 4)) / 2, 0.0]),
    ("warmup", [0.0, 0.5, 1.0, 1.0, 1.0]),  # warmup_ratio 0.5 of 4 steps: 2 steps up
])
def test_schedules_at_each_step(schedule, expected):
    got = [schedule_factor(schedule, step, 4, warmup_ratio=0.5) for step in range(5)]
    assert got == pytest.approx(expected)


def packed_with_labels():
    """One packed row of LENGTHS, each sequence's second half its response (labels), the rest prompt (-100)."""
    ids = torch.randint(1, 500, (1, sum(LENGTHS)))
    positions = torch.cat([torch.arange(n) for n in LENGTHS])[None]
    labels = torch.cat([torch.where(torch.arange(n) >= n // 2, 1, -100) for n in LENGTHS])[None]
    return ids, positions, labels


@pytest.mark.parametrize("tokens", ["response", "prompt"])
def test_noise_on_the_response_or_the_prompt_only_keeps_each_sequences_length(tokens):
    """noise.tokens: the same draws as noise on all tokens, kept on the tokens with (response) or without
    (prompt) a label, each still scaled by its own sequence's whole length L_i, in a packed row."""
    model = tiny_llama()
    ids, positions, labels = packed_with_labels()
    deltas = {}
    for which in ("all", tokens):
        torch.manual_seed(1)
        with noise.attach(model, "uniform", alpha=5.0, tokens=which):
            deltas[which] = added_noise(model, ids, None, position_ids=positions, labels=labels, use_cache=False)
    chosen = (labels != -100) if tokens == "response" else (labels == -100)
    assert torch.equal(deltas[tokens][chosen], deltas["all"][chosen])
    assert torch.count_nonzero(deltas[tokens][~chosen]) == 0
    start = 0
    for n in LENGTHS:  # alpha / sqrt(L_i * d) with L_i the whole sequence, not its chosen tokens
        part = deltas[tokens][0, start:start + n][chosen[0, start:start + n]]
        assert 5.0 / math.sqrt(n * DIM) * 0.95 <= part.abs().max() <= 5.0 / math.sqrt(n * DIM) * (1 + 1e-5)
        start += n
    with noise.attach(model, "uniform", alpha=5.0, tokens=tokens), pytest.raises(noise.NoiseError, match="labels"):
        added_noise(model, ids, None, position_ids=positions, use_cache=False)  # no labels: refused, not guessed


def test_noisytune_follows_its_definition_on_every_tensor_once():
    """W + U(-lambda/2, lambda/2) * std(W), per parameter tensor, drawn in named_parameters() order from the seed:
    the tied embedding once, a constant tensor unchanged, LoRA's adapters untouched."""
    from peft import LoraConfig, get_peft_model
    model = tiny_llama()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.model.norm.weight.data.fill_(1.0)  # std 0: no noise
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert noisytune(model, intensity=0.15, seed=7) == sum(
        1 for n, p in before.items() if "lora_" not in n and p.numel() > 1 and p.std() > 0)
    generator = torch.Generator().manual_seed(7)
    for name, weight in model.named_parameters():
        if "lora_" in name or before[name].std() == 0:
            assert torch.equal(weight, before[name]), name
            continue
        expected = before[name] + (torch.rand(weight.shape, generator=generator) - 0.5) * 0.15 * before[name].std()
        assert torch.allclose(weight, expected, atol=1e-7), name
    embedding = model.get_input_embeddings().weight
    assert embedding.data_ptr() == model.get_output_embeddings().weight.data_ptr()  # still tied, noised once


def test_symnoise_is_plus_or_minus_neftunes_scale_on_real_tokens_only():
    model, (ids, mask) = tiny_llama(), padded_batch()
    with noise.attach(model, "symnoise", alpha=5.0, seed=4):
        delta = added_noise(model, ids, mask)
    for i, n in enumerate(LENGTHS):
        scale = 5.0 / math.sqrt(n * DIM)
        real = delta[i, :n]
        assert torch.allclose(real.abs(), torch.full_like(real, scale), rtol=1e-5)  # every value is ±scale
        positive = (real > 0).float().mean().item()
        assert abs(positive - 0.5) < 5 * 0.5 / math.sqrt(real.numel())  # each sign with probability 1/2
        assert torch.count_nonzero(delta[i, n:]) == 0  # padding gets none


def test_antithetic_passes_see_noises_that_sum_to_zero():
    """The two passes of a batch: x + eps, then x - eps with the same eps; the next batch draws afresh."""
    model, (ids, mask) = tiny_llama(), padded_batch()
    with noise.attach(model, "symnoise", alpha=5.0, seed=4, antithetic=True) as hook:
        assert hook.passes == 2
        first = added_noise(model, ids, mask)
        hook.next_pass()
        second = added_noise(model, ids, mask)
        hook.reset()
        third = added_noise(model, ids, mask)
    assert torch.count_nonzero(first) > 0 and torch.allclose(first + second, torch.zeros_like(first), atol=1e-6)
    assert not torch.allclose(third, first) and not torch.allclose(third, -first)  # a new draw


def test_antithetic_noise_is_a_key_of_the_drawn_kinds_only():
    model = tiny_llama()
    with pytest.raises(ConfigError, match=r"^noise.antithetic is not a key of noise kind none: its keys are none$"):
        noise.attach(model, "none", antithetic=True)
    with pytest.raises(ConfigError, match=r"^noise.antithetic is not a key of noise kind noisytune: its keys are "
                                          r"noise.intensity$"):
        noise.attach(model, "noisytune", antithetic=True)
