"""One training job: the step pipeline's parts composed under one lock.

A sync step, as the code runs it:

1. the edge checks a push's header (`check_header`) and asks `admit` whether its data is
   needed (a state error, or an early duplicate/late answer, needs none);
2. the gradient is received whole (`receive.py`; a stream holds a `receive_slot`);
3. `commit` counts it and adds it to the open `SyncStep` (`aggregation.py`);
4. the step's last gradient closes it: the mean (`GradientSum.mean`), the optimiser over
   the flat buffer (`update.py`), copy-on-write for pulls still reading (`publishing.py`),
   the history record (`history.py`), a snapshot for the `CheckpointWriter` when one is
   due, and the waiters of the new version woken (`waiting.py`).

An async push does 1-3, and `commit` applies it to the weights at once. A sync step
closes over its members (`membership.py`): `set_members` changes them, at once for the
open step when only workers that have not pushed to it leave, else from the next step.
The control calls (status, stop, checkpoints) are `job_control.py`. Every method is
thread-safe; none does disk or network I/O under the lock.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from dataclasses import dataclass

import numpy as np

from gradfleet.nn.reduce import GradientSum
from gradfleet.proto.errors import (
    InvalidArgument,
    JobNotFound,
    JobStopped,
    Reason,
    TrainingDiverged,
    WrongState,
)
from gradfleet.server.admission import PushLedger
from gradfleet.server.aggregation import SyncStep
from gradfleet.server.checkpoint_writer import CheckpointWriter, JobCheckpoints
from gradfleet.server.domain import (
    JobSnapshot,
    JobState,
    PushHeader,
    PushOutcome,
)
from gradfleet.server.history import StepHistory
from gradfleet.server.job_control import JobControl
from gradfleet.server.membership import Membership, MembershipState
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.publishing import Encode, WeightsPublisher
from gradfleet.server.receive import Gradient, PushFormat, ReceiveSlots, check_header
from gradfleet.server.settings import JobSettings, Mode, build_optimizer
from gradfleet.server.update import WholeBufferOptimizer
from gradfleet.server.waiting import VersionWaiters, Waiter, wait_until

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobResources:
    """What the server lends every job: metrics, sizes, limits and the checkpoint writer."""

    metrics: ServerMetrics
    chunk_bytes: int
    receive_budget_bytes: int
    history_page: int  # step records per answer (10k: about 0.5 MB, far below any limit)
    checkpoints: CheckpointWriter | None = None
    checkpoint_every: int = 0  # for jobs whose spec says 0; 0: only on stop and shutdown


class Job(JobControl):
    """A job resumed from `snap` (a new job is a snapshot at version 0)."""

    def __init__(
        self,
        snap: JobSnapshot,
        resources: JobResources,
        on_disk: tuple[int, ...] = (),
    ) -> None:
        """`on_disk`: the versions the job's checkpoint directory holds."""
        self.job_id, self.layout = snap.job_id, snap.layout
        self.settings = JobSettings.validate(snap.spec)
        self._optimizer = WholeBufferOptimizer(
            build_optimizer(self.settings.optimizer), snap.layout
        )
        if snap.optimizer_state:
            try:
                self._optimizer.load_state_dict(snap.optimizer_state, snap.weights)
            except ValueError as exc:
                raise InvalidArgument(
                    f"optimizer state is invalid: {exc}", Reason.BAD_CONFIG
                ) from None
        self.version, self.state = snap.version, snap.state
        if self.state is JobState.RUNNING and self.version >= self.settings.total_steps:
            self.state = JobState.COMPLETED
        self.counters = snap.counters.copy()
        self.history = StepHistory(*snap.history)
        self.created_at = snap.created_at
        self.checkpoints_on_disk = on_disk
        self._resources = resources
        self._history_page = resources.history_page
        self._every = self.settings.spec.checkpoint_every or resources.checkpoint_every
        self._steps_applied = resources.metrics.steps_applied.labels(job=self.job_id)
        self._lock = threading.Lock()
        self._waiters = VersionWaiters()
        settings = self.settings
        self.membership = Membership(
            snap.membership or MembershipState.initial(settings.num_workers),
            settings.min_workers,
            settings.max_workers,
            settings.spec.backup_workers,
            settings.spec.global_batch,
            settings.spec.member_grace_seconds,
        )
        self.publisher = WeightsPublisher(  # owns the weights, updated in place
            snap.layout,
            snap.weights,
            resources.chunk_bytes,
            self._lock,
            self._version_state,
            self.settings.pull_codec,
        )
        self.push_format = PushFormat(
            self.settings.codec, snap.layout.total_elements, snap.layout.dtype
        )
        slots = max(1, resources.receive_budget_bytes // max(1, self.push_format.nbytes))
        self._slots = ReceiveSlots(slots, self.push_format)
        self._sum = GradientSum(snap.layout.total_elements, snap.layout.dtype)
        self._open = self._new_step()
        self._ledger = PushLedger(settings.spec.staleness_bound)
        # a shard keeps more checkpoints: the newest version every shard holds may be an
        # older one of its own (shards write at the same versions, up to IN_FLIGHT apart)
        keep = 2 + 2 * JobCheckpoints.IN_FLIGHT if snap.spec.shard_bounds else 2
        self._checkpoints = JobCheckpoints(resources.checkpoints, keep)
        self._retired_to: int | None = None  # RestoreJob replaced this job (at that version)
        self.incarnation = secrets.randbits(62)  # tells a job rebuilt from disk apart
        self._stopped_because = ""  # why the job stopped itself, when it did
        self._evaluation = snap.evaluation
        self._step_started = time.monotonic()

    @property
    def weights(self) -> np.ndarray:
        """The current weights, (total_elements,): read, never write."""
        return self.publisher.weights

    def _new_step(self) -> SyncStep:
        members, backup = self.membership.members, self.settings.spec.backup_workers
        return SyncStep(self.version, self._sum, members, backup, self._slots)

    def _version_state(self) -> tuple[int, JobState, int]:
        return self.version, self.state, len(self.membership.events)

    # pushes

    def check_header(self, h: PushHeader) -> None:
        """Validate a push header against the job's settings; raises InvalidArgument."""
        spec = self.settings.spec
        shard = (spec.shard_index, spec.shard_bounds) if spec.shard_bounds else None
        check_header(h, self.settings.max_workers, self.layout, shard, self.push_format)

    def admit(self, h: PushHeader) -> PushOutcome | None:
        """None when the gradient should be received for the sum; a duplicate or late
        outcome when it is only to be checked; raises when the job refuses it."""
        with self._lock:
            if self.settings.mode is Mode.SYNC and self.state is JobState.RUNNING:
                self._remove_lost()
            return self._classify(h)

    def _classify(self, h: PushHeader) -> PushOutcome | None:
        self._check_not_retired()
        if self.state is JobState.DELETED:  # a push that began before DeleteJob
            raise JobNotFound(f"job {self.job_id!r} was deleted.")
        if self.state is JobState.STOPPED:
            raise JobStopped(
                self._stopped_because or f"job {self.job_id} is stopped; it accepts no gradients."
            )
        if h.step > self.version:
            raise WrongState(
                f"step {h.step} is ahead of the job's version {self.version}; "
                "pull the weights of that version first.",
                Reason.FUTURE_STEP,
            )
        if self.settings.mode is Mode.SYNC:
            running = self._open if self.state is JobState.RUNNING else None
            return self._ledger.classify_sync(h, self.version, running, self.membership)
        completed = self.state is JobState.COMPLETED
        return self._ledger.classify_async(h, self.version, completed, self.membership)

    def receive_slot(self, timeout: float | None, waiter: Waiter) -> Gradient:
        """A receive slot for a streamed gradient, waiting for one within `timeout`;
        gradients held for their turn give theirs up when no slot is left."""
        return self._slots.take(self._lock, self._flush_held, timeout, waiter)

    def _flush_held(self) -> bool:
        if not self._open.held:
            return False
        self._open.flush()  # no room to keep worker order: add them now
        return True

    def release(self, gradient: Gradient) -> None:
        """Hand back the receive slot of a push that failed."""
        with self._lock:
            self._slots.release(gradient)

    def commit(self, h: PushHeader, gradient: Gradient) -> PushOutcome:
        """Count a complete, checked gradient and add it; returns its outcome. An ACCEPTED
        push is final: nothing that happens later makes its worker push it again."""
        with self._lock:
            try:
                outcome = self._classify(h)
            except Exception:
                self._slots.release(gradient)
                raise
            if outcome is not None:  # another push of this (worker, step) came first
                self.counters.count(outcome)
                self._slots.release(gradient)
                return outcome
            self.counters.count(PushOutcome.ACCEPTED)
            self.membership.heard(h.worker)
            if self.settings.mode is Mode.ASYNC:
                self._apply_async(h, gradient)
            elif self._open.add(h.worker, h.rows, h.loss, gradient):
                self._close_step()
            else:
                self._remove_lost()
        self._checkpoints.keep_up()  # the push that asked for a checkpoint waits, if any
        return PushOutcome.ACCEPTED

    # membership

    def set_members(
        self, members: tuple[int, ...], reason: str, from_version: int | None = None
    ) -> None:
        """Make `members` the job's workers from step `from_version` (None: as soon as
        may be; see `Membership.request`); InvalidArgument when the job cannot have them."""
        with self._lock:
            self._check_not_retired()
            self._change_members(tuple(sorted(members)), reason or "set", from_version)
        self._checkpoints.keep_up()

    def _change_members(
        self, members: tuple[int, ...], reason: str, from_version: int | None = None
    ) -> None:
        if self.settings.mode is Mode.ASYNC:
            self.membership.check(members)
            if members != self.membership.members:
                self.membership.apply(self.version, members, reason, mid_step=True)
                self._waiters.wake_all()
            return
        self.membership.check(members)  # bad input changes nothing, not even the open step
        contributed = frozenset(self._open.contributors)
        current, leaving = self.membership.members, set(self.membership.members) - set(members)
        stalling = leaving - contributed
        waits = set(members) - set(current) or leaving & contributed  # for the step boundary
        if from_version is None and stalling and waits:
            # the open step cannot close without the leavers that have not pushed to it
            # (lost ones never will): they leave it now, the rest of the change waits
            self._change_members(tuple(w for w in current if w not in stalling), reason)
            contributed = frozenset(self._open.contributors)
        if self.membership.request(members, reason, self.version, contributed, from_version):
            self.membership.apply(self.version, members, reason, mid_step=True)
            if self.state is JobState.RUNNING and self._open.set_members(members):
                self._close_step()
            self._waiters.wake_all()  # watchers see the change

    def _remove_lost(self) -> None:
        """Remove members not heard of within the grace period while the step waits."""
        lost = self.membership.lost(frozenset(self._open.contributors), self._step_started)
        if lost and self.state is JobState.RUNNING:
            remaining = tuple(w for w in self.membership.members if w not in lost)
            try:
                self._change_members(remaining, f"lost: {len(lost)} silent past the grace")
            except InvalidArgument as exc:  # fewer than min_workers would remain
                log.warning("job %s: members %s are silent but stay: %s", self.job_id, lost, exc)

    def count_early(self, outcome: PushOutcome) -> PushOutcome:
        """Count a push answered without adding its data (duplicate or late)."""
        with self._lock:
            self.counters.count(outcome)
        return outcome

    def count_rejected(self, reason: Reason) -> None:
        with self._lock:
            self.counters.reject(reason)

    def _close_step(self) -> None:
        step, first = self._open, self._open.step
        closed = step.close()
        if closed.mean is None:
            self._stop_on_overflow(first)
        else:
            self._optimizer.step(self.publisher.before_update(self.version), closed.mean)
        step.release()
        if closed.mean is None:
            self._open = self._new_step()
            return
        self._ledger.closed(closed.step, closed.contributors)
        self._advance(closed.loss, closed.rows, len(closed.contributors))
        self._open = self._new_step()

    def _stop_on_overflow(self, step: int) -> None:
        """Finite gradients whose sum overflows the dtype: training diverged. The weights
        stay as they are and the job stops; its calls say why from now on."""
        self._stopped_because = TrainingDiverged.at_step(step + 1, "gradients").message
        log.error(
            "job %s stopped at version %d: %s", self.job_id, self.version, self._stopped_because
        )
        self.counters.unaccept("overflow")
        self.state = JobState.STOPPED
        self._waiters.wake_all()

    def _apply_async(self, h: PushHeader, gradient: Gradient) -> None:
        self._resources.metrics.staleness.observe(self.version - h.step)
        weights = self.publisher.before_update(self.version)
        if gradient.data is None or self.push_format.encoded:  # pieces, or a payload:
            self._sum.clear()  # assembled in the sum's buffer, no array per push
            self.push_format.add(self._sum, gradient)
            self._optimizer.step(weights, self._sum.total)
        else:
            self._optimizer.step(weights, gradient.data)
        self._slots.release(gradient)
        self._ledger.applied(h.worker, h.step)
        self._advance(h.loss, h.rows, 1)

    def _advance(self, loss: float, rows: int, contributors: int) -> None:
        now = time.monotonic()
        elapsed, self._step_started = now - self._step_started, now
        self.history.append(
            step=self.version,
            loss=float(loss),
            rows=int(rows),
            samples_per_sec=rows / elapsed if elapsed > 0 else 0.0,
            wall_time=time.time(),
            contributors=contributors,
        )
        self._resources.metrics.step_latency.observe(elapsed)
        self.version += 1
        self._steps_applied.inc()
        due = self.membership.due(self.version)  # a change that waited for this step
        if due is not None and due.members != self.membership.members:
            self.membership.apply(self.version, due.members, due.reason)
        keep_every = self.settings.spec.keep_every
        if keep_every and self.version % keep_every == 0:
            self.publisher.keep(self.version)
        if self.version >= self.settings.total_steps:
            self.state = JobState.COMPLETED
            self._waiters.wake_all()
        self._waiters.reached(self.version)
        every = self._every
        if (every and self.version % every == 0) or self.state is JobState.COMPLETED:
            self._submit_checkpoint()

    # waits and pulls

    def wait_for_version(self, min_version: int, timeout: float | None, waiter: Waiter) -> bool:
        """Block until version >= min_version (True), or until `timeout` passes or the
        waiter is cancelled (False); raises if the job stops or is deleted first."""
        if min_version > self.settings.total_steps:
            raise WrongState(
                f"min_version {min_version} is beyond total_steps "
                f"{self.settings.total_steps}; that version will never exist.",
                Reason.BAD_VERSION,
            )
        return self.wait_for_change(min_version - 1, None, timeout, waiter)

    def wait_for_change(
        self,
        version: int,
        state: JobState | None,
        timeout: float | None,
        waiter: Waiter,
        events: int | None = None,
    ) -> bool:
        """Block until the job passes `version` (True); with `state`, also until it
        leaves that state, with `events`, until it has had more membership events (True);
        False on timeout or cancellation. Without `state`, a stopped or deleted job
        raises."""

        def changed() -> bool:
            self._check_not_retired()
            if self.version > version or (state is not None and self.state is not state):
                return True
            if events is not None and len(self.membership.events) != events:
                return True
            if state is None and self.state is JobState.DELETED:
                raise JobNotFound(f"job {self.job_id!r} was deleted.")
            if state is None and self.state is JobState.STOPPED:
                raise JobStopped(
                    self._stopped_because
                    or f"job {self.job_id} stopped at version {self.version} before "
                    f"reaching version {version + 1}."
                )
            return False

        return wait_until(self._lock, changed, self._waiters, version + 1, timeout, waiter)

    def weights_message(self, encode: Encode) -> bytes:
        """The current weights as one message (built once per version and state)."""
        return self.publisher.one_message(encode)

    def exact_weights(self, version: int) -> tuple[np.ndarray, JobState]:
        """The weights of `version` itself (reached already): kept, being a multiple of
        keep_every, or current. The array is the job's own copy: read, never write."""
        with self._lock:
            kept = self.publisher.kept(version)
            if kept is None:
                raise WrongState(
                    f"the weights of version {version} are not kept (the job keeps every "
                    f"{self.settings.spec.keep_every}th version, the newest "
                    f"{self.publisher.KEEP}); pull the current version instead.",
                    Reason.BAD_VERSION,
                )
            return kept, self.state

    def current_weights(self) -> tuple[int, np.ndarray, JobState]:
        """(version, a copy of the weights, state), in full precision."""
        with self._lock:
            return self.version, self.weights.copy(), self.state
