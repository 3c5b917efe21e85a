"""Held-out scores: `evaluate` gives each loss's mean over every row, batch by batch."""

from __future__ import annotations

import numpy as np
import pytest

from gradfleet.nn import MLP
from gradfleet.worker.result import evaluate

ROWS = 23  # not a multiple of the batch below: the last batch is short


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_cross_entropy_scores_are_the_mean_negative_log_likelihood(dtype: str) -> None:
    rng = np.random.default_rng(0)
    model = MLP([5, 8, 3], seed=1, dtype=dtype)
    x, y = rng.normal(size=(ROWS, 5)), rng.integers(0, 3, size=ROWS)

    scores = evaluate(model, x, y, "cross_entropy", batch=7)

    logits = model.logits(x).astype(np.float64)
    log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    expected_loss = -log_probs[np.arange(ROWS), y].mean()
    assert scores["val_loss"] == pytest.approx(expected_loss, rel=1e-6)
    assert scores["val_accuracy"] == np.mean(logits.argmax(axis=1) == y)


@pytest.mark.parametrize("loss", ["mse", "binary_cross_entropy"])
def test_other_losses_score_the_mean_over_rows(loss: str) -> None:
    rng = np.random.default_rng(2)
    model = MLP([4, 6, 1], seed=3, dtype="float64")
    x = rng.normal(size=(ROWS, 4))
    y = rng.integers(0, 2, size=ROWS).astype(np.float64)

    scores = evaluate(model, x, y, loss, batch=7)

    z = model.logits(x)[:, 0]
    if loss == "mse":
        assert scores == {"val_loss": pytest.approx(np.mean((z - y) ** 2))}
    else:
        expected = np.mean(np.logaddexp(0.0, z) - z * y)
        assert scores["val_loss"] == pytest.approx(expected)
        assert scores["val_accuracy"] == np.mean((z > 0) == (y > 0.5))


def test_labels_outside_the_classes_are_refused() -> None:
    model = MLP([2, 3], seed=0)
    with pytest.raises(ValueError, match="label"):
        evaluate(model, np.zeros((2, 2)), np.array([0, 3]), "cross_entropy")


def test_an_unknown_loss_is_refused_by_name() -> None:
    model = MLP([2, 1], seed=0)
    with pytest.raises(ValueError, match="unknown loss 'hinge'"):
        evaluate(model, np.zeros((2, 2)), np.zeros(2), "hinge")
