"""A job's per-step history, kept as columns: 48 bytes a step, sliced by step number.

A long job applies millions of steps, so the history is two NumPy arrays (48 bytes a
step, up to 72 with room to grow) rather than records: it goes into a checkpoint's `.npz`
as they are, and answers "records from step s" by bisection, a page at a time, so no
answer outgrows a message. Rows are only ever appended, so a snapshot of the first n
rows stays valid while the history grows.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

INT_FIELDS = ("step", "rows", "contributors")
FLOAT_FIELDS = ("loss", "samples_per_sec", "wall_time")


class StepHistory:
    """Append-only records of applied steps, in increasing step order."""

    def __init__(self, ints: np.ndarray | None = None, floats: np.ndarray | None = None) -> None:
        ints = np.zeros((0, 3), np.int64) if ints is None else ints
        floats = np.zeros((0, 3), np.float64) if floats is None else floats
        if (
            ints.ndim != 2
            or ints.shape[1:] != (3,)
            or floats.shape != ints.shape
            or ints.dtype.kind not in "iu"
            or floats.dtype.kind != "f"
        ):
            raise ValueError(
                f"a step history is two (n, 3) arrays of integers and floats, got "
                f"{ints.dtype} {ints.shape} and {floats.dtype} {floats.shape}"
            )
        if len(ints) > 1 and not np.all(np.diff(ints[:, 0]) > 0):
            raise ValueError("the steps of a history must increase")
        self._n = len(ints)
        self._ints = np.array(ints, dtype=np.int64, copy=True)
        self._floats = np.array(floats, dtype=np.float64, copy=True)

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> StepHistory:
        """From dicts with the fields of a StepRecord (checkpoints of format 2)."""
        rows = list(records)
        ints = np.array([[int(r[f]) for f in INT_FIELDS] for r in rows], np.int64).reshape(-1, 3)
        floats = np.array([[float(r[f]) for f in FLOAT_FIELDS] for r in rows], np.float64)
        return cls(ints, floats.reshape(-1, 3))

    def __len__(self) -> int:
        return self._n

    def append(
        self,
        step: int,
        loss: float,
        rows: int,
        samples_per_sec: float,
        wall_time: float,
        contributors: int,
    ) -> None:
        if self._n == len(self._ints):  # grow by half: amortised O(1) appends
            grown = max(64, self._n + self._n // 2)
            self._ints = np.resize(self._ints, (grown, 3))
            self._floats = np.resize(self._floats, (grown, 3))
        self._ints[self._n] = (step, rows, contributors)
        self._floats[self._n] = (loss, samples_per_sec, wall_time)
        self._n += 1

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(ints, floats): views of the filled rows, columns as INT_FIELDS, FLOAT_FIELDS.
        They stay valid (and unchanged) while the history grows."""
        return self._ints[: self._n], self._floats[: self._n]

    def page(self, since: int, limit: int) -> StepPage:
        """A copy of at most `limit` records of steps >= `since`, oldest first, and whether
        more follow. Cheap enough to take under the job's lock; build protos after."""
        ints, floats = self.arrays()
        start = int(np.searchsorted(ints[:, 0], since, side="left"))
        stop = min(self._n, start + max(0, limit))
        return StepPage(ints[start:stop].copy(), floats[start:stop].copy(), stop < self._n)


@dataclass(frozen=True)
class StepPage:
    """Some rows of a StepHistory, copied out, and whether the history goes on."""

    ints: np.ndarray
    floats: np.ndarray
    more: bool
