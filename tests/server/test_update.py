"""The server's one-pass optimiser gives local mode's per-parameter numbers, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from gradfleet.nn.mlp import MLP
from gradfleet.nn.optim import OPTIMIZERS, make_optimizer
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.update import WholeBufferOptimizer

CONFIGS = [
    {"name": "sgd", "lr": 0.1},
    {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 1e-3},
    {"name": "sgd", "lr": 0.05, "momentum": 0.8, "nesterov": True},
    {"name": "sgd", "lr": 0.1, "schedule": {"name": "cosine", "total_steps": 5}},
    {"name": "adam", "lr": 1e-2, "weight_decay": 1e-3},
    {"name": "adamw", "lr": 1e-2, "weight_decay": 0.05},
]


def model(dtype: str) -> tuple[FlatLayout, np.ndarray]:
    # 800x700 is above the block size of Optimizer._subtract_scaled: both paths block
    mlp = MLP([800, 700, 7], dtype=dtype, seed=3)
    return FlatLayout.from_arrays(mlp.unflatten(mlp.flat)), mlp.flat.copy()


def gradients(layout: FlatLayout, steps: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(layout.total_elements).astype(layout.dtype) for _ in range(steps)]


def test_every_optimizer_is_covered() -> None:
    assert {c["name"] for c in CONFIGS} == set(OPTIMIZERS)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(sorted(c.items())))
def test_one_pass_equals_per_parameter_steps_and_state(config: dict, dtype: str) -> None:
    layout, weights = model(dtype)
    per_parameter, per_parameter_weights = make_optimizer(config), weights.copy()
    whole = WholeBufferOptimizer(make_optimizer(config), layout)

    for grad in gradients(layout, 4):
        per_parameter.step(layout.views(per_parameter_weights), layout.views(grad))
        whole.step(weights, grad)

    np.testing.assert_array_equal(weights, per_parameter_weights)
    expected, got = per_parameter.state_dict(), whole.state_dict()
    assert got.keys() == expected.keys()
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


@pytest.mark.parametrize("config", CONFIGS[1:], ids=lambda c: c["name"])
def test_resumed_from_per_parameter_state_continues_identically(config: dict) -> None:
    layout, weights = model("float32")
    grads = gradients(layout, 6)
    per_parameter, per_parameter_weights = make_optimizer(config), weights.copy()
    for grad in grads[:3]:
        per_parameter.step(layout.views(per_parameter_weights), layout.views(grad))

    resumed_weights = per_parameter_weights.copy()
    resumed = WholeBufferOptimizer(make_optimizer(config), layout)
    resumed.load_state_dict(per_parameter.state_dict(), resumed_weights)
    for grad in grads[3:]:
        per_parameter.step(layout.views(per_parameter_weights), layout.views(grad))
        resumed.step(resumed_weights, grad)

    np.testing.assert_array_equal(resumed_weights, per_parameter_weights)


def test_invalid_state_is_refused_and_changes_nothing() -> None:
    layout, weights = model("float64")
    whole = WholeBufferOptimizer(make_optimizer(CONFIGS[1]), layout)
    whole.step(weights, gradients(layout, 1)[0])
    before = whole.state_dict()
    partial = {
        "steps": np.asarray(5),
        "momentum/layers.0.weight": before["momentum/layers.0.weight"] + 1,
    }

    with pytest.raises(ValueError, match="partial"):
        whole.load_state_dict(partial, weights)

    after = whole.state_dict()
    assert after.keys() == before.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
