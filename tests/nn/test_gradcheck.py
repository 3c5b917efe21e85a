"""Every derivative rule, layer, loss and the fused step against central finite differences.

Evaluation points stay away from kinks (relu and leaky_relu at 0, ties of max and
maximum, the edges of clip), where a finite difference is not a derivative.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import BroadcastableShapes, mutually_broadcastable_shapes

from gradfleet import nn
from gradfleet.nn import GradcheckError, Tensor, gradcheck, ops
from gradfleet.nn.losses import LOSS_RULES

Case = tuple[Callable[..., Tensor], list[np.ndarray]]


def grid(rng: np.random.Generator, shape: tuple[int, ...], offset: float = 0.03) -> np.ndarray:
    """Values k/10 + offset for k in -15..15: never 0, and two grids with offsets 0.03 and
    0.08 never tie (they differ by at least 0.05)."""
    return rng.integers(-15, 16, shape) / 10 + offset


def positive(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.uniform(0.5, 2.0, shape)


def distinct(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Pairwise distinct values (0.1 apart), so max has no ties."""
    return (rng.permutation(int(np.prod(shape))) / 10 - 1.0).reshape(shape)


def random_shape(rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(n) for n in rng.integers(1, 5, rng.integers(1, 4)))


def broadcast_partner(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple[int, ...]:
    """A shape that broadcasts against ``shape``: leading axes dropped, some sizes set to 1."""
    kept = shape[rng.integers(0, len(shape) + 1) :]
    return tuple(1 if rng.random() < 0.4 else n for n in kept)


SEEDS = [0, 1, 2]

UNARY: dict[str, tuple[Callable[[Tensor], Tensor], str]] = {
    "neg": (lambda a: -a, "grid"),
    "exp": (ops.exp, "grid"),
    "log": (ops.log, "positive"),
    "sqrt": (ops.sqrt, "positive"),
    "tanh": (ops.tanh, "grid"),
    "sigmoid": (ops.sigmoid, "grid"),
    "relu": (ops.relu, "grid"),
    "leaky_relu": (lambda a: ops.leaky_relu(a, 0.2), "grid"),
    "leaky_relu_default_alpha": (ops.leaky_relu, "grid"),
    "gelu": (ops.gelu, "grid"),
    "pow_int_scalar": (lambda a: a**3, "grid"),
    "pow_half": (lambda a: a**0.5, "positive"),
    "pow_negative_float": (lambda a: a**-1.5, "positive"),
    "rpow_scalar_base": (lambda a: 2.0**a, "grid"),
    "add_scalar": (lambda a: a + 2.5, "grid"),
    "rsub_scalar": (lambda a: 1.0 - a, "grid"),
    "mul_scalar": (lambda a: a * -3.0, "grid"),
    "rdiv_scalar": (lambda a: 2.0 / a, "positive"),
    "div_scalar": (lambda a: a / 4.0, "grid"),
}

BINARY: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], str, str]] = {
    "add": (lambda a, b: a + b, "grid", "grid"),
    "sub": (lambda a, b: a - b, "grid", "grid"),
    "mul": (lambda a, b: a * b, "grid", "grid"),
    "div": (lambda a, b: a / b, "grid", "positive"),
    "pow_tensor_exponent": (lambda a, b: a**b, "positive", "grid"),
    "maximum": (ops.maximum, "grid", "grid_offset"),
}


