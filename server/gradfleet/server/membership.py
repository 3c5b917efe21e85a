"""Who a job's workers are, step by step, and every change of them as a recorded event.

Members are worker ids below the job's max_workers. A change asked for while step v is
open applies to step v itself only when it just removes workers that have not pushed to
it (a lost worker must not stall the step); otherwise it waits for the step boundary and
applies from step v + 1, so a step always closes over the members it began with plus
nothing new. A change may name the step it applies from (the servers of a sharded job
must all change at the same step). Each applied change is an event (version, old, new,
reason): replaying the events at their versions reproduces the run, and local mode does
just that.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from gradfleet.proto.errors import InvalidArgument, Reason, WrongState


@dataclass(frozen=True)
class MembershipEvent:
    """From step `version` on, the members are `new` (before, `old`). `mid_step`: the
    change came after step `version` had begun, so its rows were planned over `old`."""

    version: int
    old: tuple[int, ...]
    new: tuple[int, ...]
    reason: str
    mid_step: bool = False

    def to_json(self) -> list:
        return [self.version, list(self.old), list(self.new), self.reason, self.mid_step]

    @classmethod
    def from_json(cls, data: list) -> MembershipEvent:
        version, old, new, reason, mid_step = data
        return cls(
            int(version),
            tuple(int(w) for w in old),
            tuple(int(w) for w in new),
            str(reason),
            bool(mid_step),
        )


@dataclass(frozen=True)
class Pending:
    """A change of members that applies from step `version` on."""

    version: int
    members: tuple[int, ...]
    reason: str

    def to_json(self) -> list:
        return [self.version, list(self.members), self.reason]

    @classmethod
    def from_json(cls, data: list) -> Pending:
        return cls(int(data[0]), tuple(int(w) for w in data[1]), str(data[2]))


@dataclass(frozen=True)
class MembershipState:
    """What a checkpoint keeps of a job's membership."""

    members: tuple[int, ...]
    pending: Pending | None  # a change waiting for its step
    events: tuple[MembershipEvent, ...]
    requested: int  # the size ScaleJob asked for last; 0: never

    def to_json(self) -> dict:
        return {
            "members": list(self.members),
            "pending": None if self.pending is None else self.pending.to_json(),
            "events": [e.to_json() for e in self.events],
            "requested": self.requested,
        }

    @classmethod
    def from_json(cls, data: dict) -> MembershipState:
        pending = data.get("pending")
        return cls(
            members=tuple(int(w) for w in data["members"]),
            pending=None if pending is None else Pending.from_json(pending),
            events=tuple(MembershipEvent.from_json(e) for e in data.get("events", ())),
            requested=int(data.get("requested", 0)),
        )

    @classmethod
    def initial(cls, workers: int) -> MembershipState:
        return cls(tuple(range(workers)), None, (), 0)


class Membership:
    """A job's members; not thread-safe (the job's lock guards it)."""

    def __init__(
        self,
        state: MembershipState,
        min_workers: int,
        max_workers: int,
        backup_workers: int,
        global_batch: int,
        grace: float,
    ) -> None:
        self.members, self.pending = state.members, state.pending
        self.events = list(state.events)
        self.requested = state.requested
        self.min_workers, self.max_workers = min_workers, max_workers
        self.backup_workers, self.global_batch, self.grace = backup_workers, global_batch, grace
        now = time.monotonic()
        self._heard = {worker: now for worker in self.members}  # last push per member

    def state(self) -> MembershipState:
        return MembershipState(self.members, self.pending, tuple(self.events), self.requested)

    def check(self, members: tuple[int, ...]) -> None:
        """Refuse a member set this job cannot have (InvalidArgument naming why)."""
        if len(set(members)) != len(members):
            raise _bad("a worker id appears twice in the new members.")
        if any(not 0 <= w < self.max_workers for w in members):
            raise _bad(f"worker ids must be 0..{self.max_workers - 1} (max_workers).")
        self.check_size(len(members))

    def check_size(self, size: int) -> None:
        if not self.min_workers <= size <= self.max_workers:
            raise _bad(
                f"the job takes {self.min_workers} to {self.max_workers} workers "
                f"(min_workers..max_workers), not {size}."
            )
        if self.backup_workers >= size:
            raise _bad(f"{size} workers leave no quorum with {self.backup_workers} backup workers.")
        if self.global_batch and self.global_batch % size:
            raise _bad(
                f"the global batch of {self.global_batch} rows does not split evenly over "
                f"{size} workers."
            )

    def members_of(self, step: int) -> tuple[int, ...]:
        """The members of step `step` (one already closed, or the open one)."""
        members = self.members
        for event in reversed(self.events):
            if event.version <= step:
                break
            members = event.old
        return members

    def request(
        self,
        members: tuple[int, ...],
        reason: str,
        open_step: int,
        contributed: frozenset[int],
        from_version: int | None = None,
    ) -> bool:
        """Ask for `members` from step `from_version` (None: as soon as may be); True
        when the change applies to the open step at once (only workers not in
        `contributed` leave), False when it waits for its step."""
        members = tuple(sorted(members))
        self.check(members)
        leaving = set(self.members) - set(members)
        now_allowed = set(members) <= set(self.members) and not leaving & contributed
        if from_version is None:
            from_version = open_step if now_allowed else open_step + 1
        if from_version < open_step or (from_version == open_step and not now_allowed):
            raise WrongState(
                f"step {from_version} has begun with pushes from workers that would leave; "
                f"change the members from step {open_step + 1} or later.",
                Reason.BAD_VERSION,
            )
        if from_version == open_step:
            if self.pending is not None:  # a later change goes on without the leavers
                later = tuple(w for w in self.pending.members if w not in leaving)
                self.pending = Pending(self.pending.version, later, self.pending.reason)
            return members != self.members
        self.pending = Pending(from_version, members, reason)
        return False

    def due(self, version: int) -> Pending | None:
        """The waiting change that applies from step `version`, taken off the queue."""
        pending = self.pending
        if pending is None or pending.version > version:
            return None
        self.pending = None
        return pending

    def apply(
        self, version: int, members: tuple[int, ...], reason: str, mid_step: bool = False
    ) -> MembershipEvent:
        """Make `members` the members from step `version` on, and record it."""
        event = MembershipEvent(version, self.members, members, reason, mid_step)
        self.events.append(event)
        now = time.monotonic()
        self._heard = {w: self._heard.get(w, now) for w in members}
        self.members = members
        return event

    def heard(self, worker: int) -> None:
        if worker in self._heard:
            self._heard[worker] = time.monotonic()

    def lost(self, contributed: frozenset[int] | set[int]) -> tuple[int, ...]:
        """Members that have not pushed to the open step and were last heard of longer
        than the grace period ago (none when the grace is 0)."""
        if not self.grace:
            return ()
        cutoff = time.monotonic() - self.grace
        return tuple(
            w for w in self.members if w not in contributed and self._heard.get(w, 0.0) < cutoff
        )


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.BAD_WORKER)
