"""Tensor: an ndarray that records the operations applied to it, for reverse-mode autodiff.

Each op (see ``ops.py``) builds its output node with a local backward closure that
captures exactly the forward values it needs; ``backward()`` walks one topological order
in reverse and accumulates with ``+=``, so a node used on several paths gets every
contribution (the chain rule for several arguments). The graph is for teaching,
``explain()`` and checking; training runs the fused ``MLP.loss_and_grads`` instead.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

ArrayLike = Any
BackwardFn = Callable[[np.ndarray], Sequence[np.ndarray | None]]

_creation_order = itertools.count()
_grad_mode = threading.local()


def is_grad_enabled() -> bool:
    """Whether new operations are recorded in the graph (False inside ``no_grad()``)."""
    return getattr(_grad_mode, "enabled", True)


@contextlib.contextmanager
def no_grad() -> Iterator[None]:
    """Run inference without recording a graph: nothing is kept for backward."""
    previous = is_grad_enabled()
    _grad_mode.enabled = False
    try:
        yield
    finally:
        _grad_mode.enabled = previous


class Tensor:
    """A NumPy array plus the graph edge that produced it."""

    __slots__ = ("_backward", "_id", "_parents", "data", "grad", "name", "op", "requires_grad")
    __array_priority__ = 100  # make ndarray <op> Tensor call our reflected operators

    def __init__(
        self,
        data: ArrayLike,
        requires_grad: bool = False,
        name: str | None = None,
        dtype: Any = None,
    ) -> None:
        array = data.data if isinstance(data, Tensor) else np.asarray(data, dtype=dtype)
        if array.dtype.kind in "iub" and requires_grad:
            raise ValueError(
                f"a tensor that requires grad must be floating point, got dtype {array.dtype}"
            )
        self.data: np.ndarray = array
        self.grad: np.ndarray | None = None
        self.requires_grad = requires_grad
        self.name = name
        self.op = ""
        self._parents: tuple[Tensor, ...] = ()
        self._backward: BackwardFn | None = None
        self._id = next(_creation_order)

    @classmethod
    def _from_op(
        cls, op: str, data: np.ndarray, parents: tuple[Tensor, ...], backward: BackwardFn
    ) -> Tensor:
        out = cls(data)
        if is_grad_enabled() and any(p.requires_grad for p in parents):
            out.requires_grad = True
            out.op = op
            out._parents = parents
            out._backward = backward
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return not self._parents

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def detach(self) -> Tensor:
        return Tensor(self.data)

    def zero_grad(self) -> None:
        self.grad = None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        label = f", name={self.name!r}" if self.name else ""
        grad = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({self.data!r}{grad}{label})"

    def topological_order(self) -> list[Tensor]:
        """Every node this tensor depends on, each after its parents (iterative DFS)."""
        order: list[Tensor] = []
        visited: set[int] = set()
        stack: list[tuple[Tensor, bool]] = [(self, False)]
        while stack:
            node, parents_done = stack.pop()
            if parents_done:
                order.append(node)
                continue
            if id(node) in visited:
                continue
            visited.add(id(node))
            stack.append((node, True))
            stack.extend((p, False) for p in node._parents if id(p) not in visited)
        return order

    def backward(self, grad: ArrayLike | None = None, retain_graph: bool = False) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's ``.grad``.

        A scalar seeds 1; a non-scalar needs the upstream gradient ``grad`` of its shape.
        The graph's closures (and the forward values they hold) are freed afterwards unless
        ``retain_graph`` is set, in which case inner nodes keep their ``.grad`` too.
        """
        grads = gradients(self, grad)
        assigned: set[int] = set()
        for node in self.topological_order():
            if node.is_leaf or retain_graph:
                g = grads.get(id(node))
                if g is not None and node.requires_grad:
                    # Rules may pass one array to several inputs or return read-only
                    # broadcast views; each .grad must own its memory.
                    if id(g) in assigned or not g.flags.writeable:
                        g = np.array(g)
                    assigned.add(id(g))
                    node.grad = g if node.grad is None else node.grad + g
            if not retain_graph and not node.is_leaf:
                node._parents, node._backward = (), None

    if TYPE_CHECKING:  # the operators are attached by ops.py, next to their derivative rules

        def __add__(self, other: ArrayLike) -> Tensor: ...
        def __radd__(self, other: ArrayLike) -> Tensor: ...
        def __sub__(self, other: ArrayLike) -> Tensor: ...
        def __rsub__(self, other: ArrayLike) -> Tensor: ...
        def __mul__(self, other: ArrayLike) -> Tensor: ...
        def __rmul__(self, other: ArrayLike) -> Tensor: ...
        def __truediv__(self, other: ArrayLike) -> Tensor: ...
        def __rtruediv__(self, other: ArrayLike) -> Tensor: ...
        def __matmul__(self, other: ArrayLike) -> Tensor: ...
        def __rmatmul__(self, other: ArrayLike) -> Tensor: ...
        def __pow__(self, other: ArrayLike) -> Tensor: ...
        def __rpow__(self, other: ArrayLike) -> Tensor: ...
        def __neg__(self) -> Tensor: ...
        def __getitem__(self, index: Any) -> Tensor: ...


def gradients(output: Tensor, seed: ArrayLike | None = None) -> dict[int, np.ndarray]:
    """d(output)/d(node) for every node of output's graph, keyed by ``id(node)``."""
    if not output.requires_grad:
        raise ValueError(
            "backward() needs a tensor that depends on an input with requires_grad=True"
        )
    if seed is None:
        if output.data.size != 1:
            raise ValueError(
                f"backward() on a non-scalar of shape {output.shape} needs the upstream "
                "gradient: pass grad= with the same shape"
            )
        seed_array = np.ones_like(output.data)
    else:
        seed_array = np.array(seed, dtype=output.dtype)  # a copy: a leaf's .grad may be it
        if seed_array.shape != output.shape:
            raise ValueError(
                f"upstream gradient has shape {seed_array.shape}, expected {output.shape}"
            )
    grads: dict[int, np.ndarray] = {id(output): seed_array}
    for node in reversed(output.topological_order()):
        g = grads.get(id(node))
        if node._backward is None and node.op:
            raise ValueError(
                f"the graph behind a {node.op!r} node was freed by an earlier backward(); "
                "pass retain_graph=True to the first backward() to run through it again"
            )
        if g is None or node._backward is None:
            continue
        for parent, parent_grad in zip(node._parents, node._backward(g), strict=True):
            if parent_grad is None or not parent.requires_grad:
                continue
            key = id(parent)
            if key in grads:
                grads[key] = grads[key] + parent_grad
            else:
                grads[key] = parent_grad
    return grads
