"""The server's optimiser: one pass over the whole flat weight buffer per step.

Every optimiser in `gradfleet.nn.optim` updates each element from that element alone
(its weight, gradient and buffers, and scalars), so running it once over the flat buffer
gives the same numbers, bit for bit, as running it once per parameter, as local mode
does: a handful of NumPy calls per step instead of a handful per parameter. State goes
in and out per parameter ("momentum/W0"), the names checkpoints and local mode use.
"""

from __future__ import annotations

import numpy as np

from gradfleet.nn.optim import Optimizer
from gradfleet.proto.wire import FlatLayout

WHOLE = "all"  # the one parameter the wrapped optimiser sees


class WholeBufferOptimizer:
    """Applies `optimizer` to flat weights (laid out by `layout`) in one pass."""

    def __init__(self, optimizer: Optimizer, layout: FlatLayout) -> None:
        self.optimizer = optimizer
        self.layout = layout

    def step(self, weights: np.ndarray, flat_grad: np.ndarray) -> None:
        """Update `weights` in place from the (already averaged) flat gradient."""
        self.optimizer.step({WHOLE: weights}, {WHOLE: flat_grad})

    def state_dict(self) -> dict[str, np.ndarray]:
        """The optimiser's state per parameter, as `Optimizer.state_dict` names it."""
        state = self.optimizer.state_dict()  # copies, so the views below own their data
        named = {"steps": state.pop("steps")}
        for key, flat in state.items():
            kind = key.partition("/")[0]
            for name, view in self.layout.views(flat).items():
                named[f"{kind}/{name}"] = view
        return named

    def load_state_dict(self, state: dict[str, np.ndarray], weights: np.ndarray) -> None:
        """Restore per-parameter state, checked against the parameters of `weights` it
        names (see `Optimizer.load_state_dict`); nothing changes unless all of it is valid."""
        self.optimizer.load_state_dict(state, self.layout.views(weights))
        named, buffers = self.optimizer.buffers, {}
        for kind in {key.partition("/")[0] for key in named}:
            flat = self.layout.empty()
            for name, view in self.layout.views(flat).items():
                view[...] = named[f"{kind}/{name}"]  # a valid state holds every parameter
            buffers[f"{kind}/{WHOLE}"] = flat
        self.optimizer.buffers = buffers
