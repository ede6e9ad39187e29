"""The metrics that are computed here rather than by the Trainer."""

import numpy as np
import pytest
import torch
from transformers import EvalPrediction

from neftlab import evaluation


def test_distinct_n_and_repetition_rate():
    assert evaluation.distinct_n([[1, 2, 3], [1, 2, 4]], 2) == pytest.approx(3 / 4)
    assert evaluation.distinct_n([[1]], 2) == 0.0
    assert evaluation.repetition_rate([5, 6, 7, 8, 5, 6, 7, 8]) == pytest.approx(1 / 5)
    assert evaluation.repetition_rate([1, 2, 3, 4, 5]) == 0.0


def test_next_token_accuracy_counts_response_tokens_only():
    labels = np.array([[-100, -100, 7, 8, -100]])
    preds = np.array([[0, 7, 0, 1, 1]])  # position t predicts token t+1: 7 right, 8 wrong
    assert evaluation.next_token_accuracy(EvalPrediction(preds, labels)) == {"accuracy": 0.5}


def test_classification_accuracy_and_macro_f1():
    logits = np.array([[1, 0], [0, 1], [0, 1], [0, 1]])
    labels = np.array([0, 1, 0, 1])
    m = evaluation.classification_metrics(EvalPrediction(logits, labels))
    assert m["accuracy"] == 0.75
    assert m["macro_f1"] == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_stability_window_std_and_half_drop_step():
    losses = [(1, 4.0), (2, 3.0), (3, 2.5), (4, 2.1), (5, 2.0)]
    m = evaluation.stability(losses, window=3)
    assert m["stability/loss_std"] == pytest.approx(np.std([2.5, 2.1, 2.0], ddof=1))
    assert m["stability/half_drop_step"] == 2  # half of the 2.0 drop is reached at 3.0
    assert "stability/half_drop_step" not in evaluation.stability([(1, 1.0), (2, 2.0)], 3)


def test_parameter_counts_count_tied_weights_once_and_zeros():
    lin = torch.nn.Linear(4, 4, bias=False)
    model = torch.nn.Sequential(lin, torch.nn.Linear(4, 4, bias=False))
    model[1].weight = lin.weight
    with torch.no_grad():
        lin.weight[0] = 0
    m = evaluation.parameter_counts(model)
    assert m == {"efficiency/total_params": 16, "efficiency/nonzero_params": 12, "efficiency/param_reduction": 0.25}
