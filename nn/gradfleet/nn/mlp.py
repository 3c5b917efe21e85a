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
from collections.abc import Callable, Sequence
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


OUTPUTS = ("classes", "binary", "values")


class MLP(Module):
    """Linear layers of ``sizes`` with ``activation`` between them and raw outputs (logits).

    ``preprocessing`` ({"mean": [...], "std": [...]}, one per input) standardises raw
    inputs on every path, so the model takes rows as they come. ``output`` says what the
    outputs mean, for ``predict``: "classes" (logits of one class each: labels), "binary"
    (one logit per yes/no output: 0/1) or "values" (regression).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str = "relu",
        seed: int = 0,
        dtype: Any = "float32",
        alpha: float = 0.01,
        preprocessing: dict[str, Sequence[float]] | None = None,
        output: str = "classes",
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
        if output not in OUTPUTS:
            raise ValueError(f"unknown output {output!r}: choose one of {OUTPUTS}")
        self.sizes, self.activation, self.seed, self.alpha = sizes, activation, int(seed), alpha
        self.dtype, self.output = check_dtype(dtype), output
        self.preprocessing = _scaling(preprocessing, sizes[0], self.dtype)
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
        if self.preprocessing is not None:
            mean, std = self.preprocessing
            x = (x - Tensor(mean)) / Tensor(std)
        return self.layers(x)

    def __repr__(self) -> str:
        return (
            f"MLP(sizes={self.sizes}, activation={self.activation!r}, output={self.output!r}, "
            f"parameters={self.num_parameters:,}, dtype={self.dtype.name})"
        )

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
        if self.preprocessing is not None:
            spec["preprocessing"] = {
                k: v.tolist() for k, v in zip(("mean", "std"), self.preprocessing, strict=True)
            }
        if self.output != "classes":
            spec["output"] = self.output
        return spec

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> MLP:
        """Rebuild a model from ``spec()``; unknown or missing keys raise ValueError."""
        if not isinstance(spec, dict) or spec.get("type") != "MLP":
            raise ValueError(f"not an MLP spec (expected a dict with type 'MLP'): {spec!r}")
        allowed = {
            "type",
            "sizes",
            "activation",
            "seed",
            "dtype",
            "alpha",
            "preprocessing",
            "output",
        }
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
            preprocessing=spec.get("preprocessing"),
            output=spec.get("output", "classes"),
        )

    def predict(self, x: np.ndarray) -> np.ndarray:
        """What the model says of raw rows (a batch, or one row): class labels, 0/1 per
        binary output, or the values of a regression."""
        z = self.logits(x)
        if self.output == "classes":
            return z.argmax(axis=1)
        answer = (z > 0).astype(np.int64) if self.output == "binary" else z
        return answer[:, 0] if answer.shape[1] == 1 else answer

    def predict_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities: of each class (softmax) or of each binary output (sigmoid)."""
        z = self.logits(x)
        if self.output == "values":
            raise ValueError("a regression model has no probabilities; use predict()")
        if self.output == "binary":
            return ops.stable_sigmoid(z)
        e = np.exp(z - z.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)

    def logits(self, x: np.ndarray) -> np.ndarray:
        """The raw outputs for raw rows (a batch, or one row), without building a graph."""
        x = np.asarray(x)
        h = self._check_inputs(x[None, :] if x.ndim == 1 else x)
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
        before_layer: Callable[[int], None] | None = None,
        grads_ready: Callable[[float, int], None] | None = None,
    ) -> tuple[float, np.ndarray]:
        """Mean loss on (x, y) and its gradient as one flat array laid out like ``flat``.

        The fused fast path: one matrix product per layer forward and two backward (none
        for the input's gradient), each activation's derivative from what its forward kept.
        Hooks let communication overlap the computation: ``before_layer(i)`` runs before
        layer i's forward (to wait for its weights), ``grads_ready(loss, i)`` as soon as
        layer i's gradient is written (the last layer first).
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
            if before_layer is not None:
                before_layer(i)
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
            if grads_ready is not None:
                grads_ready(value, i)
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
        """Rows as the first layer takes them: in the model's dtype, standardised."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.sizes[0]:
            raise ValueError(
                f"inputs must have shape (rows, {self.sizes[0]}), got {x.shape}: the model "
                f"takes {self.sizes[0]} features a row"
            )
        if self.preprocessing is None:
            return x.astype(self.dtype, copy=False)
        mean, std = self.preprocessing
        return (x.astype(self.dtype, copy=False) - mean) / std


def _scaling(
    preprocessing: dict[str, Sequence[float]] | None, features: int, dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray] | None:
    """(mean, std) in the model's dtype, checked: one each per input, std positive."""
    if preprocessing is None:
        return None
    try:
        mean = np.asarray(preprocessing["mean"], dtype=dtype)
        std = np.asarray(preprocessing["std"], dtype=dtype)
    except (KeyError, TypeError, ValueError):
        raise ValueError("preprocessing must hold 'mean' and 'std' lists") from None
    if mean.shape != (features,) or std.shape != (features,):
        raise ValueError(f"preprocessing needs a mean and a std for each of {features} inputs")
    if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()):
        raise ValueError("preprocessing needs finite means and positive, finite stds")
    return mean, std
