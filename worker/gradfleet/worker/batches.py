"""Deterministic sharding and batching: worker w's rows for step v depend only on (seed, v, w).

That is what lets any worker (or a restarted one) recompute any step, and what makes the
mean of N equal-sized shard gradients equal the global-batch gradient on every backend.
"""

from __future__ import annotations

import numpy as np


def shard_rows(num_rows: int, shard: int, num_shards: int) -> tuple[int, int]:
    """[start, stop) of shard ``shard``: equal, disjoint, contiguous; the remainder is unused."""
    if not 0 <= shard < num_shards:
        raise ValueError(f"shard index {shard} is out of range for {num_shards} shards")
    size = num_rows // num_shards
    if size < 1:
        raise ValueError(f"{num_rows} training rows cannot be split into {num_shards} shards")
    return shard * size, (shard + 1) * size


def steps_per_epoch(shard_size: int, rows_per_worker: int) -> int:
    """Full batches per pass over one shard (a partial last batch is dropped)."""
    if rows_per_worker > shard_size:
        raise ValueError(
            f"each worker needs {rows_per_worker} rows per step but its shard has only "
            f"{shard_size}: lower batch_size or the number of workers"
        )
    return shard_size // rows_per_worker


class BatchPlan:
    """Which rows of its shard worker ``worker`` uses at each step; shuffled once per epoch."""

    def __init__(self, seed: int, worker: int, shard_size: int, rows_per_worker: int) -> None:
        self.seed, self.worker = seed, worker
        self.shard_size, self.rows = shard_size, rows_per_worker
        self.steps_per_epoch = steps_per_epoch(shard_size, rows_per_worker)
        self._epoch = -1
        self._order = np.empty(0, dtype=np.int64)

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """Row indices into the shard for ``step`` (sorted, so gathers read memory in order)."""
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            rng = np.random.default_rng([self.seed, epoch, self.worker])
            self._order = rng.permutation(self.shard_size)
            self._epoch = epoch
        return np.sort(self._order[position * self.rows : (position + 1) * self.rows])
