"""Losses, mean-reduced: L(w) = (1/ℓ) Σ L(f(x_i, w), y_i), each defined once.

A rule in ``LOSS_RULES`` maps plain arrays (outputs, targets) to (mean loss, d loss /
d outputs). The fused ``MLP.loss_and_grads``, the path training runs, calls it directly;
the graph functions below make it one node, for teaching, ``explain()`` and checking
(tests/nn gradcheck every rule through them and compare the two paths).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from gradfleet.nn.ops import stable_sigmoid
from gradfleet.nn.tensor import Tensor

Vjp = Callable[[np.ndarray], np.ndarray]


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


def cross_entropy_rule(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean of −log softmax(logits)[label] over rows, and its gradient (softmax − onehot)/rows."""
    if logits.ndim != 2:
        raise ValueError(
            f"cross_entropy expects logits of shape (batch, classes), got {logits.shape}"
        )
    rows = logits.shape[0]
    picks = (np.arange(rows), check_labels(labels, *logits.shape))
    shifted = logits - logits.max(axis=1, keepdims=True)  # ≤ 0, so exp never overflows
    picked = shifted[picks]
    grad = np.exp(shifted, out=shifted)
    sums = grad.sum(axis=1, keepdims=True)
    value = float(np.log(sums).sum() - picked.sum()) / rows if rows else float("nan")
    grad /= sums
    grad[picks] -= 1
    grad /= logits.dtype.type(rows)
    return value, grad


def mse_rule(predictions: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean over every element of (prediction − target)², and its gradient 2·difference/n."""
    check_targets(targets, predictions.shape)
    diff = predictions - targets
    return float(np.mean(diff * diff)), diff * diff.dtype.type(2.0 / max(diff.size, 1))


def binary_cross_entropy_rule(logits: np.ndarray, targets: np.ndarray) -> tuple[float, np.ndarray]:
    """Mean of max(z,0) − z·y + log(1 + e^−|z|), and its gradient (σ(z) − y)/n.

    The stable form of −[y log σ(z) + (1−y) log(1−σ(z))]: it never exponentiates a large z.
    """
    check_targets(targets, logits.shape)
    value = np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    grad = stable_sigmoid(logits) - targets
    grad /= logits.dtype.type(grad.size)
    return float(value.mean()), grad


LOSS_RULES = {
    "cross_entropy": cross_entropy_rule,
    "mse": mse_rule,
    "binary_cross_entropy": binary_cross_entropy_rule,
}
LOSSES = tuple(LOSS_RULES)


def _node(name: str, outputs: Tensor, targets: Tensor, target_grad: Vjp | None = None) -> Tensor:
    """A loss as one graph node. Targets are its second input if ``target_grad`` maps
    d/doutputs to d/dtargets (soft targets may be learnt); class labels are a constant."""
    mean, grad = LOSS_RULES[name](outputs.data, targets.data)
    data = np.asarray(mean, outputs.dtype)
    if target_grad is None:
        return Tensor._from_op(name, data, (outputs,), lambda g: (g * grad,))
    return Tensor._from_op(
        name, data, (outputs, targets), lambda g: (g * grad, g * target_grad(grad))
    )


def _tensor(value: Any, like: Tensor) -> Tensor:
    if isinstance(value, Tensor):
        return value
    return Tensor(np.asarray(value, dtype=like.dtype))


def mse_loss(predictions: Tensor, targets: Any) -> Tensor:
    """Mean over every element of (prediction − target)²."""
    return _node("mse", predictions, _tensor(targets, predictions), lambda grad: -grad)


def cross_entropy(logits: Tensor, labels: Any) -> Tensor:
    """Mean of −log softmax(logits)[label] over rows; logits (B, C), labels (B,) in 0..C−1."""
    return _node("cross_entropy", logits, labels if isinstance(labels, Tensor) else Tensor(labels))


def binary_cross_entropy_with_logits(logits: Tensor, targets: Any) -> Tensor:
    """Mean of max(z,0) − z·y + log(1 + e^−|z|); its derivative in y is −z/n."""
    targets = _tensor(targets, logits)
    return _node("binary_cross_entropy", logits, targets, lambda _: -logits.data / logits.size)
