"""Deterministic sharding and per-step batches."""

from __future__ import annotations

import numpy as np
import pytest

from gradfleet.worker.batches import BatchPlan, shard_rows, steps_per_epoch


def test_shards_are_equal_disjoint_and_cover_all_but_the_remainder() -> None:
    bounds = [shard_rows(103, shard, 4) for shard in range(4)]

    rows = np.concatenate([np.arange(a, b) for a, b in bounds])

    assert [b - a for a, b in bounds] == [25] * 4
    assert len(np.unique(rows)) == len(rows) == 100


def test_batches_depend_only_on_seed_step_and_worker() -> None:
    first = BatchPlan(seed=7, worker=1, shard_size=50, rows_per_worker=8)
    second = BatchPlan(seed=7, worker=1, shard_size=50, rows_per_worker=8)

    forward = [first.indices(step).tolist() for step in range(20)]
    backward = [second.indices(step).tolist() for step in reversed(range(20))][::-1]

    assert forward == backward
    assert BatchPlan(7, 0, 50, 8).indices(3).tolist() != forward[3]


def test_an_epoch_visits_each_row_at_most_once_and_reshuffles() -> None:
    plan = BatchPlan(seed=0, worker=0, shard_size=40, rows_per_worker=8)

    epoch0 = np.concatenate([plan.indices(step) for step in range(5)])
    epoch1 = np.concatenate([plan.indices(step) for step in range(5, 10)])

    assert sorted(epoch0.tolist()) == list(range(40))
    assert sorted(epoch1.tolist()) == list(range(40))
    assert plan.indices(0).tolist() != plan.indices(5).tolist()


def test_too_few_rows_for_a_batch_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="only 10"):
        steps_per_epoch(10, 16)
    with pytest.raises(ValueError, match="cannot be split"):
        shard_rows(3, 0, 4)
