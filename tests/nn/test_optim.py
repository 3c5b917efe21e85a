"""Optimisers against their textbook formulas; schedules; state round trips; settings checks."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from gradfleet.nn import SGD, Adam, AdamW, Optimizer, make_optimizer, make_schedule

GRADS = [np.array([0.5, -1.0, 2.0]), np.array([-1.0, 0.25, 0.5]), np.array([0.2, -0.4, -3.0])]
START = np.array([1.0, -2.0, 0.5])


def run(
    optimizer: Optimizer, grads: list[np.ndarray], start: np.ndarray = START
) -> list[np.ndarray]:
    """Apply one step per gradient to a copy of ``start``; return the parameter after each."""
    params = {"w": start.copy()}
    history = []
    for g in grads:
        optimizer.step(params, {"w": g})
        history.append(params["w"].copy())
    return history


def constant_grads(value: float, steps: int = 3) -> list[np.ndarray]:
    return [np.array([value])] * steps


# Hand-computed cases: one parameter starting at 1.0, three steps.


def test_plain_sgd_by_hand() -> None:
    # execute: p ← p − η g with η = 0.1, g = 1, 2, −1
    history = run(
        SGD(lr=0.1), [np.array([1.0]), np.array([2.0]), np.array([-1.0])], np.array([1.0])
    )

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.9, 0.7, 0.8], rtol=1e-15)


def test_sgd_momentum_by_hand() -> None:
    # execute: v ← 0.9 v + g; p ← p − 0.1 v with g = 1: v = 1, 1.9, 2.71
    history = run(SGD(lr=0.1, momentum=0.9), constant_grads(1.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.9, 0.71, 0.439], rtol=1e-14)


def test_sgd_nesterov_by_hand() -> None:
    # execute: v as above; p ← p − 0.1 (g + 0.9 v): steps 1.9, 2.71, 3.439
    history = run(SGD(lr=0.1, momentum=0.9, nesterov=True), constant_grads(1.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.81, 0.539, 0.1951], rtol=1e-14)


def test_sgd_weight_decay_by_hand() -> None:
    # execute: g = 0, so p ← p − 0.1 · 0.5 p = 0.95 p
    history = run(SGD(lr=0.1, weight_decay=0.5), constant_grads(0.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.95, 0.9025, 0.857375], rtol=1e-15)


def test_adam_by_hand() -> None:
    # execute: with a constant g the bias-corrected m̂ = g and v̂ = g², so each step is η
    history = run(Adam(lr=0.1, eps=0.0), constant_grads(4.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.9, 0.8, 0.7], rtol=1e-12)


def test_adamw_decoupled_decay_by_hand() -> None:
    # execute: p ← p − η λ p, then the Adam step η: p = 0.99 p − 0.1
    history = run(AdamW(lr=0.1, weight_decay=0.1, eps=0.0), constant_grads(1.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(np.concatenate(history), [0.89, 0.7811, 0.673289], rtol=1e-12)


def test_adam_weight_decay_is_l2_in_the_gradient_unlike_adamw() -> None:
    # execute: g = 0; Adam's first step sees the gradient λp, so m̂/√v̂ = 1 and p drops by η;
    # AdamW's moments stay 0 and it only decays: p = 0.99ᵗ
    coupled = run(Adam(lr=0.1, weight_decay=0.1, eps=0.0), constant_grads(0.0, 1), np.array([1.0]))
    decoupled = run(AdamW(lr=0.1, weight_decay=0.1), constant_grads(0.0), np.array([1.0]))

    # assert
    np.testing.assert_allclose(coupled[0], [0.9], rtol=1e-12)
    np.testing.assert_allclose(np.concatenate(decoupled), [0.99, 0.9801, 0.970299], rtol=1e-12)


# Textbook formulas, written out independently, on varied gradients.


def textbook_sgd(lr: float, momentum: float, nesterov: bool, decay: float) -> list[np.ndarray]:
    p, v, history = START.copy(), np.zeros_like(START), []
    for g in GRADS:
        d = g + decay * p
        v = momentum * v + d
        p = p - lr * ((d + momentum * v) if nesterov else v)
        history.append(p)
    return history


def textbook_adam(
    lr: float, b1: float, b2: float, eps: float, decay: float, decoupled: bool
) -> list[np.ndarray]:
    p, m, v, history = START.copy(), np.zeros_like(START), np.zeros_like(START), []
    for t, g in enumerate(GRADS, start=1):
        if not decoupled:
            g = g + decay * p
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g**2
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        if decoupled:
            p = p - lr * decay * p
        p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
        history.append(p)
    return history


@pytest.mark.parametrize(
    ("momentum", "nesterov", "decay"),
    [(0.0, False, 0.0), (0.9, False, 0.0), (0.8, True, 0.0), (0.5, False, 0.1), (0.7, True, 0.01)],
)
def test_sgd_matches_textbook_formula(momentum: float, nesterov: bool, decay: float) -> None:
    # execute
    history = run(SGD(lr=0.05, momentum=momentum, nesterov=nesterov, weight_decay=decay), GRADS)

    # assert
    expected = textbook_sgd(0.05, momentum, nesterov, decay)
    np.testing.assert_allclose(history, expected, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize(("cls", "decay"), [(Adam, 0.0), (Adam, 0.05), (AdamW, 0.05), (AdamW, 0.0)])
def test_adam_family_matches_textbook_formula(cls: type[Adam], decay: float) -> None:
    # execute
    history = run(cls(lr=0.01, betas=(0.8, 0.95), eps=1e-6, weight_decay=decay), GRADS)

    # assert
    expected = textbook_adam(0.01, 0.8, 0.95, 1e-6, decay, decoupled=cls is AdamW)
    np.testing.assert_allclose(history, expected, rtol=1e-13, atol=1e-15)


# Schedules.


def factors(config: dict, steps: int) -> list[float]:
    schedule = make_schedule(config)
    return [schedule.factor(step) for step in range(steps)]


def test_step_schedule_values() -> None:
    # execute
    values = factors({"name": "step", "step_size": 2, "gamma": 0.5}, 6)

    # assert
    assert values == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_cosine_schedule_with_warmup_values() -> None:
    # execute
    values = factors({"name": "cosine", "total_steps": 10, "warmup_steps": 2}, 13)

    # assert: warm-up 1/2, 2/2; then ½(1 + cos(π (t − 2)/8)), held at 0 after the end
    expected = [0.5, 1.0] + [0.5 * (1 + math.cos(math.pi * (t - 2) / 8)) for t in range(2, 11)]
    assert values == pytest.approx([*expected, 0.0, 0.0], abs=1e-15)
    assert values[6] == pytest.approx(0.5)


def test_cosine_schedule_decays_to_min_factor() -> None:
    # execute
    values = factors({"name": "cosine", "total_steps": 4, "min_factor": 0.1}, 6)

    # assert
    assert values[0] == 1.0
    assert values[2] == pytest.approx(0.1 + 0.9 * 0.5)
    assert values[4:] == pytest.approx([0.1, 0.1])


def test_linear_warmup_schedule_values() -> None:
    # execute
    values = factors({"name": "linear_warmup", "warmup_steps": 4}, 6)

    # assert
    assert values == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


def test_constant_schedule_is_the_default() -> None:
    # execute / assert
    assert factors(None, 3) == [1.0, 1.0, 1.0]


def test_optimizer_applies_its_schedule_to_the_learning_rate() -> None:
    # prepare
    optimizer = make_optimizer(
        {"name": "sgd", "lr": 1.0, "schedule": {"name": "step", "step_size": 2, "gamma": 0.5}}
    )

    # execute
    history = run(optimizer, constant_grads(1.0, steps=4), np.array([0.0]))

    # assert: steps of 1, 1, 0.5, 0.5
    np.testing.assert_allclose(np.concatenate(history), [-1.0, -2.0, -2.5, -3.0])


def test_schedule_config_round_trips() -> None:
    # prepare
    config = {"name": "cosine", "total_steps": 20, "warmup_steps": 3, "min_factor": 0.2}

    # execute
    rebuilt = make_schedule(make_schedule(config).config())

    # assert
    assert rebuilt.config() == config


@pytest.mark.parametrize(
    "config",
    [
        {"name": "exponential"},
        {"name": "step", "step_size": 0},
        {"name": "step", "step_size": 2, "gamma": float("nan")},
        {"name": "cosine", "total_steps": 5, "warmup_steps": 5},
        {"name": "cosine", "total_steps": 5, "min_factor": 2.0},
        {"name": "linear_warmup", "warmup_steps": 0},
        {"name": "linear_warmup", "warmup_steps": 3, "colour": 1},
    ],
)
def test_bad_schedule_settings_raise_value_error(config: dict) -> None:
    # execute / assert
    with pytest.raises(ValueError):
        make_schedule(config)


# State round trips.


@pytest.mark.parametrize(
    "config",
    [
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.01},
        {"name": "adam", "lr": 0.01, "schedule": {"name": "linear_warmup", "warmup_steps": 3}},
        {"name": "adamw", "lr": 0.01, "weight_decay": 0.1},
    ],
)
def test_state_dict_round_trip_gives_identical_continued_updates(config: dict) -> None:
    # prepare: run two steps, save the state through an .npz without pickle
    original = make_optimizer(config)
    params = {"w": START.copy(), "b": np.array([0.3])}
    for g in GRADS[:2]:
        original.step(params, {"w": g, "b": g[:1]})
    saved = io.BytesIO()
    np.savez(saved, **original.state_dict())
    saved.seek(0)
    with np.load(saved, allow_pickle=False) as archive:
        state = {name: archive[name] for name in archive.files}
    restored = make_optimizer(original.config())
    restored.load_state_dict(state)
    restored_params = {k: v.copy() for k, v in params.items()}

    # execute
    for g in GRADS:
        original.step(params, {"w": g, "b": g[:1]})
        restored.step(restored_params, {"w": g, "b": g[:1]})

    # assert
    assert restored.steps == original.steps == 5
    for name in params:
        np.testing.assert_array_equal(restored_params[name], params[name])


def test_state_dict_is_a_copy() -> None:
    # prepare
    optimizer = SGD(lr=0.1, momentum=0.9)
    run(optimizer, GRADS[:1])

    # execute
    for array in optimizer.state_dict().values():
        array[...] = 0

    # assert
    assert optimizer.steps == 1
    np.testing.assert_array_equal(optimizer.buffers["momentum/w"], GRADS[0])


def test_load_state_dict_without_steps_is_refused() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="'steps'"):
        SGD(lr=0.1).load_state_dict({})


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ({"steps": np.int64(9), "m/a": np.zeros(3)}, r"partial: it lacks \['m/b', 'v/a', 'v/b'\]"),
        ({"steps": np.int64(9), "m/a": np.zeros(3), "v/a": np.zeros((2, 3))}, "expected"),
        ({"steps": np.int64(9), "m/a": np.zeros(3, np.float32)}, "expected float64"),
    ],
)
def test_a_partial_or_misshapen_state_is_refused_against_the_parameters(
    state: dict, message: str
) -> None:
    # prepare
    params = {"a": np.ones(3), "b": np.ones(2)}
    optimizer = Adam(lr=0.1)
    # execute / assert: refused, and nothing changed
    with pytest.raises(ValueError, match=message):
        optimizer.load_state_dict(state, params)
    assert optimizer.steps == 0 and optimizer.buffers == {}


def test_config_round_trips_through_make_optimizer() -> None:
    # prepare
    original = AdamW(lr=0.003, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.02)

    # execute
    rebuilt = make_optimizer(original.config())

    # assert
    assert isinstance(rebuilt, AdamW)
    assert rebuilt.config() == original.config()


# Settings checks.


@pytest.mark.parametrize(
    ("config", "named"),
    [
        ({"name": "rmsprop", "lr": 0.1}, "unknown optimizer 'rmsprop'"),
        ({"lr": 0.1}, "unknown optimizer None"),
        ({"name": "sgd"}, "needs a learning rate"),
        ({"name": "sgd", "lr": float("nan")}, "finite number, got nan"),
        ({"name": "adam", "lr": float("inf")}, "finite number, got inf"),
        ({"name": "sgd", "lr": -0.1}, "got -0.1"),
        ({"name": "sgd", "lr": 0.0}, "positive, got 0.0"),
        ({"name": "sgd", "lr": "0.1"}, "finite number, got '0.1'"),
        ({"name": "sgd", "lr": 0.1, "momentun": 0.9}, "momentun"),
        (
            {"name": "sgd", "lr": 0.1, "momentum": 1.5},
            "momentum must be between 0.0 and 1.0, got 1.5",
        ),
        ({"name": "sgd", "lr": 0.1, "nesterov": True}, "nesterov needs a momentum"),
        ({"name": "adam", "lr": 0.1, "betas": [0.9]}, "betas must be two numbers"),
        ({"name": "adam", "lr": 0.1, "eps": float("nan")}, "eps must be a finite number"),
        ({"name": "adamw", "lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
    ],
)
def test_make_optimizer_rejects_bad_settings_naming_them(config: dict, named: str) -> None:
    # execute / assert
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(".", r"\.")):
        make_optimizer(config)


def test_make_optimizer_rejects_settings_that_are_not_a_dict() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="table/dict"):
        make_optimizer([("name", "sgd")])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "config",
    [
        {"name": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1},
        {"name": "adam", "lr": 0.1, "weight_decay": 0.1},
        {"name": "adamw", "lr": 0.1, "schedule": {"name": "cosine", "total_steps": 3}},
    ],
)
def test_float32_parameters_stay_float32(config: dict) -> None:
    # prepare
    optimizer = make_optimizer(config)
    params = {"w": START.astype(np.float32)}
    grads = [g.astype(np.float32) for g in GRADS]

    # execute
    for g in grads:
        optimizer.step(params, {"w": g})

    # assert
    assert params["w"].dtype == np.float32
    assert all(buffer.dtype == np.float32 for buffer in optimizer.buffers.values())


def test_step_updates_views_into_one_buffer_in_place() -> None:
    # prepare
    flat = np.ones(5)
    params = {"a": flat[:2], "b": flat[2:].reshape(3, 1)}

    # execute
    SGD(lr=0.5).step(params, {"a": np.ones(2), "b": np.full((3, 1), 2.0)})

    # assert
    np.testing.assert_array_equal(flat, [0.5, 0.5, 0.0, 0.0, 0.0])
