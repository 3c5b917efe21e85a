"""What a training run returns, and the held-out evaluation every backend shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradfleet.nn import MLP
from gradfleet.nn.losses import LOSS_RULES


@dataclass
class TrainResult:
    """The trained model and how it got there.

    ``history`` holds one entry per step (step, loss, rows, samples_per_s, wall_time) and
    ``evaluations`` one per held-out evaluation (step, val_loss, val_accuracy);
    ``membership`` every change of an elastic job's workers (version, old, new, reason,
    mid_step), which ``train(job, backend="local", membership=...)`` replays.
    """

    model: MLP
    history: list[dict[str, float]] = field(default_factory=list)
    evaluations: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0
    backend: str = "local"
    job_id: str = ""
    server_address: str = ""
    membership: list[dict[str, Any]] = field(default_factory=list)

    @property
    def weights(self) -> dict[str, np.ndarray]:
        return self.model.state_dict()

    @property
    def losses(self) -> list[float]:
        return [entry["loss"] for entry in self.history]


def evaluate(
    model: MLP, x: np.ndarray | None, y: np.ndarray | None, loss: str, batch: int = 4096
) -> dict[str, float]:
    """Mean loss (and accuracy for classification) of ``model`` on held-out rows (raw: the
    model applies its own preprocessing)."""
    if x is None or y is None or len(x) == 0:
        return {}
    if loss not in LOSS_RULES:
        raise ValueError(f"unknown loss {loss!r}: choose one of {tuple(LOSS_RULES)}")
    total_loss, correct = 0.0, 0
    for start in range(0, len(x), batch):
        xb, yb = x[start : start + batch], y[start : start + batch]
        logits, target = model.logits(xb), yb
        if loss != "cross_entropy":  # float targets, (B, 1) for one output, as in training
            target = np.asarray(yb, dtype=logits.dtype)
            target = target[:, None] if target.ndim == 1 and logits.shape[1] == 1 else target
        value, _ = LOSS_RULES[loss](logits, target)  # the training loss's own rule
        total_loss += value * len(xb)
        if loss == "cross_entropy":
            correct += int((logits.argmax(axis=1) == yb).sum())
        elif loss == "binary_cross_entropy":
            correct += int(((logits > 0) == (target > 0.5)).all(axis=1).sum())
    metrics = {"val_loss": total_loss / len(x)}
    if loss != "mse":
        metrics["val_accuracy"] = correct / len(x)
    return metrics


def held_out_metrics(evaluations: list[dict[str, float]]) -> dict[str, float]:
    """The latest evaluation's ``val_*`` numbers, to show beside the current step (its own
    ``step`` and ``wall_time`` would hide the current ones)."""
    latest = evaluations[-1] if evaluations else {}
    return {k: v for k, v in latest.items() if k.startswith("val_")}
