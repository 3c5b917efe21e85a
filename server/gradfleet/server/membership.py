"""Who a job's workers are, step by step, and every change of them as a recorded event.

Members are worker ids below the job's max_workers. A change asked for while step v is
open applies to step v itself only when it just removes workers that have not pushed to
it (a lost worker must not stall the step); otherwise it waits for the step boundary and
applies from step v + 1, so a step always closes over the members it began with plus
nothing new (the job first takes the leavers that have not pushed out of step v, so a
change that must wait never stalls the open step). A change may name the step it applies
from (the servers of a sharded job must all change at the same step). Each applied
change is an event (version, old, new, reason): replaying the events at their versions
reproduces the run, and local mode does just that.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from gradfleet.proto.errors import InvalidArgument, Reason, WrongState

log = logging.getLogger(__name__)


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
    pending: tuple[Pending, ...]  # changes waiting for their steps, by version
    events: tuple[MembershipEvent, ...]
    requested: int  # the size ScaleJob asked for last; 0: never

    def to_json(self) -> dict:
        return {
            "members": list(self.members),
            "pending": [p.to_json() for p in self.pending],
            "events": [e.to_json() for e in self.events],
            "requested": self.requested,
        }

    @classmethod
    def from_json(cls, data: dict) -> MembershipState:
        return cls(
            members=tuple(int(w) for w in data["members"]),
            pending=tuple(Pending.from_json(p) for p in data.get("pending", ())),
            events=tuple(MembershipEvent.from_json(e) for e in data.get("events", ())),
            requested=int(data.get("requested", 0)),
        )

    @classmethod
    def initial(cls, workers: int) -> MembershipState:
        return cls(tuple(range(workers)), (), (), 0)


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
        self.members, self.pending = state.members, list(state.pending)
        self.events = list(state.events)
        self.requested = state.requested
        self.min_workers, self.max_workers = min_workers, max_workers
        self.backup_workers, self.global_batch, self.grace = backup_workers, global_batch, grace
        now = time.monotonic()
        self._heard = {worker: now for worker in self.members}  # last push per member

    def state(self) -> MembershipState:
        return MembershipState(
            self.members, tuple(self.pending), tuple(self.events), self.requested
        )

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
        `contributed` leave), False when it waits for its step. Changes named for
        different later steps each apply at theirs; a second one for the same step
        replaces the first."""
        members = tuple(sorted(members))
        self.check(members)
        leaving = set(self.members) - set(members)
        now_allowed = set(members) <= set(self.members) and not leaving & contributed
        if from_version is None:
            from_version = open_step if now_allowed else open_step + 1
        if from_version < open_step:
            raise WrongState(
                f"step {from_version} has closed already; the open step is {open_step}.",
                Reason.BAD_VERSION,
            )
        if from_version == open_step and not now_allowed:
            why = "workers join" if set(members) - set(self.members) else "leavers pushed to it"
            raise WrongState(
                f"step {open_step} has begun and {why}; change the members from step "
                f"{open_step + 1} or later.",
                Reason.BAD_VERSION,
            )
        if from_version == open_step:
            self._without(leaving)
            return members != self.members
        self.pending = sorted(
            [p for p in self.pending if p.version != from_version]
            + [Pending(from_version, members, reason)],
            key=lambda p: p.version,
        )
        return False

    def _without(self, leaving: set[int]) -> None:
        """Take workers that leave now out of the changes still waiting; a change that
        no longer fits the job is dropped (its asker sees it gone from next_members)."""
        kept = []
        for p in self.pending:
            later = tuple(w for w in p.members if w not in leaving)
            try:
                self.check(later)
            except InvalidArgument as exc:
                log.warning("the change of members waiting for step %d is dropped: %s",
                            p.version, exc)  # fmt: skip
                continue
            kept.append(Pending(p.version, later, p.reason))
        self.pending = kept

    def due(self, version: int) -> Pending | None:
        """The waiting change that applies from step `version`, taken off the queue."""
        if not self.pending or self.pending[0].version > version:
            return None
        return self.pending.pop(0)

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

    def lost(self, contributed: frozenset[int] | set[int], opened: float) -> tuple[int, ...]:
        """Members that have not pushed to the open step (begun at `opened`, monotonic)
        and were silent for longer than the grace period since it began or since they
        were last heard of, whichever is later (none when the grace is 0)."""
        if not self.grace:
            return ()
        cutoff = time.monotonic() - self.grace
        return tuple(
            w
            for w in self.members
            if w not in contributed and max(self._heard.get(w, 0.0), opened) < cutoff
        )


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, Reason.BAD_WORKER)
