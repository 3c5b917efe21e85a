"""Layers as modules with named parameters: Linear, activations, Sequential."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from gradfleet.nn import ops
from gradfleet.nn.tensor import Tensor

FLOAT_DTYPES = ("float32", "float64")


def check_dtype(dtype: Any) -> np.dtype:
    """The model dtype as np.dtype; only float32 and float64 are supported."""
    resolved = np.dtype(dtype)
    if resolved.name not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32 or float64, got {resolved.name}")
    return resolved


class Module:
    """A callable with named parameters and named child modules, both in a fixed order."""

    def __init__(self) -> None:
        self._parameters: dict[str, Tensor] = {}
        self._children: dict[str, Module] = {}

    def forward(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Any) -> Tensor:
        return self.forward(x if isinstance(x, Tensor) else Tensor(x))

    def named_parameters(self, prefix: str = "") -> Iterator[tuple[str, Tensor]]:
        for name, param in self._parameters.items():
            yield prefix + name, param
        for child_name, child in self._children.items():
            yield from child.named_parameters(f"{prefix}{child_name}.")

    def parameters(self) -> list[Tensor]:
        return [p for _, p in self.named_parameters()]

    def zero_grad(self) -> None:
        for p in self.parameters():
            p.grad = None

    def state_dict(self) -> dict[str, np.ndarray]:
        """A copy of every parameter array, by name."""
        return {name: p.data.copy() for name, p in self.named_parameters()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Copy arrays into the parameters in place, after checking names, shapes and dtypes.

        Nothing is changed unless every entry matches.
        """
        params = dict(self.named_parameters())
        missing = sorted(set(params) - set(state))
        unexpected = sorted(set(state) - set(params))
        if missing or unexpected:
            raise ValueError(
                f"state dict does not match the model: missing {missing}, unexpected {unexpected}"
            )
        arrays = {name: np.asarray(value) for name, value in state.items()}
        for name, param in params.items():
            given = arrays[name]
            if given.shape != param.shape:
                raise ValueError(
                    f"parameter {name!r}: expected shape {param.shape}, got {given.shape}"
                )
            if given.dtype != param.dtype:
                raise ValueError(
                    f"parameter {name!r}: expected dtype {param.dtype}, got {given.dtype}"
                )
            if not np.all(np.isfinite(given)):
                raise ValueError(f"parameter {name!r}: contains NaN or Inf values")
        for name, param in params.items():
            param.data[...] = arrays[name]


class Linear(Module):
    """y = x Wᵀ + b with W of shape (out_features, in_features), as in z = W z_prev + b."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dtype: Any = "float32",
        init: str = "he",
        rng: np.random.Generator | None = None,
        storage: np.ndarray | None = None,
    ) -> None:
        """``storage``, when given, is a flat slice of in*out + out elements that holds
        the weight then the bias (an MLP keeps all its parameters in one buffer)."""
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(
                f"Linear needs positive sizes, got in={in_features}, out={out_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        dtype = check_dtype(dtype)
        rng = rng if rng is not None else np.random.default_rng(0)
        if init not in ("he", "xavier"):
            raise ValueError(f"unknown init {init!r}: use 'he' or 'xavier'")
        # He (Kaiming) normal keeps activations' variance for ReLU-family units; Glorot
        # uniform suits sigmoid and tanh. Drawn in float64 so float32 and float64 models
        # start from the same values, a block of rows at a time (the same stream of
        # numbers) so that a big layer needs no float64 temporary of its full size.
        std = np.sqrt(2.0 / in_features)
        limit = np.sqrt(6.0 / (in_features + out_features))
        n_weight = out_features * in_features
        if storage is None:
            storage = np.empty(n_weight + out_features, dtype=dtype)
        if storage.shape != (n_weight + out_features,) or storage.dtype != dtype:
            raise ValueError(
                f"storage must be a flat {dtype} array of {n_weight + out_features} elements"
            )
        weight = storage[:n_weight].reshape(out_features, in_features)
        block = max(1, (1 << 20) // in_features)
        for row in range(0, out_features, block):
            shape = (min(block, out_features - row), in_features)
            part = (
                rng.normal(0.0, std, shape) if init == "he" else rng.uniform(-limit, limit, shape)
            )
            weight[row : row + block] = part
        self.weight = Tensor(weight, requires_grad=True)
        storage[n_weight:] = 0
        self.bias = Tensor(storage[n_weight:], requires_grad=True)
        self._parameters = {"weight": self.weight, "bias": self.bias}

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Linear expected {self.in_features} input features, got shape {x.shape}"
            )
        if x.dtype != self.weight.dtype and not x.requires_grad:
            x = Tensor(x.data.astype(self.weight.dtype))  # compute in the model's dtype
        return x @ ops.transpose(self.weight) + self.bias


class Sigmoid(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.sigmoid(x)


class ReLU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.relu(x)


class LeakyReLU(Module):
    def __init__(self, alpha: float = 0.01) -> None:
        super().__init__()
        if not 0 <= alpha < 1:
            raise ValueError(f"LeakyReLU alpha must be in [0, 1), got {alpha}")
        self.alpha = alpha

    def forward(self, x: Tensor) -> Tensor:
        return ops.leaky_relu(x, self.alpha)


class Tanh(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.tanh(x)


class GELU(Module):
    def forward(self, x: Tensor) -> Tensor:
        return ops.gelu(x)


def activation_module(name: str, alpha: float = 0.01) -> Module:
    """The layer of an activation named as in ``ops.ACTIVATION_RULES``."""
    if name == "leaky_relu":
        return LeakyReLU(alpha)
    return {"relu": ReLU, "sigmoid": Sigmoid, "tanh": Tanh, "gelu": GELU}[name]()


class Sequential(Module):
    """Applies its modules in order; parameters are named ``<index>.<name>``."""

    def __init__(self, *modules: Module) -> None:
        super().__init__()
        self._children = {str(i): m for i, m in enumerate(modules)}

    def __getitem__(self, index: int) -> Module:
        return list(self._children.values())[index]

    def __len__(self) -> int:
        return len(self._children)

    def forward(self, x: Tensor) -> Tensor:
        for module in self._children.values():
            x = module(x)
        return x
