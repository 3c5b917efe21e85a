"""Every differentiable operation and its derivative rule, in one place.

Each op computes its forward value with NumPy and records a closure ``g -> grads`` that
maps the upstream gradient to one gradient per input (the vector-Jacobian product).
Elementwise ops broadcast; ``_unbroadcast`` sums gradients back to each input's shape.
The graph these ops build is for teaching, ``explain()`` and checking; training runs the
fused ``MLP.loss_and_grads``, which takes each activation from ``ACTIVATION_RULES`` below,
the same rules the graph's activations are built from. All rules are checked against
finite differences in tests/nn/test_gradcheck.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

from gradfleet.nn.tensor import ArrayLike, Tensor

Axis = int | tuple[int, ...] | None


def as_tensor(value: ArrayLike, like: Tensor | None = None) -> Tensor:
    """Wrap a constant; Python scalars take ``like``'s dtype so float32 stays float32."""
    if isinstance(value, Tensor):
        return value
    if like is not None and isinstance(value, int | float) and like.dtype.kind == "f":
        return Tensor(np.asarray(value, dtype=like.dtype))
    return Tensor(value)


def _unbroadcast(grad: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Sum ``grad`` over the axes that broadcasting added or stretched to reach ``shape``."""
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad


def _binary(a: ArrayLike, b: ArrayLike) -> tuple[Tensor, Tensor]:
    if isinstance(a, Tensor):
        return a, as_tensor(b, like=a)
    b = as_tensor(b)
    return as_tensor(a, like=b), b


def add(a: ArrayLike, b: ArrayLike) -> Tensor:
    a, b = _binary(a, b)
    return Tensor._from_op(
        "+",
        a.data + b.data,
        (a, b),
        lambda g: (_unbroadcast(g, a.shape), _unbroadcast(g, b.shape)),
    )


def sub(a: ArrayLike, b: ArrayLike) -> Tensor:
    a, b = _binary(a, b)
    return Tensor._from_op(
        "-",
        a.data - b.data,
        (a, b),
        lambda g: (_unbroadcast(g, a.shape), _unbroadcast(-g, b.shape)),
    )


def mul(a: ArrayLike, b: ArrayLike) -> Tensor:
    a, b = _binary(a, b)
    return Tensor._from_op(
        "*",
        a.data * b.data,
        (a, b),
        lambda g: (_unbroadcast(g * b.data, a.shape), _unbroadcast(g * a.data, b.shape)),
    )


def div(a: ArrayLike, b: ArrayLike) -> Tensor:
    a, b = _binary(a, b)
    out = a.data / b.data
    return Tensor._from_op(
        "/",
        out,
        (a, b),
        lambda g: (_unbroadcast(g / b.data, a.shape), _unbroadcast(-g * out / b.data, b.shape)),
    )


def power(a: ArrayLike, b: ArrayLike) -> Tensor:
    """a ** b; the exponent may be a tensor too (d/db a**b = a**b · log a, for a > 0)."""
    a, b = _binary(a, b)
    out = a.data**b.data

    def backward(g: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        grad_a = _unbroadcast(g * b.data * a.data ** (b.data - 1), a.shape)
        if not b.requires_grad:
            return grad_a, None
        with np.errstate(divide="ignore", invalid="ignore"):
            log_a = np.where(a.data > 0, np.log(np.where(a.data > 0, a.data, 1)), 0)
        return grad_a, _unbroadcast(g * out * log_a, b.shape)

    return Tensor._from_op("**", out, (a, b), backward)


def neg(a: Tensor) -> Tensor:
    return Tensor._from_op("neg", -a.data, (a,), lambda g: (-g,))


def matmul(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Matrix product of 1-D or 2-D operands (batched products are not needed by an MLP)."""
    a, b = _binary(a, b)
    if a.ndim not in (1, 2) or b.ndim not in (1, 2):
        raise ValueError(f"matmul takes 1-D or 2-D operands, got shapes {a.shape} and {b.shape}")
    if a.shape[-1] != b.shape[0]:
        raise ValueError(
            f"matmul shapes do not match: {a.shape} @ {b.shape} "
            f"(the last size of the left, {a.shape[-1]}, must equal the first of the right)"
        )

    def backward(g: np.ndarray) -> tuple[np.ndarray | None, np.ndarray | None]:
        a2 = a.data if a.ndim == 2 else a.data[None, :]
        b2 = b.data if b.ndim == 2 else b.data[:, None]
        g2 = g.reshape(a2.shape[0], b2.shape[1])
        # Skip the product for an operand that needs no gradient (an MLP's input batch).
        grad_a = (g2 @ b2.T).reshape(a.shape) if a.requires_grad else None
        grad_b = (a2.T @ g2).reshape(b.shape) if b.requires_grad else None
        return grad_a, grad_b

    return Tensor._from_op("@", a.data @ b.data, (a, b), backward)


def _expand(g: np.ndarray, shape: tuple[int, ...], axis: Axis, keepdims: bool) -> np.ndarray:
    """Give a reduced gradient back the reduced axes so it broadcasts over the input."""
    if axis is not None and not keepdims:
        g = np.expand_dims(g, axis)
    elif axis is None and not keepdims:
        g = np.reshape(g, (1,) * len(shape))
    return np.broadcast_to(g, shape)


def _count(shape: tuple[int, ...], axis: Axis) -> int:
    if axis is None:
        return math.prod(shape)
    axes = (axis,) if isinstance(axis, int) else axis
    return math.prod(shape[i] for i in axes)


def sum(a: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    return Tensor._from_op(
        "sum",
        np.sum(a.data, axis=axis, keepdims=keepdims),
        (a,),
        lambda g: (_expand(g, a.shape, axis, keepdims),),
    )


def mean(a: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    n = _count(a.shape, axis)
    return Tensor._from_op(
        "mean",
        np.mean(a.data, axis=axis, keepdims=keepdims),
        (a,),
        lambda g: (_expand(g, a.shape, axis, keepdims) / np.asarray(n, dtype=a.dtype),),
    )


def max(a: Tensor, axis: Axis = None, keepdims: bool = False) -> Tensor:
    """Maximum; tied maxima share the gradient equally (a subgradient that sums to g)."""
    out = np.max(a.data, axis=axis, keepdims=True)

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        mask = (a.data == out).astype(a.dtype)
        mask /= mask.sum(axis=axis, keepdims=True)
        return (mask * _expand(g, a.shape, axis, keepdims),)

    value = out if keepdims else np.squeeze(out, axis=axis)
    return Tensor._from_op("max", value, (a,), backward)


def exp(a: Tensor) -> Tensor:
    out = np.exp(a.data)
    return Tensor._from_op("exp", out, (a,), lambda g: (g * out,))


def log(a: Tensor) -> Tensor:
    return Tensor._from_op("log", np.log(a.data), (a,), lambda g: (g / a.data,))


def sqrt(a: Tensor) -> Tensor:
    out = np.sqrt(a.data)
    return Tensor._from_op("sqrt", out, (a,), lambda g: (g / (2 * out),))


class Activation(NamedTuple):
    """An activation on arrays, the one definition its graph op and the fused step share.

    ``forward(z, out)`` gives σ(z) and what σ' needs besides it, writing σ(z) into ``out``
    where it can (the fused step passes z, which it owns; a graph op passes None).
    ``derivative(y, saved)`` gives σ'(z) from y = σ(z), to multiply into the gradient.
    """

    forward: Callable[[np.ndarray, np.ndarray | None], tuple[np.ndarray, Any]]
    derivative: Callable[[np.ndarray, Any], np.ndarray]


def stable_sigmoid(x: np.ndarray) -> np.ndarray:
    """1 / (1 + e^-x) without overflow for large |x| (uses e^-|x| only)."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


_GELU_C = math.sqrt(2 / math.pi)


def _gelu(z: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    """GELU, tanh approximation (NumPy has no erf); keeps z and the tanh term for σ'."""
    t = np.tanh(_GELU_C * (z + 0.044715 * z**3))
    return 0.5 * z * (1 + t), (z, t)


def _gelu_derivative(y: np.ndarray, saved: tuple[np.ndarray, ...]) -> np.ndarray:
    z, t = saved
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * 0.044715 * z * z)


def leaky_relu_rule(alpha: float) -> Activation:
    """z where z > 0, else alpha·z: the slope it multiplies by is its derivative."""

    def forward(z: np.ndarray, out: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        slope = np.where(z > 0, z.dtype.type(1), z.dtype.type(alpha))
        return np.multiply(z, slope, out=out), slope

    return Activation(forward, lambda y, slope: slope)


# relu'(0) is taken as 0 (leaky_relu's as alpha), as in every mainstream framework;
# the graph's maximum(a, 0) would instead split the gradient at the tie.
ACTIVATION_RULES = {
    "relu": Activation(lambda z, out: (np.maximum(z, 0, out=out), None), lambda y, _: y > 0),
    "leaky_relu": leaky_relu_rule(0.01),
    "sigmoid": Activation(lambda z, out: (stable_sigmoid(z), None), lambda y, _: y * (1 - y)),
    "tanh": Activation(lambda z, out: (np.tanh(z, out=out), None), lambda y, _: 1 - y * y),
    "gelu": Activation(_gelu, _gelu_derivative),
}


def _activation(name: str, a: Tensor, rule: Activation | None = None) -> Tensor:
    """The graph node of an activation, built from its rule."""
    rule = rule or ACTIVATION_RULES[name]
    out, saved = rule.forward(a.data, None)
    return Tensor._from_op(name, out, (a,), lambda g: (g * rule.derivative(out, saved),))


def tanh(a: Tensor) -> Tensor:
    return _activation("tanh", a)


def sigmoid(a: Tensor) -> Tensor:
    return _activation("sigmoid", a)


def relu(a: Tensor) -> Tensor:
    return _activation("relu", a)


def leaky_relu(a: Tensor, alpha: float = 0.01) -> Tensor:
    return _activation("leaky_relu", a, leaky_relu_rule(alpha))


def gelu(a: Tensor) -> Tensor:
    return _activation("gelu", a)


def reshape(a: Tensor, *shape: Any) -> Tensor:
    new_shape = shape[0] if len(shape) == 1 and isinstance(shape[0], tuple | list) else shape
    return Tensor._from_op(
        "reshape", a.data.reshape(new_shape), (a,), lambda g: (g.reshape(a.shape),)
    )


def transpose(a: Tensor, axes: tuple[int, ...] | None = None) -> Tensor:
    inverse = None if axes is None else tuple(np.argsort(axes))
    return Tensor._from_op(
        "transpose",
        np.transpose(a.data, axes),
        (a,),
        lambda g: (np.transpose(g, inverse),),
    )


def getitem(a: Tensor, index: Any) -> Tensor:
    if isinstance(index, Tensor):
        index = index.data

    def backward(g: np.ndarray) -> tuple[np.ndarray]:
        grad = np.zeros_like(a.data)
        np.add.at(grad, index, g)  # repeated indices accumulate
        return (grad,)

    return Tensor._from_op("getitem", a.data[index], (a,), backward)


def maximum(a: ArrayLike, b: ArrayLike) -> Tensor:
    """Elementwise maximum; where a == b each side gets half the gradient."""
    a, b = _binary(a, b)
    share = np.where(a.data > b.data, 1.0, np.where(a.data == b.data, 0.5, 0.0)).astype(
        np.result_type(a.dtype, b.dtype)
    )
    return Tensor._from_op(
        "maximum",
        np.maximum(a.data, b.data),
        (a, b),
        lambda g: (_unbroadcast(g * share, a.shape), _unbroadcast(g * (1 - share), b.shape)),
    )


def clip(a: Tensor, low: float | None, high: float | None) -> Tensor:
    """Clamp to [low, high]; the gradient passes only where the value was inside."""
    out = np.clip(a.data, low, high)
    inside = np.ones(a.shape, dtype=bool)
    if low is not None:
        inside &= a.data >= low
    if high is not None:
        inside &= a.data <= high
    return Tensor._from_op("clip", out, (a,), lambda g: (g * inside,))


def log_softmax(a: Tensor, axis: int = -1) -> Tensor:
    """log(softmax(a)), computed as a - max - log Σ exp(a - max) so it never overflows."""
    shifted = a.data - np.max(a.data, axis=axis, keepdims=True)
    out = shifted - np.log(np.sum(np.exp(shifted), axis=axis, keepdims=True))
    softmax_values = np.exp(out)
    return Tensor._from_op(
        "log_softmax",
        out,
        (a,),
        lambda g: (g - softmax_values * np.sum(g, axis=axis, keepdims=True),),
    )


def softmax(a: Tensor, axis: int = -1) -> Tensor:
    shifted = np.exp(a.data - np.max(a.data, axis=axis, keepdims=True))
    out = shifted / np.sum(shifted, axis=axis, keepdims=True)
    return Tensor._from_op(
        "softmax",
        out,
        (a,),
        lambda g: (out * (g - np.sum(g * out, axis=axis, keepdims=True)),),
    )


def _attach() -> None:
    """Give Tensor its operators and methods, all backed by the rules above."""
    t = Tensor
    t.__add__ = add  # type: ignore[method-assign,assignment]
    t.__radd__ = lambda self, other: add(other, self)  # type: ignore[method-assign]
    t.__sub__ = sub  # type: ignore[method-assign,assignment]
    t.__rsub__ = lambda self, other: sub(other, self)  # type: ignore[method-assign]
    t.__mul__ = mul  # type: ignore[method-assign,assignment]
    t.__rmul__ = lambda self, other: mul(other, self)  # type: ignore[method-assign]
    t.__truediv__ = div  # type: ignore[method-assign,assignment]
    t.__rtruediv__ = lambda self, other: div(other, self)  # type: ignore[method-assign]
    t.__matmul__ = matmul  # type: ignore[method-assign,assignment]
    t.__rmatmul__ = lambda self, other: matmul(other, self)  # type: ignore[method-assign]
    t.__pow__ = power  # type: ignore[method-assign,assignment]
    t.__rpow__ = lambda self, other: power(other, self)  # type: ignore[method-assign]
    t.__neg__ = neg  # type: ignore[method-assign,assignment]
    t.__getitem__ = getitem  # type: ignore[method-assign,assignment]
    for name, fn in {
        "sum": sum,
        "mean": mean,
        "max": max,
        "exp": exp,
        "log": log,
        "sqrt": sqrt,
        "tanh": tanh,
        "sigmoid": sigmoid,
        "relu": relu,
        "leaky_relu": leaky_relu,
        "gelu": gelu,
        "reshape": reshape,
        "transpose": transpose,
        "maximum": maximum,
        "clip": clip,
        "log_softmax": log_softmax,
        "softmax": softmax,
    }.items():
        setattr(t, name, fn)
    t.T = property(lambda self: transpose(self))  # type: ignore[attr-defined]


_attach()
