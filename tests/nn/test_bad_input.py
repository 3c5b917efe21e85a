"""Bad input raises ValueError naming what was expected and what was given, and changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.nn import MLP, SGD, Adam, Tensor, make_optimizer


def floats(*shape: int) -> Tensor:
    return Tensor(np.ones(shape), requires_grad=True)


SHAPE_MISMATCHES: dict[str, tuple[Callable[[], object], str]] = {
    "matmul_inner_sizes": (
        lambda: floats(3, 4) @ floats(5, 2),
        r"\(3, 4\) @ \(5, 2\) \(the last size of the left, 4, must equal the first of the right\)",
    ),
    "matmul_vector_sizes": (lambda: floats(3) @ floats(4), r"\(3,\) @ \(4,\)"),
    "matmul_three_dimensional": (
        lambda: floats(2, 3, 4) @ floats(4, 2),
        r"1-D or 2-D operands, got shapes \(2, 3, 4\) and \(4, 2\)",
    ),
    "linear_input_width": (
        lambda: nn.Linear(4, 3)(np.ones((2, 5), dtype=np.float32)),
        r"expected 4 input features, got shape \(2, 5\)",
    ),
    "mlp_graph_input_width": (
        lambda: MLP([6, 4, 2])(np.ones((2, 5), dtype=np.float32)),
        r"expected 6 input features, got shape \(2, 5\)",
    ),
    "mlp_fused_input_width": (
        lambda: MLP([6, 4, 2]).loss_and_grads(np.ones((2, 5)), np.array([0, 1])),
        r"inputs must have shape \(rows, 6\), got \(2, 5\)",
    ),
    "mlp_predict_input_rank": (
        lambda: MLP([6, 4, 2]).predict(np.ones((2, 3, 6))),
        r"inputs must have shape \(rows, 6\), got \(2, 3, 6\)",
    ),
    "mse_targets": (
        lambda: nn.mse_loss(floats(2, 3), np.ones((3, 2))),
        r"targets must have the predictions' shape \(2, 3\), got \(3, 2\)",
    ),
    "bce_targets": (
        lambda: nn.binary_cross_entropy_with_logits(floats(4, 1), np.ones(4)),
        r"shape \(4, 1\), got \(4,\)",
    ),
    "cross_entropy_label_count": (
        lambda: nn.cross_entropy(floats(2, 3), np.array([0, 1, 2])),
        r"labels must have shape \(2,\), got \(3,\)",
    ),
    "cross_entropy_logits_rank": (
        lambda: nn.cross_entropy(floats(3), np.array([0])),
        r"logits of shape \(batch, classes\), got \(3,\)",
    ),
    "fused_mse_targets": (
        lambda: MLP([2, 3]).loss_and_grads(np.ones((4, 2)), np.ones((4, 2)), loss="mse"),
        r"shape \(4, 3\), got \(4, 2\)",
    ),
    "fused_label_count": (
        lambda: MLP([2, 3]).loss_and_grads(np.ones((4, 2)), np.array([0, 1])),
        r"labels must have shape \(4,\), got \(2,\)",
    ),
    "upstream_gradient": (
        lambda: (floats(2, 2) * 2).backward(np.ones((2, 3))),
        r"upstream gradient has shape \(2, 3\), expected \(2, 2\)",
    ),
    "unflatten_buffer": (
        lambda: MLP([2, 3]).unflatten(np.zeros(8, dtype=np.float32)),
        r"flat buffer must have shape \(9,\), got \(8,\)",
    ),
}


@pytest.mark.parametrize("name", list(SHAPE_MISMATCHES))
def test_mismatched_shapes_raise_naming_expected_and_given(name: str) -> None:
    # prepare
    action, message = SHAPE_MISMATCHES[name]

    # execute / assert
    with pytest.raises(ValueError, match=message):
        action()


LABEL_CASES: dict[str, tuple[np.ndarray, str]] = {
    "too_large": (np.array([0, 3, 1]), r"label 3 is out of range: expected 0\.\.2"),
    "negative": (np.array([0, -1, 1]), r"label -1 is out of range: expected 0\.\.2"),
    "fractional": (np.array([0.0, 1.5, 1.0]), r"integers 0\.\.2, got dtype float64"),
    "nan": (np.array([0.0, np.nan, 1.0]), r"integers 0\.\.2, got dtype float64"),
    "strings": (np.array(["0", "1", "2"]), r"integers 0\.\.2, got dtype <U1"),
    "booleans": (np.array([True, False, True]), r"integers 0\.\.2, got dtype bool"),
}


@pytest.mark.parametrize("name", list(LABEL_CASES))
def test_bad_labels_on_the_graph_raise_naming_expected_and_given(name: str) -> None:
    # prepare
    labels, message = LABEL_CASES[name]

    # execute / assert
    with pytest.raises(ValueError, match=message):
        nn.cross_entropy(floats(3, 3), labels)


@pytest.mark.parametrize("name", list(LABEL_CASES))
def test_bad_labels_on_the_fused_path_raise_naming_expected_and_given(name: str) -> None:
    # prepare
    labels, message = LABEL_CASES[name]
    model = MLP([2, 4, 3])
    before = model.flat.copy()

    # execute
    with pytest.raises(ValueError, match=message):
        model.loss_and_grads(np.ones((3, 2)), labels)

    # assert
    np.testing.assert_array_equal(model.flat, before)


def test_whole_float_labels_are_accepted_as_integers() -> None:
    # execute
    loss = nn.cross_entropy(floats(3, 3), np.array([0.0, 2.0, 1.0]))

    # assert
    assert loss.item() == pytest.approx(np.log(3))


@pytest.mark.parametrize("lr", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("build", [SGD, Adam, nn.AdamW])
def test_non_finite_learning_rate_raises_naming_it(build: type, lr: float) -> None:
    # execute / assert
    with pytest.raises(ValueError, match=f"learning rate must be a finite number, got {lr}"):
        build(lr=lr)


def test_non_finite_learning_rate_in_settings_raises_naming_it() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="learning rate must be a finite number, got nan"):
        make_optimizer({"name": "sgd", "lr": float("nan")})


def test_optimizer_step_with_a_wrongly_shaped_gradient_changes_nothing() -> None:
    # prepare
    optimizer = SGD(lr=0.1, momentum=0.9)
    params = {"a": np.ones(2), "b": np.ones((3, 2))}

    # execute
    with pytest.raises(ValueError, match=r"gradient 'b': expected shape \(3, 2\), got \(2, 3\)"):
        optimizer.step(params, {"a": np.ones(2), "b": np.ones((2, 3))})

    # assert
    assert optimizer.steps == 0
    assert optimizer.buffers == {}
    np.testing.assert_array_equal(params["a"], 1.0)


def test_optimizer_step_with_differently_named_gradients_raises_naming_both() -> None:
    # execute / assert
    with pytest.raises(ValueError, match=r"expected \['a', 'b'\], got \['a', 'c'\]"):
        SGD(lr=0.1).step({"a": np.ones(1), "b": np.ones(1)}, {"a": np.ones(1), "c": np.ones(1)})


def test_loading_a_state_dict_with_a_wrong_shape_raises_and_changes_nothing() -> None:
    # prepare
    model = MLP([4, 5, 3], seed=0)
    state = {name: array + 1 for name, array in model.state_dict().items()}
    state["layers.0.weight"] = np.zeros((4, 5), dtype=np.float32)
    before = model.flat.copy()

    # execute
    with pytest.raises(
        ValueError, match=r"'layers\.0\.weight': expected shape \(5, 4\), got \(4, 5\)"
    ):
        model.load_state_dict(state)

    # assert
    np.testing.assert_array_equal(model.flat, before)


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: MLP([784]), r"at least an input and an output size.*got \[784\]"),
        (lambda: MLP([4, 0, 2]), r"all positive; got \[4, 0, 2\]"),
        (lambda: MLP([4, 2], activation="swish"), r"unknown activation 'swish'"),
        (lambda: MLP([4, 2], dtype="float16"), r"float32 or float64, got float16"),
        (lambda: nn.Linear(0, 3), r"positive sizes, got in=0, out=3"),
        (lambda: nn.Linear(2, 3, init="orthogonal"), r"unknown init 'orthogonal'"),
        (lambda: nn.LeakyReLU(1.5), r"alpha must be in \[0, 1\), got 1\.5"),
        (lambda: MLP([2, 3]).loss_and_grads(np.ones((1, 2)), [0], loss="hinge"), "'hinge'"),
        (
            lambda: MLP([2, 3]).loss_and_grads(
                np.ones((1, 2)), [0], out=np.zeros(9, dtype=np.float64)
            ),
            r"float32 array of shape \(9,\)",
        ),
    ],
)
def test_bad_model_settings_raise_naming_the_setting(
    build: Callable[[], object], message: str
) -> None:
    # execute / assert
    with pytest.raises(ValueError, match=message):
        build()
