"""noise.consistency against its formula written out on fixed logits, the clean pass's silence, the loss and the
gradients a training step gets (antithetic too), its weight under gradient accumulation, its search space, runs
at size=tiny, and its one-line refusals."""

import copy
import json
import math

import pytest
import torch

from neftlab.config import ConfigError
from neftlab.config.compose import check_command_line
from neftlab.methods.noise.consistency import per_token
from neftlab.methods.noise.uniform import Uniform
from tests.helpers import TINY, compose_cfg, run
from tests.methods.test_freelb import trainer_for
from tests.methods.test_noise import DIM, padded_batch, tiny_llama

WEIGHT = 0.7


def reference_term(clean, noisy, labels, mode):
    """The formula, token by token: the mean over the positions whose label counts (a causal LM's position t
    against label t + 1; a classifier's row) of KL(p_clean || p_noisy) = sum_v p_c (log p_c - log p_n), or for
    `symmetric` the mean of both directions."""
    if clean.dim() == 3:
        pairs = [(clean[b, t], noisy[b, t]) for b in range(clean.shape[0]) for t in range(clean.shape[1] - 1)
                 if labels[b, t + 1] != -100]
    else:
        pairs = [(clean[b], noisy[b]) for b in range(clean.shape[0]) if labels[b] != -100]
    total = 0.0
    for c, n in pairs:
        p, q = torch.softmax(c.double(), -1), torch.softmax(n.double(), -1)
        forward, backward = (p * (p.log() - q.log())).sum(), (q * (q.log() - p.log())).sum()
        total = total + (forward if mode == "kl" else (forward + backward) / 2)
    return total / len(pairs)


def causal_logits():
    torch.manual_seed(0)
    clean, noisy = torch.randn(2, 5, 7) * 2, torch.randn(2, 5, 7) * 2
    labels = torch.tensor([[3, 1, -100, 4, 2], [5, 6, 0, -100, -100]])  # a masked label and a padded tail
    clean[1, 3:], noisy[1, 3:] = float("nan"), float("inf")  # what pads' logits are must not count
    return clean, noisy, labels


@pytest.mark.parametrize("mode", ["kl", "symmetric"])
@pytest.mark.parametrize("shape", ["causal", "shift_labels", "classifier"])
def test_the_term_follows_its_formula_over_the_counted_tokens_only(mode, shape):
    clean, noisy, labels = causal_logits()
    inputs = {"labels": labels}
    if shape == "shift_labels":  # a padding-free collator's labels, already shifted
        inputs["shift_labels"] = torch.cat([labels[:, 1:], torch.full((2, 1), -100)], 1)
    if shape == "classifier":
        clean, noisy, labels = clean[:, 0], noisy[:, 0], torch.tensor([1, -100])
        clean[1] = float("nan")  # its label is -100
        inputs = {"labels": labels}
    values, mask = per_token(clean, noisy, inputs, mode)
    counted = [[True, False, True, True], [True, True, False, False]]
    counted = {"classifier": [True, False], "shift_labels": [row + [False] for row in counted]}.get(shape, counted)
    assert mask.tolist() == counted and torch.isfinite(values).all()
    term = float(values.sum() / mask.sum())
    assert term == pytest.approx(float(reference_term(clean, noisy, labels, mode)), rel=1e-5)
    other = "symmetric" if mode == "kl" else "kl"
    assert term != pytest.approx(float(reference_term(clean, noisy, labels, other)), rel=1e-3)  # it can tell


def batch(lengths=(12, 7, 3)):
    torch.manual_seed(5)
    ids, mask = padded_batch(list(lengths))
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("mode, antithetic", [("kl", False), ("symmetric", False), ("kl", True)])
def test_a_step_is_the_noisy_cross_entropy_plus_the_weighted_term_from_a_silent_clean_pass(tmp_path, mode,
                                                                                           antithetic):
    """The embeddings each forward saw: clean, then noisy (with antithetic: clean, +eps, clean, -eps); the noise
    drawn is the one the kind draws without the term (the clean pass draws nothing); the loss and the gradients
    are those of CE(noisy) + w * term written out, the clean logits a fixed target for `kl`, differentiated for
    `symmetric`, each antithetic pass with its own clean pass and half the loss."""
    model, inputs = tiny_llama(), batch()
    reference, plain = copy.deepcopy(model), copy.deepcopy(model)
    kind = Uniform.attach(model, seed=3, alpha=5.0, consistency=mode, consistency_weight=WEIGHT,
                          antithetic=antithetic)
    seen = []
    model.get_input_embeddings().register_forward_hook(lambda m, i, out: seen.append(out.detach()))
    loss = trainer_for(model, tmp_path, noise=kind).training_step(model, inputs)

    clean = torch.nn.functional.embedding(inputs["input_ids"], reference.get_input_embeddings().weight).detach()
    signs = (1, -1) if antithetic else (1,)
    assert len(seen) == 2 * len(signs) and all(torch.equal(s, clean) for s in seen[::2])
    eps = seen[1] - clean
    real = inputs["attention_mask"].bool()
    assert (eps[real] != 0).all() and (eps[~real] == 0).all()
    assert all(torch.allclose(s - clean, sign * eps, atol=1e-6) for s, sign in zip(seen[1::2], signs))
    plain_seen = []
    with Uniform.attach(plain, seed=3, alpha=5.0):  # the capture after the noise's hook, as above
        plain.get_input_embeddings().register_forward_hook(lambda m, i, out: plain_seen.append(out.detach()))
        plain.train()
        plain(**inputs)
    assert torch.equal(plain_seen[0] - clean, eps)

    reference.train()
    total, terms = 0.0, []
    for sign in signs:
        with torch.no_grad() if mode == "kl" else torch.enable_grad():
            target = reference(**inputs).logits
        out = reference(inputs_embeds=reference.get_input_embeddings()(inputs["input_ids"]) + sign * eps,
                        attention_mask=inputs["attention_mask"], labels=inputs["labels"])
        terms.append(reference_term(target, out.logits, inputs["labels"], mode))
        total = total + (out.loss + WEIGHT * terms[-1].float()) / len(signs)
    total.backward()
    assert float(loss) == pytest.approx(float(total.detach()), rel=1e-5)
    for (name, ours), theirs in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(ours.grad, theirs.grad, atol=1e-6), name
    assert kind.metrics()["noise/consistency"] == pytest.approx(float(sum(terms).detach()) / len(terms), rel=1e-4)
    assert "noise/consistency" not in kind.metrics()  # the mean since the last log, read once


