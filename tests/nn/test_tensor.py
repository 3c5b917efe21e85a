"""Graph mechanics of Tensor: accumulation, broadcasting, seeding, no_grad, freeing, dtype."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable

import numpy as np
import pytest

from gradfleet import nn
from gradfleet.nn import Tensor, no_grad, ops


def leaf(values: object, dtype: object = np.float64) -> Tensor:
    return Tensor(np.array(values, dtype=dtype), requires_grad=True)


def test_node_used_on_several_paths_gets_every_contribution() -> None:
    # prepare: y = x·x + x + x, so dy/dx = 2x + 2
    x = leaf([1.0, -2.0, 3.0])

    # execute
    (x * x + x + x).sum().backward()

    # assert
    np.testing.assert_array_equal(x.grad, [4.0, -2.0, 8.0])


def test_shared_intermediate_accumulates_before_flowing_back() -> None:
    # prepare: z = a·b feeds three consumers; y = z² + 3z + exp(0·z)
    a, b = leaf([2.0]), leaf([5.0])
    z = a * b

    # execute
    (z * z + 3 * z + ops.exp(z * 0.0)).sum().backward()

    # assert: dy/dz = 2z + 3 + 0 = 23
    np.testing.assert_allclose(a.grad, [23.0 * 5.0])
    np.testing.assert_allclose(b.grad, [23.0 * 2.0])


def test_leaf_gradients_accumulate_across_backward_calls() -> None:
    # prepare
    x = leaf([1.0, 2.0])

    # execute
    (x * 3).sum().backward()
    (x * 4).sum().backward()

    # assert
    np.testing.assert_array_equal(x.grad, [7.0, 7.0])


@pytest.mark.parametrize(
    ("shape_a", "shape_b"),
    [
        ((3, 4), (4,)),
        ((3, 4), (3, 1)),
        ((3, 1), (1, 4)),
        ((2, 3, 4), (3, 1)),
        ((2, 1, 4), (1, 3, 1)),
        ((3, 4), ()),
        ((), (2, 3)),
    ],
)
@pytest.mark.parametrize("op", ["add", "sub", "mul", "div", "maximum"])
def test_broadcast_gradients_are_summed_back_to_each_input_shape(
    op: str, shape_a: tuple[int, ...], shape_b: tuple[int, ...]
) -> None:
    # prepare
    rng = np.random.default_rng(0)
    a = leaf(rng.uniform(1.0, 2.0, shape_a))
    b = leaf(rng.uniform(3.0, 4.0, shape_b))  # disjoint ranges: no ties for maximum
    fn = getattr(ops, op)

    # execute
    out = fn(a, b)
    out.sum().backward()

    # assert: shapes, and the value each broadcast element would get by hand
    assert out.shape == np.broadcast_shapes(shape_a, shape_b)
    assert a.grad.shape == shape_a
    assert b.grad.shape == shape_b
    ones = np.ones(out.shape)
    local_a = {
        "add": ones,
        "sub": ones,
        "mul": ones * b.data,
        "div": ones / b.data,
        "maximum": ones * 0.0,
    }[op]
    local_b = {
        "add": ones,
        "sub": -ones,
        "mul": ones * a.data,
        "div": -a.data / b.data**2 * ones,
        "maximum": ones,
    }[op]
    np.testing.assert_allclose(a.grad, sum_to_shape(local_a, shape_a))
    np.testing.assert_allclose(b.grad, sum_to_shape(local_b, shape_b))


def sum_to_shape(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reference un-broadcasting by brute force: sum over every broadcast position."""
    result = np.zeros(shape)
    padded = (1,) * (grad.ndim - len(shape)) + shape
    for index in np.ndindex(grad.shape):
        target = tuple(0 if n == 1 else i for i, n in zip(index, padded, strict=True))
        result.reshape(padded)[target] += grad[index]
    return result


def test_numpy_array_and_python_scalar_on_the_left_give_tensors() -> None:
    # prepare
    x = leaf([1.0, 2.0])

    # execute
    from_array = np.array([10.0, 20.0]) + x
    from_scalar = 2.0 * x - 1
    from_numpy_scalar = np.float64(3.0) * x

    # assert
    assert isinstance(from_array, Tensor)
    assert isinstance(from_scalar, Tensor)
    assert isinstance(from_numpy_scalar, Tensor)
    (from_array + from_scalar + from_numpy_scalar).sum().backward()
    np.testing.assert_array_equal(x.grad, [6.0, 6.0])


def test_backward_on_a_scalar_seeds_one() -> None:
    # prepare
    x = leaf([1.0, 2.0, 3.0])
    y = (x * x).sum()

    # execute
    y.backward()

    # assert
    np.testing.assert_array_equal(x.grad, [2.0, 4.0, 6.0])


def test_backward_on_a_non_scalar_takes_the_upstream_gradient() -> None:
    # prepare
    x = leaf([[1.0, 2.0], [3.0, 4.0]])
    upstream = np.array([[1.0, 0.5], [-1.0, 2.0]])

    # execute
    (x * x).backward(upstream)

    # assert
    np.testing.assert_array_equal(x.grad, 2 * x.data * upstream)


