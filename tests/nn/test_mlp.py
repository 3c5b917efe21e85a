"""MLP: the fused loss_and_grads against the graph, spec and state round trips, init, layout."""

from __future__ import annotations

import json

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.nn import MLP, Tensor, no_grad
from gradfleet.nn.mlp import ACTIVATIONS

LOSSES = ["cross_entropy", "mse", "binary_cross_entropy"]
SIZES = [6, 8, 7, 3]


def batch(loss: str, rows: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Inputs of width SIZES[0] and targets of the kind ``loss`` expects."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, SIZES[0]))
    if loss == "cross_entropy":
        return x, rng.integers(0, SIZES[-1], rows)
    if loss == "mse":
        return x, rng.standard_normal((rows, SIZES[-1]))
    return x, rng.uniform(0.0, 1.0, (rows, SIZES[-1]))


def graph_loss_and_grads(
    model: MLP, x: np.ndarray, y: np.ndarray, loss: str
) -> tuple[float, np.ndarray]:
    """The reference: model(x), the loss on the graph, backward; gradients laid out like flat."""
    model.zero_grad()
    outputs = model(Tensor(x.astype(model.dtype)))
    value = {
        "cross_entropy": nn.cross_entropy,
        "mse": nn.mse_loss,
        "binary_cross_entropy": nn.binary_cross_entropy_with_logits,
    }[loss](outputs, y)
    value.backward()
    grads = np.concatenate([p.grad.ravel() for p in model.parameters()])
    return value.item(), grads


def max_relative_difference(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_step_equals_graph_in_float64(activation: str, loss: str) -> None:
    # prepare
    model = MLP(SIZES, activation=activation, seed=3, dtype="float64")
    x, y = batch(loss)
    expected_loss, expected_grads = graph_loss_and_grads(model, x, y, loss)

    # execute
    value, grads = model.loss_and_grads(x, y, loss=loss)

    # assert
    assert grads.dtype == np.float64
    assert grads.shape == model.flat.shape
    assert value == pytest.approx(expected_loss, rel=1e-12)
    assert max_relative_difference(grads, expected_grads) <= 1e-12


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_fused_step_equals_graph_in_float32(activation: str, loss: str) -> None:
    # prepare
    model = MLP(SIZES, activation=activation, seed=4, dtype="float32")
    x, y = batch(loss, rows=16, seed=1)
    x = x.astype(np.float32)
    expected_loss, expected_grads = graph_loss_and_grads(model, x, y, loss)

    # execute
    value, grads = model.loss_and_grads(x, y, loss=loss)

    # assert
    assert expected_grads.dtype == np.float32
    assert grads.dtype == np.float32
    assert value == pytest.approx(expected_loss, rel=1e-5)
    assert max_relative_difference(grads, expected_grads) <= 1e-5


def test_fused_step_with_leaky_relu_alpha_equals_graph() -> None:
    # prepare
    model = MLP(SIZES, activation="leaky_relu", alpha=0.3, seed=5, dtype="float64")
    x, y = batch("cross_entropy")
    _, expected = graph_loss_and_grads(model, x, y, "cross_entropy")

    # execute
    _, grads = model.loss_and_grads(x, y)

    # assert
    assert max_relative_difference(grads, expected) <= 1e-12


@pytest.mark.parametrize(("activation", "slope_at_zero"), [("relu", 0.0), ("leaky_relu", 0.3)])
def test_both_paths_take_the_slope_at_zero_from_below(
    activation: str, slope_at_zero: float
) -> None:
    # prepare: every weight and bias 1 and the input −1 put both hidden units at exactly 0
    model = MLP([1, 2, 1], activation=activation, alpha=0.3, dtype="float64")
    model.flat[:] = 1.0
    x, y = np.array([[-1.0]]), np.array([[0.0]])

    # execute
    _, fused = model.loss_and_grads(x, y, loss="mse")
    _, graph = graph_loss_and_grads(model, x, y, "mse")

    # assert: d loss/d output is 2·(1 − 0) and reaches each unit through a weight of 1
    expected = 2.0 * slope_at_zero
    np.testing.assert_array_equal(model.unflatten(fused)["layers.0.bias"], [expected] * 2)
    np.testing.assert_array_equal(model.unflatten(graph)["layers.0.bias"], [expected] * 2)


def test_fused_mse_accepts_one_dimensional_targets_for_one_output() -> None:
    # prepare
    model = MLP([3, 4, 1], activation="tanh", dtype="float64")
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((6, 3)), rng.standard_normal(6)
    _, expected = graph_loss_and_grads(model, x, y[:, None], "mse")

    # execute
    _, grads = model.loss_and_grads(x, y, loss="mse")

    # assert
    assert max_relative_difference(grads, expected) <= 1e-12


def test_fused_step_writes_into_the_given_buffer_and_leaves_inputs_alone() -> None:
    # prepare
    model = MLP(SIZES, seed=1, dtype="float32")
    x, y = batch("cross_entropy")
    x = x.astype(np.float32)
    x_before = x.copy()
    buffer = np.full_like(model.flat, np.nan)

    # execute
    _, grads = model.loss_and_grads(x, y, out=buffer)

    # assert
    assert grads is buffer
    assert np.all(np.isfinite(buffer))
    np.testing.assert_array_equal(x, x_before)


def test_fused_step_casts_float64_inputs_to_a_float32_model() -> None:
    # prepare
    model = MLP(SIZES, dtype="float32")
    x, y = batch("cross_entropy")

    # execute
    _, grads = model.loss_and_grads(x, y)

    # assert
    assert grads.dtype == np.float32


def test_logits_equal_the_graph_forward() -> None:
    # prepare
    model = MLP(SIZES, activation="gelu", dtype="float64")
    x, _ = batch("mse")

    # execute
    predicted = model.logits(x)
    with no_grad():
        expected = model(x)

    # assert
    assert not expected.requires_grad
    np.testing.assert_allclose(predicted, expected.data, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_spec_round_trips_through_json_and_rebuilds_identical_weights(
    activation: str, dtype: str
) -> None:
    # prepare
    model = MLP([5, 4, 3], activation=activation, seed=11, dtype=dtype, alpha=0.2)

    # execute
    rebuilt = MLP.from_spec(json.loads(json.dumps(model.spec())))

    # assert
    assert rebuilt.spec() == model.spec()
    assert rebuilt.flat.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(rebuilt.flat, model.flat)
    if activation == "leaky_relu":
        assert rebuilt.alpha == 0.2


def test_different_seeds_give_different_weights() -> None:
    # execute
    a, b = MLP([5, 4, 3], seed=1), MLP([5, 4, 3], seed=2)

    # assert
    assert not np.array_equal(a.flat, b.flat)


@pytest.mark.parametrize(
    ("spec", "named"),
    [
        ({"type": "MLP", "sizes": [2, 3], "colour": "red"}, "colour"),
        ({"type": "CNN", "sizes": [2, 3]}, "type 'MLP'"),
        ({"type": "MLP"}, "sizes"),
        ({"type": "MLP", "sizes": [2, 3], "activation": "swish"}, "swish"),
        ({"type": "MLP", "sizes": [2, 3], "dtype": "float16"}, "float16"),
        ({"type": "MLP", "sizes": [2]}, "at least"),
    ],
)
def test_from_spec_rejects_bad_specs_naming_the_problem(spec: dict, named: str) -> None:
    # execute / assert
    with pytest.raises(ValueError, match=named):
        MLP.from_spec(spec)


def test_state_dict_round_trip_copies_weights_into_place() -> None:
    # prepare
    source = MLP([4, 5, 3], seed=1, dtype="float64")
    source.flat[:] = np.random.default_rng(0).standard_normal(source.flat.size)
    target = MLP([4, 5, 3], seed=2, dtype="float64")
    flat_before = target.flat

    # execute
    target.load_state_dict(source.state_dict())

    # assert: same values, and the parameters are still views of the same buffer
    assert target.flat is flat_before
    np.testing.assert_array_equal(target.flat, source.flat)
    for p in target.parameters():
        assert np.shares_memory(p.data, target.flat)


def test_state_dict_is_a_copy() -> None:
    # prepare
    model = MLP([4, 5, 3])
    before = model.flat.copy()

    # execute
    for array in model.state_dict().values():
        array[...] = 7

    # assert
    np.testing.assert_array_equal(model.flat, before)


def test_state_dict_names_follow_the_layers() -> None:
    # execute
    names = list(MLP([4, 5, 3]).state_dict())

    # assert
    assert names == ["layers.0.weight", "layers.0.bias", "layers.2.weight", "layers.2.bias"]


def corrupt(state: dict[str, np.ndarray], how: str) -> dict[str, np.ndarray]:
    state = dict(state)
    if how == "shape":
        state["layers.2.weight"] = np.zeros((3, 4), dtype=np.float32)
    elif how == "dtype":
        state["layers.2.bias"] = state["layers.2.bias"].astype(np.float64)
    elif how == "missing":
        del state["layers.2.bias"]
    elif how == "unexpected":
        state["layers.4.weight"] = np.zeros(3, dtype=np.float32)
    elif how == "nan":
        state["layers.2.bias"] = np.full(3, np.nan, dtype=np.float32)
    return state


@pytest.mark.parametrize(
    ("how", "named"),
    [
        ("shape", r"'layers\.2\.weight': expected shape \(3, 5\), got \(3, 4\)"),
        ("dtype", r"'layers\.2\.bias': expected dtype float32, got float64"),
        ("missing", r"missing \['layers\.2\.bias'\]"),
        ("unexpected", r"unexpected \['layers\.4\.weight'\]"),
        ("nan", r"'layers\.2\.bias': contains NaN"),
    ],
)
def test_load_state_dict_rejects_a_mismatch_and_changes_nothing(how: str, named: str) -> None:
    # prepare: every other entry is valid and differs from the model's weights
    model = MLP([4, 5, 3], seed=1)
    state = {k: v + 1 for k, v in MLP([4, 5, 3], seed=2).state_dict().items()}
    before = model.flat.copy()

    # execute
    with pytest.raises(ValueError, match=named):
        model.load_state_dict(corrupt(state, how))

    # assert
    np.testing.assert_array_equal(model.flat, before)


@pytest.mark.parametrize(
    ("activation", "init"),
    [
        ("relu", "he"),
        ("leaky_relu", "he"),
        ("gelu", "he"),
        ("sigmoid", "xavier"),
        ("tanh", "xavier"),
    ],
)
def test_initialisation_is_chosen_by_activation(activation: str, init: str) -> None:
    # prepare
    fan_in, fan_out = 800, 400
    he_std, xavier_std = np.sqrt(2 / fan_in), np.sqrt(2 / (fan_in + fan_out))

    # execute
    model = MLP([fan_in, fan_out, 10], activation=activation, seed=0, dtype="float64")

    # assert: He is N(0, 2/fan_in); Xavier is uniform on ±sqrt(6/(fan_in+fan_out))
    weight = model.linears[0].weight.data
    expected_std = he_std if init == "he" else xavier_std
    assert weight.std() == pytest.approx(expected_std, rel=0.02)
    assert abs(weight.mean()) < 0.05 * expected_std
    limit = np.sqrt(6 / (fan_in + fan_out))
    if init == "xavier":
        assert np.abs(weight).max() <= limit
    else:
        assert np.abs(weight).max() > limit
    np.testing.assert_array_equal(model.linears[0].bias.data, 0)


def test_float32_and_float64_models_start_from_the_same_values() -> None:
    # execute
    single, double = MLP([6, 5, 2], dtype="float32"), MLP([6, 5, 2], dtype="float64")

    # assert
    np.testing.assert_array_equal(single.flat, double.flat.astype(np.float32))


def test_parameters_are_views_into_one_contiguous_buffer() -> None:
    # prepare
    model = MLP([4, 5, 3], dtype="float64")

    # execute
    model.flat[:] = np.arange(model.flat.size)

    # assert: the layout tiles the buffer in order, and each parameter sees the write
    assert model.flat.flags.c_contiguous
    assert model.num_parameters == 4 * 5 + 5 + 5 * 3 + 3
    offset = 0
    for (name, p), (layout_name, shape, start) in zip(
        model.named_parameters(), model.layout, strict=True
    ):
        assert (name, p.shape, offset) == (layout_name, shape, start)
        assert np.shares_memory(p.data, model.flat)
        np.testing.assert_array_equal(p.data.ravel(), np.arange(offset, offset + p.size))
        offset += p.size
    assert offset == model.flat.size


def test_updating_a_parameter_in_place_updates_the_flat_buffer() -> None:
    # prepare
    model = MLP([4, 5, 3], dtype="float64")

    # execute
    model.linears[1].bias.data -= 1.0

    # assert
    np.testing.assert_array_equal(model.flat[-3:], -1.0)


def test_unflatten_gives_named_views_of_any_buffer_laid_out_like_flat() -> None:
    # prepare
    model = MLP([4, 5, 3], dtype="float64")
    buffer = np.zeros_like(model.flat)

    # execute
    views = model.unflatten(buffer)
    views["layers.2.bias"][:] = 5.0

    # assert
    assert list(views) == [name for name, _ in model.named_parameters()]
    np.testing.assert_array_equal(buffer[-3:], 5.0)
    for name, p in model.named_parameters():
        np.testing.assert_array_equal(model.unflatten(model.flat)[name], p.data)


def test_unflatten_rejects_a_buffer_of_the_wrong_size() -> None:
    # prepare
    model = MLP([4, 5, 3])

    # execute / assert
    with pytest.raises(ValueError, match=r"shape \(43,\), got \(42,\)"):
        model.unflatten(np.zeros(42, dtype=np.float32))


def test_graph_path_computes_in_the_model_dtype_like_the_fused_path() -> None:
    # prepare: float64 data (as scikit-learn gives it) into a float32 model
    model = MLP(SIZES, dtype="float32")
    x, y = batch("cross_entropy")
    _, fused = model.loss_and_grads(x, y)

    # execute
    outputs = model(x)
    nn.cross_entropy(outputs, y).backward()

    # assert: every parameter's gradient has the parameter's dtype, as on the fused path
    assert fused.dtype == np.float32
    assert outputs.dtype == np.float32
    assert [p.grad.dtype for p in model.parameters()] == [np.dtype(np.float32)] * 6


def test_a_model_with_preprocessing_takes_raw_rows_on_every_path() -> None:
    # prepare: the same weights, one model standardising inside, one fed standardised rows
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, SIZES[0])) * 5 + 3
    y = rng.integers(0, SIZES[-1], 8)
    mean, std = x.mean(axis=0), x.std(axis=0)
    plain = MLP(SIZES, dtype="float64", seed=2)
    scaled = MLP(SIZES, dtype="float64", seed=2, preprocessing={"mean": mean, "std": std})
    standardised = (x - mean) / std
    # execute
    loss, grads = scaled.loss_and_grads(x, y)
    expected_loss, expected = plain.loss_and_grads(standardised, y)
    with no_grad():
        graph = scaled(x).data
    rebuilt = MLP.from_spec(scaled.spec())
    # assert
    assert loss == pytest.approx(expected_loss, rel=1e-12)
    np.testing.assert_allclose(grads, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(graph, plain.logits(standardised), rtol=1e-12)
    np.testing.assert_array_equal(rebuilt.logits(x), scaled.logits(x))


@pytest.mark.parametrize(
    ("output", "sizes"), [("classes", [4, 5, 3]), ("binary", [4, 5, 1]), ("values", [4, 5, 2])]
)
def test_predict_says_what_the_outputs_mean(output: str, sizes: list[int]) -> None:
    model = MLP(sizes, output=output, seed=1)
    rows = np.random.default_rng(0).standard_normal((6, 4))
    z = model.logits(rows)

    predicted = model.predict(rows)

    if output == "classes":
        np.testing.assert_array_equal(predicted, z.argmax(axis=1))
        np.testing.assert_allclose(model.predict_proba(rows).sum(axis=1), 1.0, rtol=1e-6)
    elif output == "binary":
        np.testing.assert_array_equal(predicted, (z[:, 0] > 0).astype(int))
        assert ((model.predict_proba(rows) > 0.5) == (z > 0)).all()
    else:
        np.testing.assert_array_equal(predicted, z)
        with pytest.raises(ValueError, match="no probabilities"):
            model.predict_proba(rows)
    assert model.predict(rows[0]).shape == predicted[:1].shape  # one row alone
    assert repr(model).startswith(f"MLP(sizes={sizes}, activation='relu', output='{output}'")


def test_loss_and_grads_hooks_run_around_each_layer_and_change_no_number() -> None:
    # prepare: the weights of each layer arrive only when before_layer(i) asks for them,
    # as in an overlapped step; every other value starts as NaN
    model = MLP(SIZES, seed=2)
    x, y = batch("cross_entropy", rows=7)
    expected_loss, expected = model.loss_and_grads(x, y)
    weights = model.flat.copy()
    ranges = [
        (model.layout[2 * i][2], model.layout[2 * i + 1][2] + model.layout[2 * i + 1][1][0])
        for i in range(len(SIZES) - 1)
    ]
    model.flat[:] = np.nan
    grads = np.full_like(weights, np.nan)
    calls: list[tuple[str, int]] = []
    written: dict[int, np.ndarray] = {}

    def before_layer(i: int) -> None:
        calls.append(("before", i))
        model.flat[slice(*ranges[i])] = weights[slice(*ranges[i])]

    def grads_ready(loss: float, i: int) -> None:
        calls.append(("ready", i))
        assert loss == expected_loss
        assert np.isnan(grads[: ranges[i][0]]).all()  # earlier layers: not yet
        written[i] = grads[slice(*ranges[i])].copy()

    # execute
    loss, out = model.loss_and_grads(
        x, y, out=grads, before_layer=before_layer, grads_ready=grads_ready
    )

    # assert
    layers = range(len(SIZES) - 1)
    assert calls == [("before", i) for i in layers] + [("ready", i) for i in reversed(layers)]
    assert loss == expected_loss
    assert out is grads and out.tobytes() == expected.tobytes()
    for i in layers:
        assert written[i].tobytes() == expected[slice(*ranges[i])].tobytes()
