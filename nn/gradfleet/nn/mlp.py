"""The multi-layer perceptron: z_i = σ(W_i z_{i-1} + b_i), on two paths to one gradient.

``MLP`` keeps every parameter in one contiguous buffer, which the parameter server and
the wire move without copies. ``loss_and_grads`` is the path training runs: the minimal
NumPy matrix products, no graph, the gradient written into one flat buffer. ``model(x)``
is an ordinary ``Sequential`` on the graph (``Tensor``, ``ops``), for teaching,
``explain()`` and checking (tests/nn/test_mlp.py compares the two). Both paths take each
activation and loss from its one rule in ``ops.ACTIVATION_RULES`` or ``losses.LOSS_RULES``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradfleet.nn import ops
from gradfleet.nn.layers import Linear, Module, Sequential, activation_module, check_dtype
from gradfleet.nn.losses import LOSS_RULES, LOSSES
from gradfleet.nn.tensor import Tensor

ACTIVATIONS = tuple(ops.ACTIVATION_RULES)
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
                modules.append(activation_module(activation, alpha))
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
        activation = self._activation_rule()
        last = len(self.linears) - 1
        for i, layer in enumerate(self.linears):
            h = h @ layer.weight.data.T
            h += layer.bias.data
            if i < last:
                h = activation.forward(h, h)[0]
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
        for the input's gradient), each activation's derivative from what its forward kept.
        """
        if loss not in LOSSES:
            raise ValueError(f"unknown loss {loss!r}: choose one of {LOSSES}")
        h = self._check_inputs(x)
        grads = np.empty_like(self.flat) if out is None else out
        if grads.shape != self.flat.shape or grads.dtype != self.dtype:
            raise ValueError(
                f"out must be a {self.dtype} array of shape {self.flat.shape}, "
                f"got {grads.dtype} {grads.shape}"
            )

        activation = self._activation_rule()
        inputs: list[np.ndarray] = []  # the input of each linear layer, (B, in)
        saved: list[Any] = []  # what each activation's derivative needs
        last = len(self.linears) - 1
        for i, layer in enumerate(self.linears):
            inputs.append(h)
            h = h @ layer.weight.data.T  # (B, out)
            h += layer.bias.data
            if i < last:
                h, kept = activation.forward(h, h)  # h is ours to overwrite
                saved.append(kept)

        if loss != "cross_entropy":  # float targets in the model's dtype; (B,) for one output
            y = np.asarray(y, dtype=self.dtype)
            y = y[:, None] if y.ndim == 1 and h.shape[1] == 1 else y
        value, g = LOSS_RULES[loss](h, y)
        views = self._grad_views(grads)
        for i in range(last, -1, -1):
            layer = self.linears[i]
            np.matmul(g.T, inputs[i], out=views[2 * i])  # (out, in)
            np.sum(g, axis=0, out=views[2 * i + 1])
            if i > 0:
                g = g @ layer.weight.data  # (B, in)
                g *= activation.derivative(inputs[i], saved[i - 1])
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

    def _activation_rule(self) -> ops.Activation:
        if self.activation == "leaky_relu":
            return ops.leaky_relu_rule(self.alpha)
        return ops.ACTIVATION_RULES[self.activation]

    def _check_inputs(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(f"inputs must have shape (batch, {self.sizes[0]}), got {x.shape}")
        return x.astype(self.dtype, copy=False)