def make_values(rng: np.random.Generator, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "positive":
        return positive(rng, shape)
    return grid(rng, shape, 0.08 if kind == "grid_offset" else 0.03)


def unary_case(name: str, seed: int) -> Case:
    fn, kind = UNARY[name]
    rng = np.random.default_rng(seed)
    return fn, [make_values(rng, kind, random_shape(rng))]


def binary_case(name: str, seed: int) -> Case:
    fn, kind_a, kind_b = BINARY[name]
    rng = np.random.default_rng(seed)
    shape = random_shape(rng)
    partner = broadcast_partner(rng, shape)
    shapes = (shape, partner) if seed % 2 == 0 else (partner, shape)
    return fn, [make_values(rng, kind_a, shapes[0]), make_values(rng, kind_b, shapes[1])]


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(UNARY))
def test_unary_op_matches_finite_differences(name: str, seed: int) -> None:
    # prepare
    fn, inputs = unary_case(name, seed)

    # execute / assert
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("name", list(BINARY))
def test_binary_op_with_broadcasting_matches_finite_differences(name: str, seed: int) -> None:
    # prepare
    fn, inputs = binary_case(name, seed)

    # execute / assert
    assert gradcheck(fn, inputs)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(
    name=st.sampled_from(list(BINARY)),
    shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=3),
    seed=st.integers(0, 2**16),
)
def test_binary_op_on_generated_broadcast_shapes_matches_finite_differences(
    name: str, shapes: BroadcastableShapes, seed: int
) -> None:
    # prepare
    fn, kind_a, kind_b = BINARY[name]
    rng = np.random.default_rng(seed)
    shape_a, shape_b = shapes.input_shapes
    inputs = [make_values(rng, kind_a, shape_a), make_values(rng, kind_b, shape_b)]

    # execute / assert
    assert gradcheck(fn, inputs)


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [((3, 4), (4, 2)), ((4,), (4, 3)), ((3, 4), (4,)), ((4,), (4,)), ((1, 5), (5, 1))],
    ids=["matrix_matrix", "vector_matrix", "matrix_vector", "vector_vector", "outer"],
)
def test_matmul_matches_finite_differences(
    shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    # prepare
    rng = np.random.default_rng(1)
    inputs = [rng.standard_normal(shape_a), rng.standard_normal(shape_b)]

    # execute / assert
    assert gradcheck(lambda a, b: a @ b, inputs)


def test_matmul_with_a_reflected_constant_matches_finite_differences() -> None:
    # prepare
    rng = np.random.default_rng(2)
    constant = rng.standard_normal((2, 3))

    # execute / assert
    assert gradcheck(lambda b: constant @ b, [rng.standard_normal((3, 4))])


REDUCTION_AXES = [
    pytest.param(None, False, id="all"),
    pytest.param(None, True, id="all-keepdims"),
    pytest.param(0, False, id="axis0"),
    pytest.param(1, True, id="axis1-keepdims"),
    pytest.param(-1, False, id="axis-1"),
    pytest.param((0, 2), False, id="axes02"),
    pytest.param((0, 2), True, id="axes02-keepdims"),
]


@pytest.mark.parametrize(("axis", "keepdims"), REDUCTION_AXES)
@pytest.mark.parametrize("reduction", ["sum", "mean", "max"])
def test_reduction_matches_finite_differences(
    reduction: str, axis: int | tuple[int, ...] | None, keepdims: bool
) -> None:
    # prepare
    rng = np.random.default_rng(3)
    inputs = [distinct(rng, (2, 3, 4))]

    # execute / assert
    assert gradcheck(lambda a: getattr(a, reduction)(axis=axis, keepdims=keepdims), inputs)


SHAPE_OPS: dict[str, Callable[[Tensor], Tensor]] = {
    "reshape_args": lambda a: a.reshape(4, 6) * np.arange(24.0).reshape(4, 6),
    "reshape_tuple": lambda a: a.reshape((6, -1)) ** 2,
    "transpose_T_2d": lambda a: a.reshape(6, 4).T * np.arange(24.0).reshape(4, 6),
    "transpose_axes": lambda a: ops.transpose(a, (1, 2, 0)) * np.arange(24.0).reshape(3, 4, 2),
    "getitem_int": lambda a: a[1],
    "getitem_slice": lambda a: a[:, 1:3, ::2],
    "getitem_negative_step": lambda a: a[::-1, :, -1],
    "getitem_repeated_fancy": lambda a: a[[0, 1, 0, 0]] * 2,
    "getitem_repeated_pairs": lambda a: a[[0, 0, 1, 0], [2, 2, 1, 2]],
    "getitem_mixed": lambda a: a[1, [0, 2, 0], 1:],
    "getitem_boolean_mask": lambda a: a[a.data > 0],
    "getitem_tensor_index": lambda a: a[Tensor(np.array([1, 1, 0]))],
    "getitem_newaxis_ellipsis": lambda a: a[None, ..., 2],
}


@pytest.mark.parametrize("name", list(SHAPE_OPS))
def test_shape_and_indexing_op_matches_finite_differences(name: str) -> None:
    # prepare
    rng = np.random.default_rng(4)
    inputs = [grid(rng, (2, 3, 4))]

    # execute / assert
    assert gradcheck(SHAPE_OPS[name], inputs)


@pytest.mark.parametrize(
    ("low", "high"), [(-1.0, 1.0), (None, 0.5), (-0.5, None)], ids=["both", "high", "low"]
)
def test_clip_matches_finite_differences(low: float | None, high: float | None) -> None:
    # prepare: grid values end in .03, so none sits on a bound
    rng = np.random.default_rng(5)
    inputs = [grid(rng, (3, 5))]

    # execute / assert
    assert gradcheck(lambda a: ops.clip(a, low, high), inputs)


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("op", ["log_softmax", "softmax"])
def test_softmax_family_matches_finite_differences(op: str, axis: int) -> None:
    # prepare
    rng = np.random.default_rng(6)
    inputs = [rng.standard_normal((3, 4)) * 3]

    # execute / assert
    assert gradcheck(lambda a: getattr(ops, op)(a, axis=axis), inputs)


def test_log_softmax_of_large_logits_matches_finite_differences() -> None:
    # prepare: exp(800) overflows; the stable form must not
    inputs = [np.array([[800.0, 801.0, 799.5], [-800.0, -801.0, -799.0]])]

    # execute / assert
    assert gradcheck(lambda a: ops.log_softmax(a, axis=1), inputs)


def several_paths(a: Tensor, b: Tensor) -> Tensor:
    """z = a·b feeds five consumers, b feeds two, with broadcasting on both."""
    z = a * b  # (3, 4)
    return z * z + ops.exp(z) - z / b + z.sum(axis=0) + ops.tanh(z).mean(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", SEEDS)
def test_node_used_on_several_paths_matches_finite_differences(seed: int) -> None:
    # prepare
    rng = np.random.default_rng(seed)
    inputs = [grid(rng, (3, 4)) / 2, positive(rng, (4,))]

    # execute / assert
    assert gradcheck(several_paths, inputs)


def test_composite_expression_on_random_broadcast_shapes_matches_finite_differences() -> None:
    # prepare
    rng = np.random.default_rng(7)
    inputs = [positive(rng, (2, 1, 4)), grid(rng, (3, 1)), grid(rng, (4,))]

    def fn(a: Tensor, b: Tensor, c: Tensor) -> Tensor:
        h = ops.sigmoid(a * b + c) / ops.sqrt(a) - ops.log(a) * c
        return ops.softmax(h, axis=-1).max(axis=1) + (h**2).sum()

    # execute / assert
    assert gradcheck(fn, inputs)


# Layers: parameters become gradcheck inputs, substituted into the module under test.


def linears_of(module: nn.Module) -> list[nn.Linear]:
    if isinstance(module, nn.MLP):
        return module.linears
    if isinstance(module, nn.Sequential):
        return [module[i] for i in range(len(module)) if isinstance(module[i], nn.Linear)]
    return [module] if isinstance(module, nn.Linear) else []


def gradcheck_module(module: nn.Module, x: np.ndarray) -> bool:
    """Check d(output)/d(input) and d(output)/d(every parameter) of a float64 module."""
    linears = linears_of(module)
    params = [p.data.copy() for linear in linears for p in (linear.weight, linear.bias)]

    def fn(inputs: Tensor, *flat_params: Tensor) -> Tensor:
        for i, linear in enumerate(linears):
            linear.weight, linear.bias = flat_params[2 * i], flat_params[2 * i + 1]
        return module(inputs)

    return gradcheck(fn, [x, *params])


LAYERS: dict[str, Callable[[], nn.Module]] = {
    "Linear": lambda: nn.Linear(4, 3, dtype="float64", rng=np.random.default_rng(0)),
    "Sigmoid": nn.Sigmoid,
    "ReLU": nn.ReLU,
    "LeakyReLU": lambda: nn.LeakyReLU(0.1),
    "Tanh": nn.Tanh,
    "GELU": nn.GELU,
    "Sequential": lambda: nn.Sequential(
        nn.Linear(4, 5, dtype="float64"), nn.Tanh(), nn.Linear(5, 2, dtype="float64")
    ),
    "MLP_relu": lambda: nn.MLP([4, 5, 3, 2], activation="relu", dtype="float64"),
    "MLP_leaky_relu": lambda: nn.MLP([4, 5, 2], activation="leaky_relu", dtype="float64"),
    "MLP_sigmoid": lambda: nn.MLP([4, 5, 2], activation="sigmoid", dtype="float64"),
    "MLP_tanh": lambda: nn.MLP([4, 5, 2], activation="tanh", dtype="float64"),
    "MLP_gelu": lambda: nn.MLP([4, 5, 2], activation="gelu", dtype="float64"),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_matches_finite_differences(name: str) -> None:
    # prepare
    module = LAYERS[name]()
    x = grid(np.random.default_rng(8), (3, 4))

    # execute / assert
    assert gradcheck_module(module, x)


def loss_cases() -> dict[str, Case]:
    """Each rule of ``LOSS_RULES`` through its graph loss; the targets are inputs too where
    the loss is differentiable in them."""
    rng = np.random.default_rng(9)
    labels = np.array([2, 0, 2, 1, 3])  # label 2 twice: picked entries accumulate
    return {
        "mse": (nn.mse_loss, [rng.standard_normal((4, 3)), rng.standard_normal((4, 3))]),
        "cross_entropy": (
            lambda logits: nn.cross_entropy(logits, labels),
            [rng.normal(0, 3, (5, 4))],
        ),
        # logits away from 0 and large ones, targets soft and hard
        "binary_cross_entropy": (
            nn.binary_cross_entropy_with_logits,
            [
                np.array([[-30.0, -2.5, -0.3], [0.4, 1.7, 40.0]]),
                np.array([[0.0, 1.0, 0.25], [0.5, 0.9, 1.0]]),
            ],
        ),
    }


@pytest.mark.parametrize("name", list(LOSS_RULES))
def test_loss_matches_finite_differences(name: str) -> None:
    # prepare
    fn, inputs = loss_cases()[name]

    # execute / assert
    assert gradcheck(fn, inputs)


def test_binary_cross_entropy_with_logits_gradient_at_logit_zero() -> None:
    # prepare: the loss is smooth (softplus(z) − z·y); its slope at z = 0 is 1/2 − y.
    # A zero logit is common: a zero input row through a layer with zero bias.
    logits = np.array([[0.0, 0.0, 1.5]])
    targets = np.array([[1.0, 0.0, 0.5]])

    # execute / assert
    assert gradcheck(lambda z: nn.binary_cross_entropy_with_logits(z, targets), [logits])


def test_every_rule_in_the_tables_has_a_gradcheck() -> None:
    # The tables hold what training runs; a rule added there must be checked here too.
    assert set(ops.ACTIVATION_RULES) <= set(UNARY)
    assert set(loss_cases()) == set(LOSS_RULES)


def fused_loss(
    model: nn.MLP, x: np.ndarray, y: np.ndarray, loss: str
) -> Callable[[Tensor], Tensor]:
    """The fused step as a function of the flat parameters, for gradcheck."""

    def fn(flat: Tensor) -> Tensor:
        model.flat[:] = flat.data
        value, grads = model.loss_and_grads(x, y, loss)
        return Tensor._from_op("fused", np.asarray(value), (flat,), lambda g: (g * grads,))

    return fn


@pytest.mark.parametrize("loss", list(LOSS_RULES))
@pytest.mark.parametrize("activation", list(ops.ACTIVATION_RULES))
def test_fused_step_matches_finite_differences(activation: str, loss: str) -> None:
    # prepare: the path training runs, every activation with every loss
    model = nn.MLP([3, 4, 2], activation=activation, seed=1, dtype="float64")
    rng = np.random.default_rng(11)
    x = grid(rng, (5, 3))
    y = rng.integers(0, 2, 5) if loss == "cross_entropy" else rng.uniform(0, 1, (5, 2))

    # execute / assert
    assert gradcheck(fused_loss(model, x, y, loss), [model.flat.copy()])


# gradcheck itself must catch a wrong rule.


def square_with_wrong_rule(a: Tensor) -> Tensor:
    """a² whose rule forgets the factor 2: off by |a|, worst where |a| is largest."""
    return Tensor._from_op("wrong_square", a.data**2, (a,), lambda g: (g * a.data,))


def test_gradcheck_raises_naming_the_worst_element_of_a_wrong_rule() -> None:
    # prepare: |a| is largest at index (1, 2)
    a = np.array([[0.5, -1.0, 0.25], [1.5, 0.75, -4.0]])

    # execute
    with pytest.raises(GradcheckError) as raised:
        gradcheck(lambda x: square_with_wrong_rule(x).sum(), [a])

    # assert
    message = str(raised.value)
    assert "input 0 at index (1, 2)" in message
    # The output is weighted by a fixed random number, so compare the two values' ratio.
    found = re.search(r"analytic (\S+), numeric (\S+) ", message)
    assert found is not None
    analytic, numeric = float(found[1]), float(found[2])
    assert numeric == pytest.approx(2 * analytic, rel=1e-6)
    assert isinstance(raised.value, ValueError)


def test_gradcheck_names_the_input_that_is_wrong() -> None:
    # prepare: only the second input goes through the wrong rule
    a, b = np.array([1.0, 2.0]), np.array([3.0, -0.5, 2.0])

    # execute / assert
    with pytest.raises(GradcheckError, match=r"input 1 at index \(0,\)"):
        gradcheck(lambda x, y: x.sum() + square_with_wrong_rule(y).sum(), [a, b])


def test_gradcheck_checks_every_element_of_a_non_scalar_output() -> None:
    # prepare: a wrong rule on a non-scalar output, no reduction in fn
    a = np.array([[1.0, -2.0], [3.0, 0.5]])

    # execute / assert
    with pytest.raises(GradcheckError):
        gradcheck(square_with_wrong_rule, [a])


def test_gradcheck_computes_in_float64_even_for_float32_inputs() -> None:
    # prepare
    seen: list[np.dtype] = []

    def fn(a: Tensor) -> Tensor:
        seen.append(a.dtype)
        return ops.tanh(a) * 3

    # execute
    result = gradcheck(fn, [np.array([0.1, -0.7], dtype=np.float32)])

    # assert
    assert result is True
    assert set(seen) == {np.dtype(np.float64)}