class Served(Uniform):
    """Unit noise served row by row from one fixed table: a batch of 4 and its two micro-batches of 2 get the same
    noise, so their gradients can be compared exactly."""

    def sample(self, shape, generator, device):
        rows = self.table[self.at:self.at + shape[0]]
        self.at += shape[0]
        return rows


@pytest.mark.parametrize("mode", ["kl", "symmetric"])
def test_two_micro_batches_of_two_give_the_gradients_of_one_batch_of_four(tmp_path, mode):
    """The Trainer counts the step's label tokens (num_items_in_batch) and divides each micro-batch's summed
    cross-entropy by it; the term, through `reduce` (PassesTrainer.token_mean), must do the same. Micro-batches of
    12 and 22 counted tokens: a mean per micro-batch would weigh them unlike the cross-entropy."""
    inputs = batch((12, 2, 12, 12))
    items = (inputs["labels"][:, 1:] != -100).sum()
    grads = []
    for split in (1, 2):
        model = tiny_llama()
        kind = Served.attach(model, seed=0, alpha=5.0, consistency=mode, consistency_weight=WEIGHT)
        kind.table, kind.at = torch.rand(4, 12, DIM, generator=torch.Generator().manual_seed(1)) * 2 - 1, 0
        trainer = trainer_for(model, tmp_path, noise=kind)
        trainer.current_gradient_accumulation_steps = split
        for rows in torch.arange(4).chunk(split):
            trainer.training_step(model, {k: v[rows] for k, v in inputs.items()}, num_items_in_batch=items)
        grads.append([p.grad for p in model.parameters()])
    assert trainer.model_accepts_loss_kwargs  # the path where the Trainer weighs by num_items_in_batch
    for whole, accumulated in zip(*grads):
        assert torch.allclose(whole, accumulated, atol=1e-6)


def test_a_search_draws_the_weight_for_an_option_that_turns_the_term_on():
    import optuna
    from neftlab.config.spaces import noise_magnitude, searched_kinds
    assert "uniform_kl" in searched_kinds([]) and "uniform_10" not in searched_kinds([])
    for option, drawn in (("uniform_kl", ["noise", "noise.alpha", "noise.consistency_weight"]),
                          ("uniform", ["noise", "noise.alpha"])):
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
        trial.suggest_categorical("noise", [option])
        noise_magnitude(None, trial)
        assert sorted(trial.params) == drawn
    assert trial.distributions["noise.alpha"] == optuna.distributions.FloatDistribution(1.0, 20.0, log=True)
    trial = optuna.create_study().ask()
    trial.suggest_categorical("noise", ["uniform_kl"])
    noise_magnitude(None, trial)
    assert trial.distributions["noise.consistency_weight"] == optuna.distributions.FloatDistribution(0.1, 10.0,
                                                                                                     log=True)


@pytest.mark.parametrize("overrides, message", [
    (["noise=uniform", "noise.consistency=js"], "noise.consistency='js' is not allowed: one of none, kl, symmetric"),
    (["noise=gaussian", "noise.consistency_weight=0"], "noise.consistency_weight=0.0 is not allowed: > 0"),
    (["noise=uniform_kl", "noise.consistency_weight=-1"], "noise.consistency_weight=-1.0 is not allowed: > 0"),
])
def test_a_bad_value_is_refused_in_one_line(overrides, message):
    with pytest.raises(ConfigError) as raised:
        compose_cfg(*overrides)
    assert "\n" not in str(raised.value) and str(raised.value).endswith(message)


@pytest.mark.parametrize("kind", ["noisytune", "freelb"])
def test_a_kind_that_draws_no_noise_per_token_has_no_consistency_key(kind):
    message = check_command_line([f"noise={kind}", "noise.consistency=kl"])
    assert message.startswith(f"noise.consistency=kl: noise.consistency is not a key of noise kind {kind} "
                              f"(noise={kind}): its keys are ")


def run_events(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("model, mode", [("llama_tiny", "kl"), ("bert_tiny", "symmetric")])
def test_the_term_trains_at_size_tiny_and_logs_its_divergence(tmp_path, model, mode):
    """A causal LM's tokens, and a sequence classifier's one term per sequence."""
    outcome, summary = run(*TINY, f"model={model}", "logger=none", "noise=uniform", f"noise.consistency={mode}",
                           out_dir=tmp_path)
    assert summary["status"] == "completed", outcome.message
    values = [e["noise/consistency"] for e in run_events(tmp_path) if "noise/consistency" in e]
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_the_uniform_kl_arm_trains_in_the_overfit_study(tmp_path):
    outcome, summary = run("experiment=overfit", "size=tiny", "logger=none", "noise=uniform_kl", out_dir=tmp_path)
    assert summary["status"] == "completed", outcome.message
    assert (summary["noise/consistency"] > 0 and math.isfinite(summary["eval/loss"]))
