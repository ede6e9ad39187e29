"""The measures computed here rather than by the Trainer: answers, accuracy, parameters, memory, convergence."""

import math

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from tests.helpers import compose_cfg
from neftlab import models
from neftlab.evaluation import measures
from neftlab.evaluation.noise_off import NoiseOffTrainLoss
from neftlab.models import parameter_counts


def test_measures_on_hand_made_answers():
    answers = [[5, 6, 7, 8, 5, 6, 7, 8], [1, 2, 3, 4, 5], [9, 9]]
    m = measures.answer_measures(answers, ["a b c", "d e", ""], ["max_new_tokens", "eos", "eos"])
    # The first answer repeats 3 of its 7 bigrams, 2 of its 6 trigrams, 1 of its 5 4-grams; [9, 9] has no 4-gram.
    assert m["eval/rep_2"] == pytest.approx((3 / 7 + 0) / 2)
    assert m["eval/rep_3"] == pytest.approx((1 / 3 + 0) / 2)
    assert m["eval/rep_4"] == pytest.approx((1 / 5 + 0) / 2)
    assert m["eval/diversity"] == pytest.approx(((1 - 3 / 7) * (1 - 1 / 3) * (1 - 1 / 5) + 1) / 2)
    assert m["eval/distinct_2"] == pytest.approx(9 / 12) and m["eval/distinct_4"] == pytest.approx(6 / 7)
    assert m["eval/response_length"] == 5 and m["eval/response_words"] == pytest.approx(5 / 3)
    assert m["eval/hit_max_new_tokens"] == pytest.approx(1 / 3)
    assert math.isnan(measures.answer_measures([[1, 2]], ["x"], ["eos"])["eval/diversity"])
    assert measures.distinct_n([[1]], 2) == 0.0


def test_next_token_accuracy_counts_response_tokens_only():
    labels = np.array([[-100, -100, 7, 8, -100]])
    preds = np.array([[0, 7, 0, 1, 1]])  # position t predicts token t+1: 7 right, 8 wrong
    assert measures.next_token_accuracy(EvalPrediction(preds, labels)) == {"accuracy": 0.5}


def test_classification_accuracy_and_macro_f1():
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1]])
    labels = np.array([0, 1, 0, 1])
    m = measures.classification_metrics(EvalPrediction(logits, labels))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_convergence_window_std_and_half_drop_step():
    losses = [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.1), (5, 2.0)]
    m = measures.convergence(losses, window=3)
    assert m["convergence/loss_std"] == pytest.approx(np.std([2.5, 2.1, 2.0], ddof=1))
    assert m["convergence/half_drop_step"] == 2  # half of the 2.0 drop is reached at 3.0
    assert "convergence/half_drop_step" not in measures.convergence([(1, 1.0), (2, 2.0)], 3)


def test_parameter_counts_count_tied_weights_once_and_zeros():
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = lin.weight
    with torch.no_grad():
        lin.weight[0] = 0
    m = parameter_counts(model)
    assert m == {"efficiency/total_params": 16, "efficiency/nonzero_params": 12, "efficiency/param_reduction": 0.25}


def test_noise_off_train_loss_is_the_loss_without_noise(tmp_path, llama_tokenizer):
    """The subset's loss is what the model gives with no noise hook at all, however large alpha is."""
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
    from neftlab import data
    from neftlab.methods import noise
    cfg = compose_cfg("model=llama_tiny", "data.max_samples=48", "data.eval_size=8", "data.max_length=64")
    prepared = data.prepare(cfg.data, llama_tokenizer, True, seed=0)
    model = models.load_model(cfg.model, llama_tokenizer)
    logged = []
    trainer = Trainer(model=model, args=TrainingArguments(str(tmp_path), use_cpu=True, report_to=[]),
                      data_collator=DataCollatorForSeq2Seq(llama_tokenizer, label_pad_token_id=-100),
                      train_dataset=prepared.train, eval_dataset=prepared.eval)
    callback = NoiseOffTrainLoss(trainer, 4, seed=0, log_event=lambda s, m: logged.append(m))
    trainer.add_callback(callback)
    trainer.evaluate()
    with noise.attach(model, "uniform", alpha=1e4):
        trainer.evaluate()
    expected = trainer.evaluate(callback.subset, metric_key_prefix="subset")["subset_loss"]  # no hook attached
    assert len(callback.subset) == 4
    assert [m["eval/train_loss_noise_off"] for m in logged[:2]] == pytest.approx([expected] * 2, rel=1e-6)
    assert logged[0]["eval/generalization_gap"] == pytest.approx(
        trainer.evaluate()["eval_loss"] - expected, rel=1e-6)


def test_peak_memory_is_the_process_own_not_its_launchers(tmp_path):
    """A job's efficiency/peak_memory_mb must not be its launcher's peak: ru_maxrss carries over fork and exec."""
    import resource
    import subprocess
    import sys
    ballast = bytearray(600 * 2**20)  # the launcher's peak, well above a bare child's
    ballast[::4096] = b"x" * len(ballast[::4096])
    code = ("import resource; from neftlab.evaluation.measures import peak_rss; "
            "print(peak_rss() / 2**20, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    own, inherited = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                               check=True).stdout.split())
    launcher = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    del ballast
    assert own < launcher - 300, (own, inherited, launcher)
