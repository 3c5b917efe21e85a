"""What the parameter servers do with a step's gradients, in this process (local mode).

With ``compression`` "none" the gradients are summed in worker order, the last fused
with the division, as one server sums them. With a lossy codec each worker encodes its
gradient with its own error-feedback residual, once per server range (a job over S
servers has S ranges, cut as ``ShardedClient`` cuts them), and each range's payloads are
decoded into that range's sum in worker order: the code the workers' clients and the
servers run, so local mode and the Ray backend give the same weights for every codec.
A ``pull_compression`` codec is applied to the weights the workers compute on.
"""

from __future__ import annotations

import itertools

import numpy as np

from gradfleet.nn.reduce import GradientSum
from gradfleet.proto.codecs import Codec, Residual
from gradfleet.proto.partition import partition
from gradfleet.proto.wire import DEFAULT_CHUNK_BYTES, FlatLayout


class LocalExchange:
    """The sums of one job's steps; `workers` residuals per range for a lossy codec."""

    def __init__(
        self, layout: FlatLayout, workers: int, servers: int, compression: str, pull: str
    ) -> None:
        self.codec, self.pull = Codec.parse(compression), Codec.parse(pull)
        size, dtype = layout.total_elements, layout.dtype
        self.size, self.dtype = size, dtype
        if self.codec.name == "none" or servers == 1:
            bounds: tuple[int, ...] = (0, size)
        else:
            bounds = partition(layout, servers, DEFAULT_CHUNK_BYTES).bounds
        self.ranges = list(itertools.pairwise(bounds))
        self.sums = [GradientSum(hi - lo, dtype) for lo, hi in self.ranges]
        self.residuals = [
            [Residual(self.codec, hi - lo, dtype) for lo, hi in self.ranges] for _ in range(workers)
        ]
        self.mean_buffer = np.empty(size, dtype)

    def weights_seen(self, weights: np.ndarray, out: np.ndarray) -> np.ndarray:
        """The weights as the workers receive them (through the pull codec), in `out`."""
        if self.pull.name == "none":
            np.copyto(out, weights)
        else:
            for place, values in self.pull.parts(self.pull.encode(weights), self.size, self.dtype):
                out[place] = values
        return out

    def reset(self, worker: int) -> None:
        """A worker that joins starts with a zero residual, as a new Ray worker does."""
        for residual in self.residuals[worker]:
            residual.values.fill(0)

    def begin(self) -> None:
        for total in self.sums:
            total.clear()

    def add(self, worker: int, grad: np.ndarray, last: bool) -> np.ndarray | None:
        """Add `worker`'s gradient; for the step's `last` one, return the mean (None if the
        sum overflowed). `grad` must not change before the mean is used."""
        if self.codec.name == "none":
            (total,) = self.sums
            if not last:
                total.add(grad)
                return None
            return total.mean(last=grad)
        for (lo, hi), total, residual in zip(
            self.ranges, self.sums, self.residuals[worker], strict=True
        ):
            payload = residual.encode(grad[lo:hi])
            total.add_parts(self.codec.parts(payload, hi - lo, self.dtype), self.codec.dense)
        if not last:
            return None
        for (lo, hi), total in zip(self.ranges, self.sums, strict=True):
            mean = total.mean()
            if mean is None:
                return None
            self.mean_buffer[lo:hi] = mean
        return self.mean_buffer
