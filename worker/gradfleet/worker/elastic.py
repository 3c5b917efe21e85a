"""Which rows each member of an elastic job computes on, step by step.

A job whose workers may change (``min_workers`` < ``max_workers``) reads its data as one
stream: epoch e is the permutation ``default_rng([seed, e]).permutation(rows)`` of every
training row, and every step takes the next rows of it, split evenly over the members
the step began with (their ``planned`` set), in worker-id order:

* ``elastic_batch = "global"``: step s takes rows [i·B, (i + 1)·B) of its epoch's
  permutation, i = s mod (rows // B); the global batch B stays, the rows per worker change
  with the members (B must divide evenly), so the learning rate keeps its meaning.
* ``"per_worker"``: each member takes r rows, so step s takes r × (members) rows, from
  where step s - 1 stopped; the global batch grows and shrinks with the members (scale the
  learning rate yourself if you want it to follow).

So an epoch still covers every row once, and the plan depends only on (seed, the events
of the job's membership), which the job's history records: local mode replays it.

Async jobs: each member reads its own share of the epoch's permutation (the rows split
evenly over the current members), batch by batch in its own step count.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

POLICIES = ("global", "per_worker")


@dataclass(frozen=True)
class Change:
    """A membership event: from step `version` the members are `members`; `mid_step`: it
    came after that step began (its rows were planned over the members before)."""

    version: int
    members: tuple[int, ...]
    mid_step: bool = False


@dataclass(frozen=True)
class Timeline:
    """A job's members over its steps: the first members, then every change."""

    initial: tuple[int, ...]
    changes: tuple[Change, ...] = ()

    def members(self, step: int) -> tuple[int, ...]:
        """The members step `step` closes over."""
        members = self.initial
        for change in self.changes:
            if change.version <= step:
                members = change.members
        return members

    def planned(self, step: int) -> tuple[int, ...]:
        """The members step `step` began with: its rows are split over them."""
        members = self.initial
        for change in self.changes:
            if change.version < step or (change.version == step and not change.mid_step):
                members = change.members
        return members

    def rows_before(self, step: int, per_worker: int) -> int:
        """Rows the per-worker plan has handed out before step `step`."""
        starts = {c.version + c.mid_step for c in self.changes} | {0, step}
        points = sorted(p for p in starts if p <= step)
        return sum(
            (stop - start) * per_worker * len(self.planned(start))
            for start, stop in itertools.pairwise(points)
        )


def timeline_of(info: Any) -> Timeline:
    """A job's timeline from its JobInfo (`members` and `membership`)."""
    events = list(info.membership)
    initial = tuple(events[0].old) if events else tuple(info.members)
    changes = tuple(Change(e.version, tuple(e.new), e.mid_step) for e in events)
    return Timeline(initial, changes)


class ElasticPlan:
    """Rows of `rows` training rows for (step, worker), as the module docstring says."""

    def __init__(self, seed: int, rows: int, policy: str, batch: int) -> None:
        """`batch`: the global batch ("global") or each member's rows ("per_worker")."""
        if policy not in POLICIES:
            raise ValueError(f"elastic_batch must be one of {POLICIES}, got {policy!r}")
        self.seed, self.rows, self.policy, self.batch = seed, rows, policy, batch
        self._epochs: dict[int, np.ndarray] = {}  # the few epochs steps are reading

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            if len(self._epochs) >= 3:
                del self._epochs[min(self._epochs)]
            self._epochs[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.rows)
        return self._epochs[epoch]

    def _stream(self, start: int, count: int) -> np.ndarray:
        """Rows [start, start + count) of the epochs' permutations one after another."""
        parts, position = [], start
        while position < start + count:
            epoch, offset = divmod(position, self.rows)
            take = min(self.rows - offset, start + count - position)
            parts.append(self._epoch(epoch)[offset : offset + take])
            position += take
        return np.concatenate(parts) if len(parts) != 1 else parts[0]

    def indices(self, step: int, worker: int, timeline: Timeline) -> np.ndarray:
        """Worker `worker`'s rows of sync step `step`."""
        members = timeline.planned(step)
        rank, count = members.index(worker), len(members)
        if self.policy == "global":
            per_epoch = self.rows // self.batch
            epoch, i = divmod(step, per_epoch)
            share = self.batch // count
            start = i * self.batch + rank * share
            return self._epoch(epoch)[start : start + share]
        start = timeline.rows_before(step, self.batch) + rank * self.batch
        return self._stream(start, self.batch)

    def async_indices(self, own_step: int, worker: int, members: Sequence[int]) -> np.ndarray:
        """Worker `worker`'s rows of its own step `own_step` in an async job."""
        rank, count = list(members).index(worker), len(members)
        per_worker = self.batch // count if self.policy == "global" else self.batch
        share = self.rows // count
        per_epoch = max(1, share // per_worker)
        epoch, i = divmod(own_step, per_epoch)
        start = rank * share + i * per_worker
        return self._epoch(epoch)[start : start + per_worker]
