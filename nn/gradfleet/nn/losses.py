"""Losses on the graph, mean-reduced: L(w) = (1/ℓ) Σ L(f(x_i, w), y_i)."""

from __future__ import annotations

from typing import Any

import numpy as np

from gradfleet.nn import ops
from gradfleet.nn.tensor import Tensor

LOSSES = ("cross_entropy", "mse", "binary_cross_entropy")


def check_labels(labels: np.ndarray, rows: int, classes: int) -> np.ndarray:
    """Integer class labels of shape (rows,), each in 0..classes-1, or a ValueError."""
    labels = np.asarray(labels)
    if labels.shape != (rows,):
        raise ValueError(f"labels must have shape ({rows},), got {labels.shape}")
    if labels.dtype.kind not in "iu":
        if labels.dtype.kind != "f" or not np.all(np.mod(labels, 1) == 0):
            raise ValueError(f"labels must be integers 0..{classes - 1}, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if rows and (labels.min() < 0 or labels.max() >= classes):
        bad = labels[(labels < 0) | (labels >= classes)][0]
        raise ValueError(f"label {bad} is out of range: expected 0..{classes - 1}")
    return labels


def check_targets(targets: np.ndarray, shape: tuple[int, ...]) -> None:
    if targets.shape != shape:
        raise ValueError(f"targets must have the predictions' shape {shape}, got {targets.shape}")


def _tensor(value: Any, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return Tensor(np.asarray(value, dtype=like.dtype))


def mse_loss(predictions: Tensor, targets: Any) -> Tensor:
    """Mean over every element of (prediction − target)²."""
    targets = _tensor(targets, predictions)
    check_targets(targets.data, predictions.shape)
    diff = predictions - targets
    return ops.mean(diff * diff)


def cross_entropy(logits: Tensor, labels: Any) -> Tensor:
    """Mean of −log softmax(logits)[label] over rows; logits (B, C), labels (B,) in 0..C−1."""
    if logits.ndim != 2:
        raise ValueError(
            f"cross_entropy expects logits of shape (batch, classes), got {logits.shape}"
        )
    labels = check_labels(labels.data if isinstance(labels, Tensor) else labels, *logits.shape)
    picked = ops.log_softmax(logits, axis=1)[np.arange(len(labels)), labels]
    return -ops.mean(picked)


def binary_cross_entropy_with_logits(logits: Tensor, targets: Any) -> Tensor:
    """Mean of max(z,0) − z·y + log(1 + e^−|z|).

    The stable form of −[y log σ(z) + (1−y) log(1−σ(z))]: it never exponentiates a large z.
    """
    targets = _tensor(targets, logits)
    check_targets(targets.data, logits.shape)
    softplus_neg_abs = ops.log(1 + ops.exp(-ops.maximum(logits, -logits)))
    return ops.mean(ops.maximum(logits, 0.0) - logits * targets + softplus_neg_abs)
