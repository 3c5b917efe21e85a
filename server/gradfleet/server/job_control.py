"""A job's control calls: its status, evaluation, members' size, stop, deletion,
replacement by a restored job, and checkpoints. The data path (pushes, the step, waits
and pulls) is `job.py`, whose `Job` these methods are part of; both share its lock and
state, declared here."""

from __future__ import annotations

import threading
from concurrent.futures import Future

import numpy as np

from gradfleet.proto.errors import Reason, WrongState
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.aggregation import SyncStep
from gradfleet.server.checkpoint_writer import Checkpointed, JobCheckpoints
from gradfleet.server.domain import Counters, Evaluation, JobInfo, JobSnapshot, JobState
from gradfleet.server.history import StepHistory
from gradfleet.server.membership import Membership
from gradfleet.server.publishing import WeightsPublisher
from gradfleet.server.receive import ReceiveSlots
from gradfleet.server.settings import JobSettings, Mode
from gradfleet.server.update import WholeBufferOptimizer
from gradfleet.server.waiting import VersionWaiters


class JobControl:
    """The control half of `Job`: every method takes the job's lock itself."""

    job_id: str
    layout: FlatLayout
    settings: JobSettings
    version: int
    state: JobState
    counters: Counters
    history: StepHistory
    created_at: float
    checkpoints_on_disk: tuple[int, ...]
    incarnation: int
    membership: Membership
    publisher: WeightsPublisher
    _lock: threading.Lock
    _waiters: VersionWaiters
    _slots: ReceiveSlots
    _open: SyncStep
    _optimizer: WholeBufferOptimizer
    _checkpoints: JobCheckpoints
    _history_page: int
    _retired_to: int | None
    _evaluation: Evaluation | None

    def scale(self, workers: int) -> None:
        """Record a request for `workers` workers (the Ray trainer acts on it)."""
        with self._lock:
            self.membership.check_size(workers)
            self.membership.requested = workers
            self._waiters.wake_all()

    def wake_all(self) -> None:
        with self._lock:
            self._waiters.wake_all()
            self._slots.waiters.wake_all()

    def record_evaluation(self, evaluation: Evaluation) -> None:
        """Keep the newest held-out metrics the trainer reports (shown by status)."""
        evaluation.check(self.settings.total_steps)
        with self._lock:
            if self._evaluation is None or evaluation.step >= self._evaluation.step:
                self._evaluation = evaluation

    def info(self, history_since: int | None = None) -> JobInfo:
        """The job now; with `history_since`, a page of its step records from that step
        (copied under the lock, so the page and the version agree)."""
        with self._lock:
            page = (
                None
                if history_since is None
                else self.history.page(history_since, self._history_page)
            )
            return JobInfo(
                job_id=self.job_id,
                spec=self.settings.spec,
                state=self.state,
                version=self.version,
                layout=self.layout,
                counters=self.counters.copy(),
                created_at=self.created_at,
                last_checkpoint_version=max(self.checkpoints_on_disk, default=-1),
                weights_fit_one_message=self.publisher.fits_one_message,
                history=page,
                evaluation=self._evaluation,
                checkpoints=self.checkpoints_on_disk,
                incarnation=self.incarnation,
                membership=self.membership.state(),
            )

    def retire(self, version: int) -> None:
        """This job object was replaced by the job restored at `version`: its calls in
        flight, and any that still reach it, are told to pull again."""
        with self._lock:
            self._retired_to = version
            self._waiters.wake_all()
            self._slots.waiters.wake_all()

    def _check_not_retired(self) -> None:
        if self._retired_to is not None:
            raise WrongState(
                f"job {self.job_id} went back to version {self._retired_to}; pull the "
                "weights again.",
                Reason.FUTURE_STEP,
            )

    def stop(self) -> Future[Checkpointed] | None:
        """Stop a running job; returns its checkpoint's future (None without a writer)."""
        with self._lock:
            if self.state is JobState.RUNNING:
                self.state = JobState.STOPPED
            self._waiters.wake_all()
            return self._submit_checkpoint()

    def checkpoint(self) -> Future[Checkpointed] | None:
        """Write a checkpoint of the current state (None: no writer, or deleted)."""
        with self._lock:
            return self._submit_checkpoint()

    def checkpoint_if_changed(self) -> Future[Checkpointed] | None:
        with self._lock:
            if self.version in self.checkpoints_on_disk:
                return None
            return self._submit_checkpoint()

    def mark_deleted(self) -> None:
        with self._lock:
            self.state = JobState.DELETED
            self._waiters.wake_all()
            self._slots.waiters.wake_all()

    def checkpoint_written(self, on_disk: tuple[int, ...]) -> None:
        """A checkpoint was written; the job's directory now holds these versions."""
        with self._lock:
            self.checkpoints_on_disk = on_disk

    def _submit_checkpoint(self) -> Future[Checkpointed] | None:
        if (
            not self._checkpoints.on
            or self.state is JobState.DELETED
            or self._retired_to is not None
        ):
            return None
        lent = self.publisher.lend()
        future = self._checkpoints.submit(self._snapshot(lent.weights))
        future.add_done_callback(lambda _: lent.release())
        return future

    def _snapshot(self, weights: np.ndarray) -> JobSnapshot:
        """The job as of its last applied step, with `weights` (lent by the publisher: the
        next update goes to a copy while the checkpoint is written) and the optimiser state
        copied; the open step's accepted gradients (not in the weights) are left out of
        the counters."""
        counters = self.counters.copy()
        if self.settings.mode is Mode.SYNC and self._open.step == self.version:
            pending = len(self._open.contributors)
            counters.received -= pending
            counters.accepted -= pending
        return JobSnapshot(
            job_id=self.job_id,
            spec=self.settings.spec,
            layout=self.layout,
            weights=weights,
            optimizer_state=self._optimizer.state_dict(),
            version=self.version,
            state=self.state,
            counters=counters,
            history=self.history.arrays(),
            created_at=self.created_at,
            evaluation=self._evaluation,
            membership=self.membership.state(),
        )
