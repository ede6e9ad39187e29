"""Exact sparsity, deterministic ties, scale beyond torch.quantile, bf16, masks that survive AdamW, schedules."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from neftlab.methods import pruning
from neftlab.methods.pruner import PruningCallback
from neftlab.config import PruningConfig


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.3, 0.5, 0.999])
def test_l1_zeroes_exactly_the_smallest_entries(ratio):
    torch.manual_seed(0)
    w = torch.randn(1000, 37)
    original = w.clone()
    mask = pruning.prune_(w, ratio, "l1")
    k = math.floor(ratio * w.numel())
    assert int((~mask).sum()) == k and int((w == 0).sum()) == k
    assert torch.equal(w[mask], original[mask])
    if 0 < k < w.numel():
        assert original[~mask].abs().max() <= original[mask].abs().min()


@pytest.mark.parametrize("chunk", [1 << 22, 7])
def test_l1_ties_at_the_threshold_go_by_index_across_chunks(monkeypatch, chunk):
    monkeypatch.setattr(pruning, "_CHUNK", chunk)
    w = torch.ones(10, 10)
    w[9] = 0.5  # 10 entries below the tie, then 25 of the 90 tied ones
    mask = pruning.prune_(w, 0.35, "l1")
    assert sorted((~mask).flatten().nonzero().flatten().tolist()) == list(range(25)) + list(range(90, 100))
    assert int((w == 0).sum()) == 35


def test_repruning_at_the_same_ratio_keeps_the_same_zeros():
    torch.manual_seed(0)
    w = torch.randn(300, 20)
    first = pruning.prune_(w, 0.4, "l1")
    assert torch.equal(pruning.prune_(w, 0.4, "l1"), first)


def test_l2_zeroes_whole_rows_with_the_smallest_norms():
    torch.manual_seed(0)
    w = torch.randn(1000, 16) * torch.rand(1000, 1)
    norms = w.norm(dim=1)
    mask = pruning.prune_(w, 0.3, "l2")
    pruned_rows = (~mask).all(dim=1)
    assert int(pruned_rows.sum()) == 300 and mask.shape == w.shape
    assert (w[pruned_rows] == 0).all() and (mask.all(dim=1) | pruned_rows).all()
    assert norms[pruned_rows].max() <= norms[~pruned_rows].min()


def test_beyond_torch_quantiles_limit():
    w = torch.randn(2 ** 24 + 1)
    with pytest.raises(RuntimeError, match="too large"):
        torch.quantile(w.abs(), 0.3)
    pruning.prune_(w, 0.3, "l1")
    assert int((w == 0).sum()) == math.floor(0.3 * w.numel())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_half_and_double_precision(dtype):
    torch.manual_seed(0)
    w = torch.randn(512, 64).to(dtype)
    original = w.clone()
    mask = pruning.prune_(w, 0.3, "l1")
    assert int((w == 0).sum()) == math.floor(0.3 * w.numel())
    assert original[~mask].abs().max() <= original[mask].abs().min()
    assert int((~pruning.prune_(w, 0.5, "l2")).all(dim=1).sum()) == 256


def test_global_threshold_over_several_tensors():
    small, large = torch.rand(100, 10) * 0.01, 1 + torch.rand(100, 10)
    pruning.prune_tensors_([small, large], 0.5, "l1")
    assert int((small == 0).sum()) == 1000 and int((large == 0).sum()) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="not a fraction"):
        pruning.prune_(torch.ones(3), 1.0)
    with pytest.raises(ValueError, match="unknown pruning kind 'l3'"):
        pruning.prune_(torch.ones(3), 0.5, "l3")


def test_gradual_schedule_is_zhu_and_gupta_cubic():
    cfg = PruningConfig(kind="l1", ratio=0.5, schedule="gradual", initial_ratio=0.1, ramp_steps=100)
    assert pruning.ratio_at(cfg, 0) == pytest.approx(0.1)
    assert pruning.ratio_at(cfg, 50) == pytest.approx(0.5 - 0.4 * 0.5 ** 3)
    assert pruning.ratio_at(cfg, 100) == pruning.ratio_at(cfg, 1000) == pytest.approx(0.5)
    assert pruning.ratio_at(PruningConfig(kind="l1", ratio=0.5), 0) == 0.5


def tiny_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True))


def train_steps(model, callback, steps):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    ids = torch.randint(0, 300, (4, 16))
    for step in range(1, steps + 1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
        if callback:
            callback.on_step_end(None, SimpleNamespace(global_step=step), None)


@pytest.mark.parametrize("method", ["l1", "l2"])
def test_masks_survive_adamw_with_weight_decay(method):
    model = tiny_llama()
    events = []
    callback = PruningCallback(model, PruningConfig(kind=method, ratio=0.4, interval=1000),
                                       lambda step, m: events.append(m))
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    zeros = model.get_input_embeddings().weight == 0
    train_steps(model, callback, 5)
    assert torch.equal(model.get_input_embeddings().weight == 0, zeros)
    assert events[0]["pruning/sparsity"] == pytest.approx(0.4, abs=1 / 300)
    assert events[0]["pruning/tied_output"] is True
    assert (method == "l2") == ("pruning/rows_pruned" in events[0])
    train_steps(model, None, 1)  # without the callback, AdamW's momentum revives them
    assert int((model.get_input_embeddings().weight == 0).sum()) < int(zeros.sum())


def test_reprunes_every_interval_with_the_scheduled_ratio():
    model = tiny_llama()
    events = []
    cfg = PruningConfig(kind="l1", ratio=0.6, interval=2, schedule="gradual", initial_ratio=0.2, ramp_steps=4)
    callback = PruningCallback(model, cfg, lambda step, m: events.append((step, m)))
    callback.on_train_begin(None, SimpleNamespace(global_step=0), None)
    train_steps(model, callback, 4)
    assert [step for step, _ in events] == [0, 2, 4]
    assert [round(m["pruning/ratio_target"], 4) for _, m in events] == [0.2, 0.55, 0.6]
    assert events[-1][1]["pruning/sparsity"] == pytest.approx(0.6, abs=1e-4)
    assert events[-1][1]["efficiency/param_reduction"] > 0


def test_all_linear_scope_leaves_embedding_and_head_alone():
    model = tiny_llama()
    weights = pruning.targets(model, "all_linear")
    assert model.get_input_embeddings().weight.data_ptr() not in {w.data_ptr() for w in weights}
    assert len(weights) == 7  # q, k, v, o, gate, up, down of the one layer


def test_dense_refill_for_latency_restores_the_exact_pruned_model():
    model = tiny_llama()
    pruner = PruningCallback(model, PruningConfig(kind="l1", ratio=0.5), lambda step, m: None)
    pruner.on_train_begin(None, SimpleNamespace(global_step=0), None)
    before = model.get_input_embeddings().weight.clone()
    with pruner.dense():
        assert int((model.get_input_embeddings().weight == 0).sum()) < int((before == 0).sum())
    assert torch.equal(model.get_input_embeddings().weight, before)
