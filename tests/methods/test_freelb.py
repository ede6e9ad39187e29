"""FreeLB against its authors' algorithm written out on fixed tensors, K = 1 against NEFTune's noise, and runs
with gradient accumulation and LoRA."""

import copy
import math

import pytest
import torch
from transformers import Trainer, TrainingArguments

from neftlab.methods import noise
from neftlab.methods.noise.freelb import FreeLB
from neftlab.methods.passes import PassesTrainer
from tests.helpers import TINY, run
from tests.methods.test_noise import DIM, padded_batch, tiny_llama

LENGTHS = [12, 7, 3]


def batch():
    torch.manual_seed(5)
    ids, mask = padded_batch(LENGTHS)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def trainer_for(model, tmp_path, cls=PassesTrainer, **kwargs):
    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, report_to=[], per_device_train_batch_size=3)
    trainer = cls(model=model, args=args, **kwargs)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def reference_freelb(model, inputs, seed, steps, lr, init_mag, max_norm):
    """FreeLB as its authors' Hugging Face code runs it (zhuchen03/FreeLB, huggingface/): delta_0 uniform, masked,
    scaled by init_mag / sqrt(L_i * d); K passes, each loss / K backpropagated; between passes delta += lr * g /
    ||g|| per example, then rescaled to max_norm where it exceeds it. Returns delta_{K-1}."""
    mask, embedding = inputs["attention_mask"], model.get_input_embeddings()
    generator = torch.Generator().manual_seed(seed)
    shape = (*inputs["input_ids"].shape, DIM)
    magnitude = init_mag / torch.sqrt(mask.sum(1).float() * DIM)
    delta = torch.empty(shape).uniform_(-1, 1, generator=generator) * magnitude.view(-1, 1, 1) * mask[:, :, None]
    model.train()
    for k in range(steps):
        delta.requires_grad_()
        loss = model(inputs_embeds=embedding(inputs["input_ids"]) + delta, attention_mask=mask,
                     labels=inputs["labels"]).loss
        (loss / steps).backward()
        if k == steps - 1:
            return delta.detach()
        grad = delta.grad.detach()
        denorm = torch.norm(grad.view(grad.size(0), -1), dim=1).view(-1, 1, 1).clamp(min=1e-8)
        delta = (delta + lr * grad / denorm).detach()
        if max_norm > 0:
            norm = torch.norm(delta.view(delta.size(0), -1), p=2, dim=1)
            exceed = (norm > max_norm).float()
            delta = (delta * (max_norm / norm * exceed + (1 - exceed)).view(-1, 1, 1)).detach()


@pytest.mark.parametrize("steps, max_norm", [(3, 0.0), (3, 1.0), (2, 0.5)])
def test_freelb_follows_its_authors_algorithm(tmp_path, steps, max_norm):
    model = tiny_llama()
    reference = copy.deepcopy(model)
    inputs = batch()
    expected_delta = reference_freelb(reference, inputs, seed=11, steps=steps, lr=0.3, init_mag=5.0, max_norm=max_norm)
    trainer = trainer_for(model, tmp_path, noise=FreeLB.attach(model, adv_init_mag=5.0, seed=11, adv_steps=steps,
                                                                adv_lr=0.3, adv_max_norm=max_norm))
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    loss = trainer.training_step(model, inputs)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6), name
    assert len(seen) == steps  # one forward per pass
    clean = torch.nn.functional.embedding(inputs["input_ids"], model.get_input_embeddings().weight).detach()
    assert torch.allclose(seen[steps - 1] - clean, expected_delta, atol=1e-6)  # the last pass saw delta_{K-1}
    if max_norm > 0:
        assert torch.linalg.vector_norm(expected_delta.reshape(3, -1), dim=1).max() <= max_norm * (1 + 1e-5)
    assert trainer.noise.delta is None and math.isfinite(float(loss))  # reset for the next batch


def test_one_step_is_neftunes_uniform_noise(tmp_path):
    model, inputs = tiny_llama(), batch()
    other = copy.deepcopy(model)
    trainer = trainer_for(model, tmp_path, noise=FreeLB.attach(model, adv_init_mag=5.0, seed=3, adv_steps=1))
    trainer.training_step(model, inputs)
    plain = trainer_for(other, tmp_path, cls=Trainer)
    with noise.attach(other, "uniform", alpha=5.0, seed=3):
        plain.training_step(other, inputs)
    for ours, theirs in zip(model.parameters(), other.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-7)


@pytest.mark.parametrize("extra", [["+trainer.args.gradient_accumulation_steps=2"], ["model.lora.enabled=true"]],
                         ids=["accumulation", "lora"])
def test_a_freelb_run_trains_and_logs(tmp_path, extra):
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", "noise=freelb", "noise.adv_steps=3", *extra,
                           out_dir=tmp_path)
    assert summary["status"] == "completed", outcome.message
    assert math.isfinite(summary["train/loss"]) and summary["noise/alpha"] == 5.0


def test_antithetic_gradients_are_the_mean_of_x_plus_and_x_minus_eps(tmp_path):
    """The two passes of PassesTrainer against the two losses written out, with the eps the hook drew."""
    model, inputs = tiny_llama(), batch()
    reference = copy.deepcopy(model)
    hook = noise.attach(model, "symnoise", alpha=5.0, seed=8, antithetic=True)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    trainer = trainer_for(model, tmp_path, noise=hook)
    loss = trainer.training_step(model, inputs)
    clean = torch.nn.functional.embedding(inputs["input_ids"], reference.get_input_embeddings().weight).detach()
    eps = seen[0] - clean
    assert len(seen) == 2 and torch.allclose(seen[1] - clean, -eps, atol=1e-6)
    reference.train()
    losses = [reference(inputs_embeds=reference.get_input_embeddings()(inputs["input_ids"]) + sign * eps,
                        attention_mask=inputs["attention_mask"], labels=inputs["labels"]).loss for sign in (1, -1)]
    ((losses[0] + losses[1]) / 2).backward()
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6), name
    assert float(loss) == pytest.approx(float(sum(losses) / 2), rel=1e-5)


@pytest.mark.parametrize("antithetic", ["false", "true"])
def test_symnoise_trains_at_size_tiny(tmp_path, antithetic):
    outcome, summary = run(*TINY, "model=llama_tiny", "logger=none", "noise=symnoise", f"noise.antithetic={antithetic}",
                           out_dir=tmp_path)
    assert summary["status"] == "completed", outcome.message
    assert math.isfinite(summary["train/loss"]) and summary["noise/alpha"] == 5.0
