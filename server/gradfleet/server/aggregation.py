"""The open sync step: who has contributed, and their gradients summed in worker order.

Complete gradients arrive in any order. One whose worker is next in order (the step's
members, by worker id) is added to the sum at once; an early one is held (keeping its
receive slot) until the workers before it are in. The first two members' gradients are
added in whichever order they come: floating-point addition is commutative, so `0 + b + a`
is `a + b` bit for bit (for values; a codec's payloads keep the order). When the quorum
is in, the step closes: what is still held is added in worker order (workers that never
came, with backup workers, are skipped), the last one fused with the division
(`GradientSum.mean`; a codec's payloads are all decoded into the sum first). So the sum
is reproducible, and equal to local mode's, whatever the arrival order. Only when the
receive slots run out does the step give up that order and add what it holds at once
(`flush`), so memory stays bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from gradfleet.nn.reduce import GradientSum
from gradfleet.server.receive import Gradient, ReceiveSlots


@dataclass(frozen=True)
class ClosedStep:
    """What a closing step hands to the update: the mean (None if the sum overflowed),
    the rows-weighted loss, and who counted."""

    step: int
    mean: np.ndarray | None
    loss: float
    rows: int
    contributors: frozenset[int]


class SyncStep:
    """Collects step `step` of a sync job; not thread-safe (the job's lock guards it)."""

    def __init__(
        self,
        step: int,
        total: GradientSum,
        members: tuple[int, ...],
        backup_workers: int,
        slots: ReceiveSlots,
    ) -> None:
        self.step, self.members, self.backup_workers = step, members, backup_workers
        self._sum, self._slots = total, slots
        self._sum.clear()
        self.contributors: dict[int, tuple[int, float]] = {}  # worker -> (rows, loss)
        self._held: dict[int, Gradient] = {}
        self._summed: set[int] = set()
        self._next = 0  # members[:_next] are in the sum (or never came)
        self._commutes = not slots.format.encoded  # the first two may come in any order
        self.ordered = True

    @property
    def quorum(self) -> int:
        """Gradients that close the step: members - backup workers."""
        return len(self.members) - self.backup_workers

    @property
    def _next_worker(self) -> int | None:
        return self.members[self._next] if self._next < len(self.members) else None

    def set_members(self, members: tuple[int, ...]) -> bool:
        """Close over `members` instead (the workers removed have not contributed);
        True when the step now has its quorum (call `close`)."""
        self.members = members
        summed = self._summed
        self._next = next((i for i, w in enumerate(members) if w not in summed), len(members))
        if self.ordered:
            self._drain()
        return bool(self.contributors) and len(self.contributors) >= self.quorum

    def __contains__(self, worker: int) -> bool:
        return worker in self.contributors

    @property
    def held(self) -> int:
        return len(self._held)

    def add(self, worker: int, rows: int, loss: float, gradient: Gradient) -> bool:
        """Count `worker`'s gradient; True once the step has its quorum (call `close`)."""
        self.contributors[worker] = (rows, loss)
        complete = len(self.contributors) >= self.quorum
        if complete or (self.ordered and not self._in_turn(worker)):
            self._hold(worker, gradient, complete)
        else:
            self._sum_in(worker, gradient)
            if self.ordered:
                self._drain()
        return complete

    def _in_turn(self, worker: int) -> bool:
        """Whether `worker`'s gradient may be added now: it is next in order, or it is the
        second member's while the sum is still empty."""
        if worker == self._next_worker:
            return True
        return self._commutes and not self._summed and self.members[1:2] == (worker,)

    def _hold(self, worker: int, gradient: Gradient, complete: bool) -> None:
        """Keep an early gradient for its turn, unless streams are waiting for its memory.
        A message view needs a slot to be kept, and leaves one free for the next gradient
        to arrive. The gradient that completes the step is kept for the fused close."""
        room = not self._slots.waiters and (gradient.slot or self._slots.try_take(keep_free=1))
        if complete or room:
            gradient.slot = gradient.slot or not complete
            self._held[worker] = gradient
            return
        self.flush()
        self._sum_in(worker, gradient)

    def flush(self) -> None:
        """Add every held gradient now, in worker order, and stop waiting for the order:
        the slots are needed for gradients still to be received."""
        self.ordered = False
        for worker in sorted(self._held):
            self._sum_in(worker, self._held.pop(worker))

    def _drain(self) -> None:
        """Add the held gradients whose turn has come, and move past those added."""
        while (worker := self._next_worker) is not None:
            if worker in self._held:
                self._sum_in(worker, self._held.pop(worker))
            elif worker not in self._summed:
                return
            self._next += 1

    def _sum_in(self, worker: int, gradient: Gradient) -> None:
        self._slots.format.add(self._sum, gradient)
        self._summed.add(worker)
        self._slots.release(gradient)

    def close(self) -> ClosedStep:
        """Sum what is held in worker order, the last one fused with the division.

        The returned mean may be a held gradient's own memory (one contributor) or the
        sum's buffer: use it before calling `release`.
        """
        workers = sorted(self._held)
        fused = workers[-1:] if not self._slots.format.encoded else []
        for worker in workers[: len(workers) - len(fused)]:
            self._sum_in(worker, self._held.pop(worker))
        last = self._held[fused[0]].values if fused else None
        mean = self._sum.mean(last)
        rows = sum(r for r, _ in self.contributors.values())
        if rows > 0:
            loss = sum(r * lo for r, lo in self.contributors.values()) / rows
        else:
            loss = sum(lo for _, lo in self.contributors.values()) / len(self.contributors)
        return ClosedStep(self.step, mean, loss, rows, frozenset(self.contributors))

    def release(self) -> None:
        """Hand back every gradient still held (after the update read the mean)."""
        for gradient in self._held.values():
            self._slots.release(gradient)
        self._held.clear()
