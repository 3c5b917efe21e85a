"""The multi-layer perceptron: z_i = σ(W_i z_{i-1} + b_i), with a fused training step.

``MLP`` is an ordinary ``Sequential`` on the graph (``model(x)`` builds a graph you can
``backward()``), and it also keeps every parameter in one contiguous buffer so the
parameter server and the wire can move it without copies. ``loss_and_grads`` is the
fused fast path: the same forward and backward written as the minimal NumPy matrix
products and elementwise work, with no graph, writing the gradient into one flat buffer.
tests/nn/test_mlp.py checks it against the graph.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradfleet.nn import ops
from gradfleet.nn.layers import (
    GELU,
    LeakyReLU,
    Linear,
    Module,
    ReLU,
    Sequential,
    Sigmoid,
    Tanh,
    check_dtype,
)
from gradfleet.nn.losses import LOSSES, check_labels, check_targets
from gradfleet.nn.tensor import Tensor

ACTIVATIONS = ("relu", "leaky_relu", "sigmoid", "tanh", "gelu")
_INIT_FOR = {"relu": "he", "leaky_relu": "he", "gelu": "he", "sigmoid": "xavier", "tanh": "xavier"}

Layout = list[tuple[str, tuple[int, ...], int]]


def parameter_count(sizes: Sequence[int]) -> int:
    """How many weights and biases an MLP of these layer sizes has, without building it."""
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


class MLP(Module):
    """Linear layers of ``sizes`` with ``activation`` between them and raw outputs (logits)."""

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        seed: int = 0,
        dtype: Any = "float32",
        alpha: float = 0.01,
    ) -> None:
        super().__init__()
        sizes = [int(s) for s in sizes]
        if len(sizes) < 2 or any(s < 1 for s in sizes):
            raise ValueError(
                f"MLP sizes must list at least an input and an output size, all positive; "
                f"got {sizes}"
            )
        if activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {activation!r}: choose one of {ACTIVATIONS}")
        self.sizes, self.activation, self.seed, self.alpha = sizes, activation, int(seed), alpha
        self.dtype = check_dtype(dtype)
        rng = np.random.default_rng(self.seed)
        # every parameter lives in one contiguous buffer (what the server and the wire
        # move): each Linear is built on its slice, weight then bias, in layer order
        self.flat = np.empty(parameter_count(sizes), self.dtype)
        self.layout: Layout = []
        modules: list[Module] = []
        offset = 0
        for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
            storage = self.flat[offset : offset + fan_in * fan_out + fan_out]
            linear = Linear(fan_in, fan_out, self.dtype, _INIT_FOR[activation], rng, storage)
            modules.append(linear)
            for kind, param in (("weight", linear.weight), ("bias", linear.bias)):
                self.layout.append((f"layers.{len(modules) - 1}.{kind}", param.shape, offset))
                offset += param.size
            if i < len(sizes) - 2:
                modules.append(_activation_module(activation, alpha))
        self.layers = Sequential(*modules)
        self._children = {"layers": self.layers}
        self.linears = [m for m in modules if isinstance(m, Linear)]
        assert [name for name, *_ in self.layout] == [n for n, _ in self.named_parameters()]

    @property
    def num_parameters(self) -> int:
        return self.flat.size

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Views of a flat buffer laid out like the parameters, by name."""
        if flat.shape != self.flat.shape:
            raise ValueError(f"flat buffer must have shape {self.flat.shape}, got {flat.shape}")
        return {
            name: flat[start : start + math.prod(shape)].reshape(shape)
            for name, shape, start in self.layout
        }

    def spec(self) -> dict[str, Any]:
        """A JSON-serialisable description that rebuilds this model (initial weights included)."""
        spec: dict[str, Any] = {
            "type": "MLP",
            "sizes": list(self.sizes),
            "activation": self.activation,
            "seed": self.seed,
            "dtype": self.dtype.name,
        }
        if self.activation == "leaky_relu":
            spec["alpha"] = self.alpha
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MLP:
        """Rebuild a model from ``spec()``; unknown or missing keys raise ValueError."""
        if not isinstance(spec, dict) or spec.get("type") != "MLP":
            raise ValueError(f"not an MLP spec (expected a dict with type 'MLP'): {spec!r}")
        allowed = {"type", "sizes", "activation", "seed", "dtype", "alpha"}
        unknown = sorted(set(spec) - allowed)
        if unknown:
            raise ValueError(f"unknown MLP spec keys {unknown}; allowed: {sorted(allowed)}")
        if "sizes" not in spec:
            raise ValueError("MLP spec needs 'sizes', e.g. [784, 256, 10]")
        return cls(
            spec["sizes"],
            activation=spec.get("activation", "relu"),
            seed=spec.get("seed", 0),
            dtype=spec.get("dtype", "float32"),
            alpha=spec.get("alpha", 0.01),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Outputs (logits) for a batch, without building a graph."""
        h = self._check_inputs(x)
        last = len(self.linears) - 1
        for i, layer in enumerate(self.linears):
            h = h @ layer.weight.data.T
            h += layer.bias.data
            if i < last:
                h = self._activate(h)[0]
        return h

    def loss_and_grads(
        self,
        x: np.ndarray,
        y: np.ndarray,
        loss: str = "cross_entropy",
        out: np.ndarray | None = None,
    ) -> tuple[float, np.ndarray]:
        """Mean loss on (x, y) and its gradient as one flat array laid out like ``flat``.

        The fused fast path: one matrix product per layer forward and two backward (none
        for the input's gradient), activations' derivatives from stored outputs.
        """
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: choose one of {LOSSES}")
        h = self._check_inputs(x)
        rows = h.shape[0]
        grads = np.empty_like(self.flat) if out is None else out
        if grads.shape != self.flat.shape or grads.dtype != self.dtype:
            raise ValueError(
                f"out must be a {self.dtype} array of shape {self.flat.shape}, "
                f"got {grads.dtype} {grads.shape}"
            )

        inputs: list[np.ndarray] = []  # the input of each linear layer, (B, in)
        saved: list[np.ndarray | None] = []  # what each activation's derivative needs
        last = len(self.linears) - 1
        for i, layer in enumerate(self.linears):
            inputs.append(h)
            h = h @ layer.weight.data.T  # (B, out)
            h += layer.bias.data
            if i < last:
                h, extra = self._activate(h)
                saved.append(extra)

        value, g = _loss_forward_backward(h, y, loss, rows)
        views = self._grad_views(grads)
        for i in range(last, -1, -1):
            layer = self.linears[i]
            np.matmul(g.T, inputs[i], out=views[2 * i])  # (out, in)
            np.sum(g, axis=0, out=views[2 * i + 1])
            if i > 0:
                g = g @ layer.weight.data  # (B, in)
                self._activation_backward(g, inputs[i], saved[i - 1])
        return value, grads

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_views_of", None)  # a cache that would carry a gradient buffer along
        return state

    def _grad_views(self, grads: np.ndarray) -> list[np.ndarray]:
        """Weight and bias views of a gradient buffer, in layer order (kept for the last
        buffer: a training loop passes the same one every step)."""
        cached = getattr(self, "_views_of", None)
        if cached is None or cached[0] is not grads:
            cached = self._views_of = (grads, list(self.unflatten(grads).values()))
        return cached[1]

    def _check_inputs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"inputs must have shape (batch, {self.sizes[0]}), got {x.shape}")
        return x.astype(self.dtype, copy=False)

    def _activate(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Apply the activation in place where possible; return (output, saved for backward)."""
        act = self.activation
        if act == "relu":
            return np.maximum(z, 0, out=z), None
        if act == "leaky_relu":
            return np.where(z > 0, z, z * self.dtype.type(self.alpha)), None
        if act == "sigmoid":
            return ops.stable_sigmoid(z), None
        if act == "tanh":
            return np.tanh(z, out=z), None
        out, t = ops.gelu_forward(z)
        return out, ops.gelu_derivative(z, t)

    def _activation_backward(
        self, g: np.ndarray, output: np.ndarray, saved: np.ndarray | None
    ) -> None:
        """g *= σ'(z), computed from the activation's output (or saved values), in place."""
        act = self.activation
        if act == "relu":
            g *= output > 0
        elif act == "leaky_relu":
            g *= np.where(output > 0, 1, self.alpha).astype(self.dtype)
        elif act == "sigmoid":
            g *= output * (1 - output)
        elif act == "tanh":
            g *= 1 - output * output
        else:
            g *= saved


def _loss_forward_backward(
    outputs: np.ndarray, y: np.ndarray, loss: str, rows: int
) -> tuple[float, np.ndarray]:
    """The mean loss and d(loss)/d(outputs), in the outputs' dtype."""
    dtype = outputs.dtype
    if loss == "cross_entropy":
        labels = check_labels(y, rows, outputs.shape[1])
        picks = (np.arange(rows), labels)
        shifted = outputs - outputs.max(axis=1, keepdims=True)
        picked = shifted[picks]
        grad = np.exp(shifted, out=shifted)
        sums = grad.sum(axis=1, keepdims=True)
        value = float(np.log(sums).sum() - picked.sum()) / rows if rows else float("nan")
        grad /= sums
        grad[picks] -= 1
        grad /= dtype.type(rows)
        return value, grad
    targets = np.asarray(y, dtype=dtype)
    if targets.ndim == 1 and outputs.shape[1] == 1:
        targets = targets[:, None]
    check_targets(targets, outputs.shape)
    if loss == "mse":
        diff = outputs - targets
        return float(np.mean(diff * diff)), diff * dtype.type(2.0 / diff.size)
    value = np.maximum(outputs, 0) - outputs * targets + np.log1p(np.exp(-np.abs(outputs)))
    grad = ops.stable_sigmoid(outputs) - targets
    grad /= dtype.type(grad.size)
    return float(value.mean()), grad


def _activation_module(name: str, alpha: float) -> Module:
    if name == "leaky_relu":
        return LeakyReLU(alpha)
    return {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU}[name]()