def test_a_leaf_gradient_never_shares_memory_with_the_callers_upstream_array() -> None:
    # prepare: y = x + 0 passes the upstream gradient through unchanged
    x = leaf([1.0, 2.0, 3.0])
    upstream = np.ones(3)

    # execute: the caller reuses its buffer after backward
    (x + 0.0).backward(upstream)
    upstream[:] = 99.0

    # assert
    np.testing.assert_array_equal(x.grad, np.ones(3))


def test_backward_on_a_non_scalar_without_upstream_gradient_is_refused() -> None:
    # prepare
    y = leaf([1.0, 2.0]) * 2

    # execute / assert
    with pytest.raises(ValueError, match=r"non-scalar of shape \(2,\)"):
        y.backward()


def test_backward_with_a_wrongly_shaped_upstream_gradient_is_refused() -> None:
    # prepare
    y = leaf([1.0, 2.0]) * 2

    # execute / assert
    with pytest.raises(ValueError, match=r"shape \(3,\), expected \(2,\)"):
        y.backward(np.ones(3))


def test_backward_without_any_input_requiring_grad_is_refused() -> None:
    # prepare
    y = Tensor(np.ones(2)).sum()

    # execute / assert
    with pytest.raises(ValueError, match="requires_grad"):
        y.backward()


def test_integer_tensor_cannot_require_grad() -> None:
    # execute / assert
    with pytest.raises(ValueError, match="floating point, got dtype int64"):
        Tensor(np.arange(3), requires_grad=True)


def test_no_grad_records_nothing_and_restores_recording() -> None:
    # prepare
    x = leaf([1.0, 2.0])

    # execute
    with no_grad():
        inside = (x * 2).exp()
    outside = x * 2

    # assert
    np.testing.assert_allclose(inside.data, np.exp([2.0, 4.0]))
    assert not inside.requires_grad
    assert inside.is_leaf
    assert outside.requires_grad
    assert not outside.is_leaf


def test_no_grad_restores_recording_after_an_exception() -> None:
    # prepare
    x = leaf([1.0])

    # execute
    with pytest.raises(RuntimeError), no_grad():
        raise RuntimeError("boom")

    # assert
    assert (x * 2).requires_grad


def test_graph_and_its_forward_values_are_freed_after_backward() -> None:
    # prepare: hold only a weak reference to an intermediate's forward value
    x = leaf(np.linspace(1.0, 2.0, 1000))
    z = ops.exp(x * 2)
    forward_value = weakref.ref(z.data)
    y = (z * z).sum()
    del z

    # execute
    y.backward()
    gc.collect()

    # assert
    assert forward_value() is None
    assert y._parents == ()
    assert y._backward is None


def test_retain_graph_keeps_the_graph_for_a_second_backward() -> None:
    # prepare
    x = leaf([1.0, 2.0])
    z = x * x
    y = (z * 3).sum()

    # execute
    y.backward(retain_graph=True)
    first = x.grad.copy()
    y.backward()

    # assert: the second pass adds the same gradient; inner nodes kept theirs
    np.testing.assert_array_equal(first, [6.0, 12.0])
    np.testing.assert_array_equal(x.grad, 2 * first)
    np.testing.assert_array_equal(z.grad, [3.0, 3.0])


def test_second_backward_through_a_freed_graph_is_refused() -> None:
    # prepare
    x = leaf([1.0, 2.0])
    y = (x * x).sum()
    y.backward()

    # execute / assert: the closures are gone, so the gradient would silently be missing
    with pytest.raises(ValueError, match="retain_graph"):
        y.backward()


def test_deep_graph_of_5000_ops_has_no_recursion_error() -> None:
    # prepare
    x = leaf([0.5])
    y = x
    for _ in range(5000):
        y = y * 1.0 + 0.0

    # execute
    y.sum().backward()

    # assert
    np.testing.assert_array_equal(x.grad, [1.0])


def test_deep_graph_can_be_dropped_without_backward() -> None:
    # prepare
    x = leaf([0.5])
    y = x
    for _ in range(5000):
        y = ops.tanh(y)
    order = y.topological_order()

    # execute
    del y, order
    gc.collect()

    # assert: nothing crashed; the leaf is intact
    assert x.grad is None


def test_leaf_grad_owns_its_memory() -> None:
    # prepare: sum's rule returns a read-only broadcast view; add passes g to both inputs
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])

    # execute
    (a + b).sum().backward()
    a.grad += 1

    # assert
    np.testing.assert_array_equal(a.grad, [2.0, 2.0])
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


def test_topological_order_puts_parents_first() -> None:
    # prepare
    x = leaf([1.0])
    a = x * 2
    b = a + x
    y = (a * b).sum()

    # execute
    order = y.topological_order()

    # assert
    position = {id(node): i for i, node in enumerate(order)}
    for node in order:
        for parent in node._parents:
            assert position[id(parent)] < position[id(node)]
    assert order[-1] is y


