"""The server's own small types: job states, push outcomes, counters, headers, snapshots.

The gRPC edge translates protobuf to and from these; nothing else in the server sees
protobuf.
"""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field

import numpy as np

from gradfleet.proto.errors import InvalidArgument, Reason
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.history import StepHistory, StepPage
from gradfleet.server.membership import MembershipState
from gradfleet.server.settings import JobSpec


class JobState(enum.Enum):
    RUNNING = "running"
    COMPLETED = "completed"  # version reached total_steps
    STOPPED = "stopped"  # by StopJob, or because the sum of a step overflowed
    DELETED = "deleted"


class PushOutcome(enum.Enum):
    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"  # (job, worker, step) already counted; ignored
    DROPPED_LATE = "dropped_late"  # the step already closed (backup workers) or the job ended
    DROPPED_REMOVED = "dropped_removed"  # the worker is not a member of that step


@dataclass(frozen=True)
class PushHeader:
    """A push's header, as the edge decoded it; the job checks it against its settings."""

    job_id: str
    worker: int
    step: int
    rows: int
    loss: float
    dtype: np.dtype | None  # None: not one we know
    total_bytes: int
    layout: FlatLayout | None  # None: the sender's layout is the job's (or was not sent)
    shard: tuple[int, tuple[int, ...]] | None = None  # (index, bounds) of a sharded push
    codec: str = ""  # what the data is: the payload of this codec ("": the values)


@dataclass
class Counters:
    """Pushes of a job: received == accepted + duplicate + dropped_late + dropped_removed
    + sum(rejected)."""

    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    dropped_late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    dropped_removed: int = 0

    def count(self, outcome: PushOutcome) -> None:
        self.received += 1
        if outcome is PushOutcome.ACCEPTED:
            self.accepted += 1
        elif outcome is PushOutcome.DUPLICATE:
            self.duplicate += 1
        elif outcome is PushOutcome.DROPPED_REMOVED:
            self.dropped_removed += 1
        else:
            self.dropped_late += 1

    def reject(self, reason: Reason) -> None:
        self.received += 1
        self.rejected[reason.value] = self.rejected.get(reason.value, 0) + 1

    def unaccept(self, reason: str) -> None:
        """Count an accepted push as rejected for `reason` instead (it was received once)."""
        self.accepted -= 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def copy(self) -> Counters:
        return Counters(
            self.received,
            self.accepted,
            self.duplicate,
            self.dropped_late,
            dict(self.rejected),
            self.dropped_removed,
        )


@dataclass(frozen=True)
class Evaluation:
    """Held-out metrics of one version, as the trainer recorded them."""

    step: int
    metrics: dict[str, float]

    MAX_METRICS = 32

    def check(self, total_steps: int) -> None:
        """Raise InvalidArgument unless the step is the job's and the metrics are few,
        finite and named."""
        if not 0 <= self.step <= total_steps:
            raise InvalidArgument(
                f"evaluation step {self.step} is outside the job's steps 0..{total_steps}.",
                Reason.BAD_STEP,
            )
        if len(self.metrics) > self.MAX_METRICS or not all(
            0 < len(name) <= 64 and math.isfinite(value) for name, value in self.metrics.items()
        ):
            raise InvalidArgument(
                f"an evaluation holds at most {self.MAX_METRICS} finite metrics with names "
                "of 1-64 characters.",
                Reason.BAD_CONFIG,
            )


@dataclass(frozen=True)
class JobSnapshot:
    """A job frozen at one version: what a checkpoint holds and a restart resumes from.

    The arrays are the snapshot's own (copied, or history rows that never change).
    """

    job_id: str
    spec: JobSpec
    layout: FlatLayout
    weights: np.ndarray
    optimizer_state: dict[str, np.ndarray]
    version: int
    state: JobState
    counters: Counters
    history: tuple[np.ndarray, np.ndarray]  # StepHistory.arrays()
    created_at: float
    evaluation: Evaluation | None = None
    membership: MembershipState | None = None  # None: the spec's num_workers, unchanged

    @classmethod
    def new(
        cls, job_id: str, spec: JobSpec, layout: FlatLayout, weights: np.ndarray
    ) -> JobSnapshot:
        """Where a new job starts: version 0, no optimiser state, no history."""
        return cls(
            job_id=job_id,
            spec=spec,
            layout=layout,
            weights=weights,
            optimizer_state={},
            version=0,
            state=JobState.RUNNING,
            counters=Counters(),
            history=StepHistory().arrays(),
            created_at=time.time(),
        )


@dataclass(frozen=True)
class JobInfo:
    """A job as GetJob and ListJobs describe it (the history page comes separately)."""

    job_id: str
    spec: JobSpec
    state: JobState
    version: int
    layout: FlatLayout
    counters: Counters
    created_at: float
    last_checkpoint_version: int
    weights_fit_one_message: bool
    history: StepPage | None = None  # a page of step records, when asked for
    evaluation: Evaluation | None = None  # the latest recorded
    checkpoints: tuple[int, ...] = ()  # versions on disk, oldest first
    incarnation: int = 0  # new whenever the job's state was (re)built
    membership: MembershipState | None = None
