"""Whether a push is needed: new, a duplicate, late, from a removed worker, or refused.

Exactly once rests here: the ledger remembers which (worker, step) gradients recent steps
counted, so a retried push is answered DUPLICATE without being added twice, and a push
for a step that closed without it is DROPPED_LATE (or DROPPED_REMOVED when its worker
had left). The job's state checks (stopped, deleted, a future step) come first, in `Job`.
"""

from __future__ import annotations

from collections import deque

from gradfleet.proto.errors import StaleGradient
from gradfleet.server.aggregation import SyncStep
from gradfleet.server.domain import PushHeader, PushOutcome
from gradfleet.server.membership import Membership

KEEP_CLOSED = 64  # closed sync steps whose contributors are remembered, for duplicates


class PushLedger:
    """The pushes a job counted lately; not thread-safe (the job's lock guards it)."""

    def __init__(self, staleness_bound: int) -> None:
        self._bound = staleness_bound
        self._closed: deque[tuple[int, frozenset[int]]] = deque(maxlen=KEEP_CLOSED)
        self._seen: dict[int, set[int]] = {}  # async: steps applied per worker, bounded

    def closed(self, step: int, contributors: frozenset[int]) -> None:
        """A sync step closed over `contributors`."""
        self._closed.append((step, contributors))

    def applied(self, worker: int, step: int) -> None:
        """An async gradient of `worker`, computed on version `step`, was applied."""
        seen = self._seen.setdefault(worker, set())
        seen.add(step)
        if len(seen) > self._bound + KEEP_CLOSED:
            seen.discard(min(seen))

    def classify_sync(
        self, h: PushHeader, version: int, open_step: SyncStep | None, membership: Membership
    ) -> PushOutcome | None:
        """None when the gradient belongs in `open_step` (the step at `version`; None
        when the job no longer runs), else why it is answered without being added."""
        if open_step is not None and h.step == version:
            if h.worker in open_step:
                return PushOutcome.DUPLICATE
            return None if h.worker in open_step.members else PushOutcome.DROPPED_REMOVED
        if any(step == h.step and h.worker in who for step, who in self._closed):
            return PushOutcome.DUPLICATE
        if h.worker not in membership.members_of(h.step):
            return PushOutcome.DROPPED_REMOVED
        return PushOutcome.DROPPED_LATE

    def classify_async(
        self, h: PushHeader, version: int, completed: bool, membership: Membership
    ) -> PushOutcome | None:
        """None when the gradient is to be applied now; raises StaleGradient past the
        job's staleness bound."""
        if h.step in self._seen.get(h.worker, ()):
            return PushOutcome.DUPLICATE
        if h.worker not in membership.members:
            return PushOutcome.DROPPED_REMOVED
        if completed:
            return PushOutcome.DROPPED_LATE
        if h.step < version - self._bound:
            raise StaleGradient(
                f"gradient computed on version {h.step} is too stale: the job is at version "
                f"{version} and allows at most {self._bound} versions of staleness."
            )
        return None
