"""Training sanity: XOR and moons are learnt; deep sigmoid gradients vanish, ReLU's do not."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.datasets import make_moons

from gradfleet import nn
from gradfleet.nn import MLP, Adam, Optimizer

XOR_INPUTS = np.array([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
XOR_LABELS = np.array([0, 1, 1, 0])


def train_fused(
    model: MLP, optimizer: Optimizer, x: np.ndarray, y: np.ndarray, steps: int
) -> float:
    """Full-batch training on the fused path; returns the last loss."""
    params = model.unflatten(model.flat)
    grad_buffer = np.empty_like(model.flat)
    grads = model.unflatten(grad_buffer)
    loss = float("nan")
    for _ in range(steps):
        loss, _ = model.loss_and_grads(x, y, out=grad_buffer)
        optimizer.step(params, grads)
    return loss


def accuracy(model: MLP, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(model.predict(x) == y))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_mlp_learns_xor(activation: str, dtype: str) -> None:
    # prepare
    model = MLP([2, 16, 2], activation=activation, seed=0, dtype=dtype)

    # execute
    loss = train_fused(model, Adam(lr=0.05), XOR_INPUTS, XOR_LABELS, steps=300)

    # assert
    assert accuracy(model, XOR_INPUTS, XOR_LABELS) == 1.0
    assert loss < 0.05


def test_mlp_learns_xor_through_the_graph() -> None:
    # prepare
    model = MLP([2, 8, 2], activation="tanh", seed=0, dtype="float64")
    optimizer = Adam(lr=0.05)
    named = dict(model.named_parameters())

    # execute
    for _ in range(300):
        model.zero_grad()
        nn.cross_entropy(model(XOR_INPUTS), XOR_LABELS).backward()
        optimizer.step({k: p.data for k, p in named.items()}, {k: p.grad for k, p in named.items()})

    # assert
    assert accuracy(model, XOR_INPUTS, XOR_LABELS) == 1.0


def test_mlp_learns_two_moons_to_98_percent() -> None:
    # prepare
    x, y = make_moons(n_samples=400, noise=0.1, random_state=0)
    model = MLP([2, 32, 32, 2], activation="relu", seed=0, dtype="float32")

    # execute
    train_fused(model, Adam(lr=0.01), x.astype(np.float32), y, steps=400)

    # assert
    assert accuracy(model, x, y) >= 0.98


def weight_gradient_norms(activation: str) -> list[float]:
    """Per-layer weight-gradient norms of a 10-layer net (32 wide) at initialisation."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((64, 32)), rng.integers(0, 4, 64)
    model = MLP([32] * 10 + [4], activation=activation, seed=0, dtype="float64")
    _, grads = model.loss_and_grads(x, y)
    views = model.unflatten(grads)
    return [float(np.linalg.norm(views[f"layers.{2 * i}.weight"])) for i in range(10)]


def test_deep_sigmoid_net_has_vanishing_gradients_and_relu_does_not() -> None:
    # execute
    sigmoid = weight_gradient_norms("sigmoid")
    relu = weight_gradient_norms("relu")

    # assert: σ' ≤ 1/4 shrinks the gradient at every layer on its way back
    assert sigmoid[-1] / sigmoid[0] >= 100
    assert all(earlier < later for earlier, later in itertools.pairwise(sigmoid))
    assert relu[-1] / relu[0] < 10
    assert relu[0] / sigmoid[0] >= 100