# Every op, applied to float32 leaves: (name, function of the leaves, leaf values).
POSITIVE = np.array([[0.5, 1.5, 2.0], [1.25, 0.75, 3.0]])
MIXED = np.array([[0.5, -1.5, 2.0], [-1.25, 0.75, -3.0]])
FLOAT32_CASES: list[tuple[str, Callable[..., Tensor], list[np.ndarray]]] = [
    ("add", lambda a, b: a + b, [MIXED, POSITIVE[0]]),
    ("add_scalar", lambda a: 1.5 + a, [MIXED]),
    ("sub", lambda a, b: a - b, [MIXED, POSITIVE]),
    ("rsub_scalar", lambda a: 2 - a, [MIXED]),
    ("mul", lambda a, b: a * b, [MIXED, POSITIVE[:, :1]]),
    ("mul_scalar", lambda a: a * 0.3, [MIXED]),
    ("div", lambda a, b: a / b, [MIXED, POSITIVE]),
    ("rdiv_scalar", lambda a: 1 / a, [POSITIVE]),
    ("matmul", lambda a, b: a @ b, [MIXED, POSITIVE.T]),
    ("matmul_vector", lambda a, b: a @ b, [MIXED, POSITIVE[0]]),
    ("pow_scalar", lambda a: a**2, [MIXED]),
    ("pow_float", lambda a: a**1.5, [POSITIVE]),
    ("pow_tensor", lambda a, b: a**b, [POSITIVE, MIXED]),
    ("rpow_scalar", lambda a: 2.0**a, [MIXED]),
    ("neg", lambda a: -a, [MIXED]),
    ("sum", lambda a: a.sum(), [MIXED]),
    ("sum_axis", lambda a: a.sum(axis=1, keepdims=True), [MIXED]),
    ("mean", lambda a: a.mean(), [MIXED]),
    ("mean_axis", lambda a: a.mean(axis=0), [MIXED]),
    ("max", lambda a: a.max(), [MIXED]),
    ("max_axis", lambda a: a.max(axis=1), [MIXED]),
    ("exp", ops.exp, [MIXED]),
    ("log", ops.log, [POSITIVE]),
    ("sqrt", ops.sqrt, [POSITIVE]),
    ("tanh", ops.tanh, [MIXED]),
    ("sigmoid", ops.sigmoid, [MIXED]),
    ("relu", ops.relu, [MIXED]),
    ("leaky_relu", lambda a: ops.leaky_relu(a, 0.1), [MIXED]),
    ("gelu", ops.gelu, [MIXED]),
    ("reshape", lambda a: a.reshape(3, 2), [MIXED]),
    ("transpose", lambda a: a.T, [MIXED]),
    ("getitem", lambda a: a[[0, 1, 0], 1:], [MIXED]),
    ("maximum", lambda a, b: ops.maximum(a, b), [MIXED, POSITIVE - 1.1]),
    ("maximum_scalar", lambda a: ops.maximum(a, 0.0), [MIXED]),
    ("clip", lambda a: ops.clip(a, -1.0, 1.0), [MIXED]),
    ("log_softmax", ops.log_softmax, [MIXED]),
    ("softmax", lambda a: ops.softmax(a, axis=0), [MIXED]),
    ("mse_loss", lambda a, b: nn.mse_loss(a, b), [MIXED, POSITIVE]),
    ("cross_entropy", lambda a: nn.cross_entropy(a, np.array([2, 0])), [MIXED]),
    (
        "binary_cross_entropy_with_logits",
        lambda a, b: nn.binary_cross_entropy_with_logits(a, b),
        [MIXED, POSITIVE / 3],
    ),
]


@pytest.mark.parametrize(
    ("fn", "values"),
    [pytest.param(fn, values, id=name) for name, fn, values in FLOAT32_CASES],
)
def test_float32_in_gives_float32_out_and_float32_gradients(
    fn: Callable[..., Tensor], values: list[np.ndarray]
) -> None:
    # prepare
    leaves = [leaf(v, np.float32) for v in values]

    # execute
    out = fn(*leaves)
    (out * out).sum().backward()

    # assert
    assert out.dtype == np.float32
    for x in leaves:
        assert x.grad is not None
        assert x.grad.dtype == np.float32
        assert x.grad.shape == x.shape


@pytest.mark.parametrize("layer", ["Linear", "Sigmoid", "ReLU", "LeakyReLU", "Tanh", "GELU"])
def test_float32_layers_keep_float32(layer: str) -> None:
    # prepare
    module = nn.Linear(3, 2, dtype="float32") if layer == "Linear" else getattr(nn, layer)()
    x = leaf(MIXED, np.float32)

    # execute
    out = module(x)
    out.sum().backward()

    # assert
    assert out.dtype == np.float32
    assert x.grad.dtype == np.float32
    for p in module.parameters():
        assert p.grad.dtype == np.float32
