"""The server's own small types: job states, push outcomes, counters, headers, snapshots.

The gRPC edge translates protobuf to and from these; nothing else in the server sees
protobuf.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from gradfleet.proto.errors import Reason
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.history import StepPage
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


@dataclass
class Counters:
    """Pushes of a job: received == accepted + duplicate + dropped_late + sum(rejected)."""

    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    dropped_late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: PushOutcome) -> None:
        self.received += 1
        if outcome is PushOutcome.ACCEPTED:
            self.accepted += 1
        elif outcome is PushOutcome.DUPLICATE:
            self.duplicate += 1
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
            self.received, self.accepted, self.duplicate, self.dropped_late, dict(self.rejected)
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
