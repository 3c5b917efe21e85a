"""Job state: weights in one flat buffer, the optimiser, and gradient aggregation.

Sync arithmetic (the trainer's local mode does exactly the same, so both agree bit for
bit): the gradients of a step are summed in the model's dtype in increasing worker order
(the first copied in, the others added with `np.add(..., out=...)`), then
`mean = sum / count` in place and the optimiser's step (one pass over the flat buffer,
the same numbers as per parameter: `WholeBufferOptimizer`); the last
gradient's add and the division share one blocked pass, and a step of one gradient uses
it as the mean directly. The step's loss is the rows-weighted mean of the contributing
workers' losses.

Memory: a gradient that came as one message is added where it lies (or held, as that
message, when it arrives before a lower-numbered worker's or while a stream is being
summed: at most `receive_slots - 1` early ones, `receive_slots = budget // gradient
bytes`, past that the sum goes in arrival order). A streamed sync gradient is added to
the sum chunk by chunk as it arrives, one push at a time in worker order, so the server
holds one chunk per stream, never a whole gradient. If such a push fails half-way
(bad chunk, lost client) after other workers' gradients were summed, the step's sum is
voided and those workers push again (`needs_repush`, ABORTED on their pull): weights
and version never see a partial gradient and nothing acknowledged is lost. Async
streams are assembled in a receive buffer (at most `receive_slots` at once) because
the optimiser applies each gradient as a whole.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    DEFAULT_CHUNK_BYTES,
    FlatLayout,
    WireError,
    as_bytes_view,
    dtype_from_proto,
    encode_chunk_message,
    plan_chunk_bytes,
)
from gradfleet.server.errors import (
    BadRequest,
    JobNotFound,
    OverLimit,
    ShuttingDown,
    StepReset,
    WrongState,
)
from gradfleet.server.history import StepHistory
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.whole_buffer import WholeBufferOptimizer

log = logging.getLogger(__name__)

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_KEEP_CONTRIBUTORS = 64  # closed steps whose contributor sets we remember for dedup

MODE_NAMES = {pb.MODE_SYNC: "sync", pb.MODE_ASYNC: "async"}


def new_job_id() -> str:
    return uuid.uuid4().hex[:12]


def check_job_id(job_id: str) -> str:
    if not _JOB_ID.match(job_id):
        raise BadRequest(
            f"job id {job_id!r} is invalid; use 1-64 letters, digits, '_', '.' or '-'.",
            "bad_config",
        )
    return job_id


def _json_field(text: str, what: str, required: bool) -> dict:
    if not text:
        if required:
            raise BadRequest(f"{what} is missing; send a JSON object.", "bad_config")
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise BadRequest(f"{what} is not valid JSON ({exc}).", "bad_config") from None
    except RecursionError:
        raise BadRequest(f"{what} nests too deeply to be a config.", "bad_config") from None
    if not isinstance(value, dict):
        raise BadRequest(f"{what} must be a JSON object.", "bad_config")
    return value


@dataclass(frozen=True)
class JobSettings:
    """A validated JobSpec."""

    model_spec: dict
    optimizer: dict
    mode: str
    num_workers: int
    backup_workers: int
    staleness_bound: int
    checkpoint_every: int
    total_steps: int
    seed: int
    job_config: dict

    @classmethod
    def from_proto(cls, spec: pb.JobSpec) -> JobSettings:
        mode = MODE_NAMES.get(spec.mode or pb.MODE_SYNC)
        if mode is None:
            raise BadRequest(
                f"mode {spec.mode} is unknown; use MODE_SYNC or MODE_ASYNC.", "bad_config"
            )
        if spec.num_workers < 1:
            raise BadRequest("num_workers must be at least 1.", "bad_config")
        if not 0 <= spec.backup_workers < spec.num_workers:
            raise BadRequest(
                "backup_workers must be at least 0 and less than num_workers.", "bad_config"
            )
        if spec.staleness_bound < 0:
            raise BadRequest("staleness_bound must be 0 or more.", "bad_config")
        if spec.checkpoint_every < 0:
            raise BadRequest("checkpoint_every must be 0 (off) or more.", "bad_config")
        if spec.total_steps < 1:
            raise BadRequest("total_steps must be at least 1.", "bad_config")
        return cls(
            model_spec=_json_field(spec.model_spec_json, "model_spec_json", required=True),
            optimizer=_json_field(spec.optimizer_json, "optimizer_json", required=True),
            mode=mode,
            num_workers=spec.num_workers,
            backup_workers=spec.backup_workers,
            staleness_bound=spec.staleness_bound,
            checkpoint_every=spec.checkpoint_every,
            total_steps=spec.total_steps,
            seed=spec.seed,
            job_config=_json_field(spec.job_config_json, "job_config_json", required=False),
        )

    @property
    def quorum(self) -> int:
        """Gradients that close a sync step: N - b."""
        return self.num_workers - self.backup_workers


def build_optimizer(config: dict) -> Any:
    from gradfleet.nn.optim import make_optimizer

    try:
        return make_optimizer(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise BadRequest(f"optimizer config is invalid: {exc}", "bad_config") from None


def spec_nbytes(model_spec: dict) -> int:
    """Bytes of a model's weights from its spec alone, so a limit is checked before any
    memory is allocated for it."""
    from gradfleet.nn.mlp import parameter_count

    try:
        sizes = [int(s) for s in model_spec["sizes"]]
        itemsize = np.dtype(model_spec.get("dtype", "float32")).itemsize
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        raise BadRequest(f"model spec is invalid: {exc}", "bad_config") from None
    return itemsize * parameter_count(sizes)


def build_initial_weights(model_spec: dict) -> tuple[FlatLayout, np.ndarray]:
    """The model's layout and its initial flat weights (the model's own buffer, no copy)."""
    from gradfleet.nn import MLP

    try:
        model = MLP.from_spec(model_spec)
    except (ValueError, TypeError, KeyError, OverflowError) as exc:
        raise BadRequest(f"model spec is invalid: {exc}", "bad_config") from None
    try:
        layout = FlatLayout.from_arrays(model.unflatten(model.flat))
    except WireError as exc:
        raise BadRequest(f"the model's weights cannot be laid out: {exc}", "bad_config") from None
    return layout, model.flat


@dataclass
class Counters:
    received: int = 0
    accepted: int = 0
    duplicate: int = 0
    dropped_late: int = 0
    rejected: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str) -> None:
        self.received += 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def unaccept(self, reason: str) -> None:
        """Count an accepted push as `rejected[reason]` instead (it was received once)."""
        self.accepted -= 1
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def to_proto(self) -> pb.JobCounters:
        return pb.JobCounters(
            received=self.received,
            accepted=self.accepted,
            duplicate=self.duplicate,
            dropped_late=self.dropped_late,
            rejected=self.rejected,
        )


@dataclass(frozen=True)
class WeightsSnapshot:
    """Immutable, pre-encoded PullWeightsResponse messages of one (version, state)."""

    version: int
    state: int
    messages: tuple[bytes, ...]
    nbytes: int


class _OpenStep:
    """The sync step being collected: contributors, the ordered sum, held gradients."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.contributors: dict[int, tuple[int, float]] = {}  # worker -> (rows, loss)
        self.next_worker = 0  # workers below this are summed (or absent)
        self.held: dict[int, tuple[np.ndarray, bool]] = {}  # worker -> (gradient, a buffer?)
        self.summed: set[int] = set()  # workers whose gradient is in the sum
        self.needs_repush: set[int] = set()  # acknowledged, then voided by a failed fold
        self.ordered = True
        self.first_arrival = 0.0


class Job:
    """One training job. All mutation happens under `self.cond` (a Condition)."""

    def __init__(
        self,
        job_id: str,
        spec: pb.JobSpec,
        layout: FlatLayout,
        weights: np.ndarray,
        *,
        metrics: ServerMetrics,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        receive_budget_bytes: int = 512 << 20,
        optimizer_state: dict[str, np.ndarray] | None = None,
        version: int = 0,
    ) -> None:
        self.job_id = job_id
        self.spec = spec
        self.settings = JobSettings.from_proto(spec)
        self.layout = layout
        self.weights = weights  # (total_elements,) in layout.dtype, updated in place
        self._layout_proto = layout.to_proto()
        self.optimizer = WholeBufferOptimizer(
            build_optimizer(self.settings.optimizer), layout, weights
        )
        if optimizer_state is not None:
            try:
                self.optimizer.load_state_dict(optimizer_state)
            except ValueError as exc:
                raise BadRequest(f"optimizer state is invalid: {exc}", "bad_config") from None
        self.version = version
        self.state = pb.JOB_STATE_RUNNING
        if version >= self.settings.total_steps:
            self.state = pb.JOB_STATE_COMPLETED
        self.history = StepHistory()
        self.counters = Counters()
        self.created_at = time.time()
        self.last_checkpoint_version = -1
        self.cond = threading.Condition()
        self.metrics = metrics
        self._steps_applied = metrics.steps_applied.labels(job=job_id)
        self.chunk_bytes = plan_chunk_bytes(layout.nbytes, chunk_bytes, layout.dtype.itemsize)
        self.weights_fit_one_message = layout.nbytes <= self.chunk_bytes
        self.receive_slots = max(1, receive_budget_bytes // max(1, layout.nbytes))
        self._slots = threading.BoundedSemaphore(self.receive_slots)
        self.on_step: Callable[[Job], None] | None = None  # called under the lock
        self._snapshot: WeightsSnapshot | None = None
        self._readers: dict[int, int] = {}  # version -> pull streams reading it
        self._kept: dict[int, np.ndarray] = {}  # version -> its weights, while still read
        self._step_started = time.monotonic()
        self._free_buffers: list[np.ndarray] = []
        # sync
        self._sum: np.ndarray | None = None  # in the model's dtype
        self._sum_empty = True  # nothing of the open step has been added to _sum yet
        self._folding = False  # a streamed push is being folded (one at a time)
        self._fold_waiting: list[int] = []  # workers of streamed pushes waiting for their turn
        self._fold_worker = -1  # the worker whose push is being folded
        self._open = _OpenStep(version)
        self._closed_contributors: deque[tuple[int, frozenset[int]]] = deque(
            maxlen=_KEEP_CONTRIBUTORS
        )
        # async: steps already applied per worker (bounded), for idempotent retries
        self._seen: dict[int, set[int]] = {}

    # ---- buffers -------------------------------------------------------------------
    def take_buffer(self, timeout: float | None, give_up: Callable[[], bool]) -> np.ndarray:
        """Wait for a receive slot, then return a gradient buffer (reused across pushes).

        Raises OverLimit when `timeout` passes first, ShuttingDown when `give_up()`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._slots.acquire(timeout=0.25):
            self._stop_waiting(
                give_up, deadline, f"receiving {self.receive_slots} gradients already"
            )
        with self.cond:
            if self._free_buffers:
                return self._free_buffers.pop()
        return self.layout.empty()

    def give_back(self, buf: np.ndarray) -> None:
        """Return a buffer taken with `take_buffer` and free its receive slot."""
        with self.cond:
            self._recycle(buf)

    # ---- pushes --------------------------------------------------------------------
    def check_header(self, header: pb.PushHeader) -> None:
        """Validate a push header without touching state; raises BadRequest/WrongState."""
        s = self.settings
        if not 0 <= header.worker < s.num_workers:
            raise BadRequest(
                f"worker {header.worker} is out of range; "
                f"this job has workers 0..{s.num_workers - 1}.",
                "bad_worker",
            )
        if header.rows < 0:
            raise BadRequest(f"rows must be 0 or more, got {header.rows}.", "bad_rows")
        if not math.isfinite(header.loss):
            raise BadRequest("the reported loss is NaN or Inf.", "non_finite")
        try:
            dtype = dtype_from_proto(header.dtype)
        except WireError as exc:
            raise BadRequest(str(exc), "bad_dtype") from None
        if dtype != self.layout.dtype:
            raise BadRequest(
                f"gradient dtype {dtype.name} does not match the job's {self.layout.dtype.name}.",
                "bad_dtype",
            )
        # the common case, a layout identical to the job's, needs no parsing
        if header.HasField("layout") and header.layout != self._layout_proto:
            try:
                layout = FlatLayout.from_proto(header.layout)
            except WireError as exc:
                raise BadRequest(str(exc), "bad_layout") from None
            if layout != self.layout:
                raise BadRequest(
                    "the gradient's layout does not match the job's layout.", "bad_layout"
                )
        if header.total_bytes != self.layout.nbytes:
            raise BadRequest(
                f"gradient declares {header.total_bytes} bytes, expected {self.layout.nbytes}.",
                "bad_bytes",
            )
        if header.step < 0:
            raise BadRequest(f"step must be 0 or more, got {header.step}.", "bad_step")

    def precheck(self, header: pb.PushHeader) -> int | None:
        """Under the lock: decide early whether the data is needed.

        Returns a PushOutcome to answer without reading the data (duplicate or late),
        None when the gradient should be received, or raises WrongState.
        """
        with self.cond:
            return self._classify(header)

    def _classify(self, header: pb.PushHeader) -> int | None:
        if self.state == pb.JOB_STATE_DELETED:  # a push that began before DeleteJob
            raise JobNotFound(f"job {self.job_id!r} was deleted.", "not_found")
        if self.state == pb.JOB_STATE_STOPPED:
            raise WrongState(f"job {self.job_id} is stopped; it accepts no gradients.", "stopped")
        if header.step > self.version:
            raise WrongState(
                f"step {header.step} is ahead of the job's version {self.version}; "
                "pull the weights of that version first.",
                "future_step",
            )
        if self.settings.mode == "sync":
            if header.step == self.version and self.state == pb.JOB_STATE_RUNNING:
                if header.worker in self._open.contributors:
                    return pb.PUSH_OUTCOME_DUPLICATE
                return None
            for step, workers in self._closed_contributors:
                if step == header.step and header.worker in workers:
                    return pb.PUSH_OUTCOME_DUPLICATE
            return pb.PUSH_OUTCOME_DROPPED_LATE
        # async
        if header.step in self._seen.get(header.worker, ()):
            return pb.PUSH_OUTCOME_DUPLICATE
        if self.state == pb.JOB_STATE_COMPLETED:
            return pb.PUSH_OUTCOME_DROPPED_LATE
        if header.step < self.version - self.settings.staleness_bound:
            raise WrongState(
                f"gradient computed on version {header.step} is too stale: the job is at "
                f"version {self.version} and allows at most {self.settings.staleness_bound} "
                "versions of staleness.",
                "stale",
            )
        return None

    def count_outcome(self, outcome: int) -> None:
        with self.cond:
            self._count_early(outcome)

    def _classify_counted(self, header: pb.PushHeader) -> int | None:
        """`_classify` (under the lock) that counts what it decides: a rejection, or an
        early outcome (duplicate or late) answered without the data."""
        try:
            outcome = self._classify(header)
        except WrongState as exc:
            self.counters.reject(exc.reason)
            raise
        if outcome is not None:
            self._count_early(outcome)
        return outcome

    def count_rejected(self, reason: str) -> None:
        with self.cond:
            self.counters.reject(reason)

    # Step records per GetJob answer or WatchJob read: 10k records are about 0.5 MB, far
    # below any message limit; a client asks again from the next step for more.
    HISTORY_PAGE = 10_000

    # ---- streamed sync pushes: folded chunk by chunk --------------------------------
    # Seconds without progress before a blocked step sums in arrival order. Without
    # backup workers the step cannot close before the missing worker pushes anyway, so
    # waiting costs nothing; this only guards against a push that cannot get in at all.
    ORDER_PATIENCE = 5.0

    def begin_fold(
        self, header: pb.PushHeader, timeout: float | None, give_up: Callable[[], bool]
    ) -> int | None:
        """Wait for this streamed sync push's turn to fold; None when it may start.

        Returns a PushOutcome (duplicate or late, counted) to answer without reading the
        data. Pushes fold one at a time in worker order, so the sum is reproducible
        without holding whole gradients. The step switches to arrival order only when
        waiting cannot help: the pushes in hand reach the quorum without the missing
        lower-numbered workers (backup workers), or nothing moved for `ORDER_PATIENCE`.
        Raises WrongState, ShuttingDown when `give_up()`, or OverLimit at `timeout`.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            self._fold_waiting.append(header.worker)
            try:
                return self._wait_for_fold_turn(header, deadline, give_up)
            finally:
                self._fold_waiting.remove(header.worker)

    def _wait_for_fold_turn(
        self, header: pb.PushHeader, deadline: float | None, give_up: Callable[[], bool]
    ) -> int | None:
        progress = (time.monotonic(), self._open.next_worker, self._folding)
        while True:
            outcome = self._classify_counted(header)
            if outcome is not None:
                return outcome
            step = self._open
            if not self._folding and (not step.ordered or step.next_worker == header.worker):
                self._folding, self._fold_worker = True, header.worker
                if not step.contributors:
                    step.first_arrival = time.monotonic()
                if self._sum is None:
                    self._sum = self.layout.empty()
                return None
            now = time.monotonic()
            if (step.next_worker, self._folding) != progress[1:]:
                progress = (now, step.next_worker, self._folding)
            missing = step.next_worker not in self._fold_waiting
            in_hand = len(step.contributors.keys() | set(self._fold_waiting))
            if (
                step.ordered
                and not self._folding
                and missing
                and (in_hand >= self.settings.quorum or now - progress[0] > self.ORDER_PATIENCE)
            ):
                log.debug("job %s: summing step %d in arrival order", self.job_id, step.step)
                step.ordered = False
                self._flush_held(step)
                continue
            self._stop_waiting(give_up, deadline, "summing other gradients")
            self.cond.wait(0.05)

    def _stop_waiting(
        self, give_up: Callable[[], bool] | None, deadline: float | None, busy: str
    ) -> None:
        """One check of a push's wait: ShuttingDown once `give_up()` (the client left or the
        server is stopping), OverLimit once `deadline` passed while the job was `busy`."""
        if give_up is not None and give_up():
            raise ShuttingDown("the push was cancelled or the server is stopping.", "shutdown")
        if deadline is not None and time.monotonic() > deadline:
            raise OverLimit(
                f"job {self.job_id} is {busy} and the deadline passed while waiting; retry later.",
                "receive_busy",
            )

    def fold_target(self) -> tuple[np.ndarray, bool]:
        """(sum, first): the push holding the fold adds its chunks to `sum` in place, or
        copies them there when `first` (nothing of this step is in the sum yet)."""
        with self.cond:
            assert self._folding and self._sum is not None
            return self._sum, self._sum_empty

    def finish_fold(self, header: pb.PushHeader) -> int:
        """Count a push whose every chunk has been folded into the sum."""
        with self.cond:
            self._folding = False
            self.cond.notify_all()
            # only stopping or deleting the job can have changed it meanwhile
            outcome = self._classify_counted(header)
            if outcome is not None:
                return outcome
            self.counters.received += 1
            self.counters.accepted += 1
            self._sum_empty = False
            step = self._open
            step.contributors[header.worker] = (header.rows, header.loss)
            step.summed.add(header.worker)
            step.needs_repush.discard(header.worker)
            if step.ordered and step.next_worker == header.worker:
                step.next_worker += 1
            self._release_held(step)
            if len(step.contributors) >= self.settings.quorum:
                self._flush_held(step)
                self._close_sync_step(step)
            return pb.PUSH_OUTCOME_ACCEPTED

    def abort_fold(self, touched: bool) -> None:
        """Give up the fold of a push that failed after `touched` the sum or before.

        The weights are never touched. When part of the push was already added to a sum
        that held other workers' gradients, that sum can no longer be trusted: the step
        starts again and those workers, whose pushes were acknowledged, are told to push
        again (their next pull of this step fails with ABORTED); nothing is lost.
        """
        with self.cond:
            self._folding = False
            self.cond.notify_all()
            if touched and self.state == pb.JOB_STATE_RUNNING:
                self._void_sum()
            self._release_held(self._open)

    def _count_early(self, outcome: int) -> None:
        self.counters.received += 1
        if outcome == pb.PUSH_OUTCOME_DUPLICATE:
            self.counters.duplicate += 1
        elif outcome == pb.PUSH_OUTCOME_DROPPED_LATE:
            self.counters.dropped_late += 1

    def _void_sum(self) -> None:
        """Start the open step's sum again after a push failed while folding into it."""
        step = self._open
        if self._sum_empty:
            return  # nothing else was in the sum (a first push only copies into it)
        voided = sorted(step.summed)
        log.warning(
            "job %s: a push failed half-way through step %d; workers %s push again",
            self.job_id,
            step.step,
            voided,
        )
        for worker in voided:  # received once, now counted as voided instead of accepted
            del step.contributors[worker]
            self.counters.unaccept("voided")
        step.needs_repush.update(voided)
        step.summed.clear()
        step.next_worker, step.ordered = 0, True
        step.first_arrival = time.monotonic()
        self._sum_empty = True
        self._release_held(step)  # held gradients of the first workers go in at once
        self.metrics.steps_reset.inc()
        self.metrics.pushed("VOIDED", len(voided))
        self.cond.notify_all()

    def commit(
        self,
        header: pb.PushHeader,
        grad: np.ndarray,
        buf: np.ndarray | None = None,
        timeout: float | None = None,
        give_up: Callable[[], bool] | None = None,
    ) -> tuple[int, bool]:
        """Add a complete, validated gradient. Returns (outcome, buffer_kept).

        `grad` is the caller's receive buffer `buf` (from `take_buffer`) or a read-only
        view of the request (held as it is when it arrives early). When buffer_kept is
        True the job holds that buffer (sync reordering) and gives it back itself;
        otherwise the caller may reuse it. A push that would close the step, that comes
        from the worker whose stream is being folded, or that finds the receive budget full
        of gradients held during that fold, first waits (up to `timeout`, then OverLimit;
        ShuttingDown once `give_up()`) for the fold to end: the step cannot close around a
        half-added push, and held gradients stay within the budget.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while (
                self._folding
                and self.state == pb.JOB_STATE_RUNNING
                and (
                    self._would_close(header)
                    or header.worker == self._fold_worker
                    or len(self._open.held) + 1 >= self.receive_slots  # the budget is full
                )
            ):
                self._stop_waiting(give_up, deadline, "still summing another worker's gradient")
                self.cond.wait(0.05)
            outcome = self._classify_counted(header)
            if outcome is not None:
                return outcome, False
            self.counters.received += 1
            self.counters.accepted += 1
            if self.settings.mode == "sync":
                kept = self._commit_sync(header, grad, buf)
            else:
                self._commit_async(header, grad)
                kept = False
            return pb.PUSH_OUTCOME_ACCEPTED, kept

    def _would_close(self, header: pb.PushHeader) -> bool:
        """Whether a sync gradient from this push would complete the open step."""
        step = self._open
        return (
            self.settings.mode == "sync"
            and header.worker not in step.contributors
            and len(step.contributors) + 1 >= self.settings.quorum
        )

    def _commit_sync(
        self, header: pb.PushHeader, grad: np.ndarray, buf: np.ndarray | None = None
    ) -> bool:
        step = self._open
        if not step.contributors:
            step.first_arrival = time.monotonic()
        if self._sum is None:
            self._sum = self.layout.empty()
        step.contributors[header.worker] = (header.rows, header.loss)
        step.needs_repush.discard(header.worker)
        closing = len(step.contributors) >= self.settings.quorum
        kept = False
        if self._folding:  # the sum is being written: hold it, the fold adds it after
            assert not closing  # `commit` waits for the fold when this push would close
            kept = grad is buf
            step.held[header.worker] = (grad, kept)
            return kept
        if header.worker == step.next_worker and step.ordered:
            step.next_worker += 1
            if closing and not step.held:  # the last gradient: added while averaging
                self._close_sync_step(step, last=grad)
                return False
            self._accumulate(header.worker, grad)
            self._drain_held(step)
        elif step.ordered and (closing or len(step.held) + 1 < self.receive_slots):
            kept = grad is buf  # a receive buffer keeps its slot until summed
            step.held[header.worker] = (grad, kept)
        else:
            if step.ordered:
                log.debug("job %s: receive slots full, summing in arrival order", self.job_id)
                step.ordered = False
                self._flush_held(step)
            if closing:  # arrival order: this gradient is the last one
                self._close_sync_step(step, last=grad)
                return False
            self._accumulate(header.worker, grad)
        if closing:
            self._flush_held(step)
            self._close_sync_step(step)
        return kept

    def _release_held(self, step: _OpenStep) -> None:
        """Add the held gradients that may go in now: those whose turn has come in worker
        order, all of them in arrival order. Called whenever a fold ends or a step starts
        again, so nothing held during a fold is left behind."""
        if step.ordered:
            self._drain_held(step)
        else:
            self._flush_held(step)

    def _drain_held(self, step: _OpenStep) -> None:
        while step.next_worker in step.held:
            self._add_held(step.next_worker, *step.held.pop(step.next_worker))
            step.next_worker += 1

    def _flush_held(self, step: _OpenStep) -> None:
        for worker in sorted(step.held):
            self._add_held(worker, *step.held.pop(worker))

    def _add_held(self, worker: int, grad: np.ndarray, owned: bool) -> None:
        self._accumulate(worker, grad)
        if owned:
            self._recycle(grad)

    def _accumulate(self, worker: int, grad: np.ndarray) -> None:
        """sum += grad in place, in the model's dtype; the first is copied (as local mode does)."""
        assert self._sum is not None
        self._open.summed.add(worker)
        if self._sum_empty:
            np.copyto(self._sum, grad)
            self._sum_empty = False
        else:
            with np.errstate(over="ignore"):  # an overflow stops the job at the close
                np.add(self._sum, grad, out=self._sum)

    def _recycle(self, buf: np.ndarray) -> None:
        """Keep a couple of buffers for reuse and free the receive slot."""
        if len(self._free_buffers) < 2:
            self._free_buffers.append(buf)
        self._slots.release()

    def _close_sync_step(self, step: _OpenStep, last: np.ndarray | None = None) -> None:
        """Average the step's gradients (`last`, if given, is added last) and apply them."""
        assert self._sum is not None
        count = len(step.contributors)
        mean = self._mean_of_sum(count, last)
        if mean is None:
            self._stop_on_overflow(step)
            return
        self._keep_for_readers()
        self.optimizer.step(mean)
        rows = sum(r for r, _ in step.contributors.values())
        if rows > 0:
            loss = sum(r * lo for r, lo in step.contributors.values()) / rows
        else:
            loss = sum(lo for _, lo in step.contributors.values()) / count
        self._closed_contributors.append((step.step, frozenset(step.contributors)))
        self.metrics.step_latency.observe(time.monotonic() - step.first_arrival)
        self._advance(loss, rows, count)
        self._open = _OpenStep(self.version)
        self._sum_empty = True

    def _stop_on_overflow(self, step: _OpenStep) -> None:
        """Finite gradients whose sum overflows the model's dtype: the weights stay as they
        are and the job stops with the reason logged, since training has diverged."""
        log.error(
            "job %s: the sum of step %d's gradients overflows %s although each was finite; "
            "the job is stopped at version %d with its weights unchanged. Lower the learning "
            "rate, clip gradients or train in float64.",
            self.job_id,
            step.step,
            self.layout.dtype.name,
            self.version,
        )
        self.counters.unaccept("overflow")
        self.state = pb.JOB_STATE_STOPPED
        self._sum_empty = True
        self.cond.notify_all()

    _BLOCK = 1 << 16  # elements per pass of the fused close: the block stays in cache

    def _mean_of_sum(self, count: int, last: np.ndarray | None) -> np.ndarray | None:
        """`(sum + last) / count` in place in the sum buffer, block by block in one pass;
        None if the sum overflowed (the gradients themselves were checked finite).

        Each element sees exactly the operations of `np.add` then `np.divide` over the
        whole buffer, so the numbers are the same; blocking only saves a second trip of
        the sum through memory. Dividing by a power of two is multiplying by its exact
        reciprocal: the same correctly rounded result, several times cheaper. One gradient
        (`last`, or the one already in the sum) is its own mean, bit for bit: (0 + g) / 1
        rounded to the model's dtype is g, and g was checked finite as it came.
        """
        if count == 1:
            return self._sum if last is None else last
        total = self.layout.total_elements
        block = self._BLOCK if total > 2 * self._BLOCK else total
        exact_reciprocal = count & (count - 1) == 0
        scale, factor = (np.multiply, 1.0 / count) if exact_reciprocal else (np.divide, count)
        mean = self._sum
        assert mean is not None
        finite = True
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below
            for lo in range(0, total, block):
                part = mean[lo : lo + block]
                if last is not None:
                    np.add(part, last[lo : lo + block], out=part)
                scale(part, factor, out=part)
                finite = finite and bool(np.isfinite(part).all())
        return mean if finite else None

    def _commit_async(self, header: pb.PushHeader, grad: np.ndarray) -> None:
        self.metrics.staleness.observe(self.version - header.step)
        self._keep_for_readers()
        self.optimizer.step(grad)
        seen = self._seen.setdefault(header.worker, set())
        seen.add(header.step)
        if len(seen) > self.settings.staleness_bound + _KEEP_CONTRIBUTORS:
            seen.discard(min(seen))
        self._advance(header.loss, header.rows, 1)

    def _advance(self, loss: float, rows: int, contributors: int) -> None:
        now = time.monotonic()
        elapsed = now - self._step_started
        self._step_started = now
        self.history.append(
            step=self.version,
            loss=float(loss),
            rows=int(rows),
            samples_per_sec=rows / elapsed if elapsed > 0 else 0.0,
            wall_time=time.time(),
            contributors=contributors,
        )
        self.version += 1
        if self.version >= self.settings.total_steps:
            self.state = pb.JOB_STATE_COMPLETED
        self._steps_applied.inc()
        self.cond.notify_all()
        if self.on_step is not None:
            self.on_step(self)

    # ---- pulls ---------------------------------------------------------------------
    def snapshot(self) -> WeightsSnapshot:
        """The pre-encoded weights of the current version, built once and shared.

        For weights that fit one message: every worker pulls the same bytes each step.
        """
        with self.cond:
            snap = self._snapshot
            if snap is not None and snap.version == self.version and snap.state == self.state:
                return snap
            header = self._weights_header()
            message = encode_chunk_message(0, as_bytes_view(self.weights), header)
            snap = WeightsSnapshot(self.version, self.state, (message,), self.layout.nbytes)
            self._snapshot = snap
            return snap

    def weight_messages(self) -> Iterator[bytes]:
        """The current version's weights as chunk messages, encoded one at a time.

        Only one chunk per stream is in memory: the stream reads the live weights, and
        a step that changes them while streams still read the old version first keeps a
        copy of that version for them (`_keep_for_readers`).
        """
        if self.weights_fit_one_message:
            yield from self.snapshot().messages
            return
        with self.cond:
            version = self.version
            header = self._weights_header()
            self._readers[version] = self._readers.get(version, 0) + 1
        try:
            for start in range(0, self.layout.nbytes, self.chunk_bytes):
                with self.cond:
                    source = self._kept.get(version, self.weights)
                    piece = as_bytes_view(source)[start : start + self.chunk_bytes]
                    message = encode_chunk_message(start, piece, header if start == 0 else b"")
                yield message
        finally:
            with self.cond:
                self._readers[version] -= 1
                if not self._readers[version]:
                    del self._readers[version]
                    self._kept.pop(version, None)

    def _weights_header(self) -> bytes:
        return pb.WeightsHeader(
            version=self.version,
            layout=self._layout_proto,
            total_bytes=self.layout.nbytes,
            state=self.state,
        ).SerializeToString()

    def _keep_for_readers(self) -> None:
        """Before the weights change in place: copy them for streams still reading them."""
        if self._readers.get(self.version) and self.version not in self._kept:
            self._kept[self.version] = self.weights.copy()

    def wait_for_version(
        self,
        min_version: int,
        timeout: float | None,
        is_stopping: Callable[[], bool],
        worker: int | None = None,
    ) -> bool:
        """Block until version >= min_version (True) or the timeout passes (False).

        A `worker` whose gradient of the open step was voided (`abort_fold`) gets
        StepReset instead of waiting for a step that needs its gradient again.
        """
        if min_version > self.settings.total_steps:
            raise WrongState(
                f"min_version {min_version} is beyond total_steps {self.settings.total_steps}; "
                "that version will never exist.",
                "bad_version",
            )
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.cond:
            while self.version < min_version:
                if self.state == pb.JOB_STATE_DELETED:
                    raise JobNotFound(f"job {self.job_id!r} was deleted.", "not_found")
                if self.state == pb.JOB_STATE_STOPPED:
                    raise WrongState(
                        f"job {self.job_id} stopped at version {self.version} before "
                        f"reaching version {min_version}.",
                        "stopped",
                    )
                if worker is not None and worker in self._open.needs_repush:
                    raise StepReset(
                        f"step {self._open.step} of job {self.job_id} started again because "
                        f"another push failed half-way; push worker {worker}'s gradient again.",
                        "step_reset",
                    )
                if is_stopping():
                    return False
                remaining = 1.0 if deadline is None else deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self.cond.wait(min(remaining, 1.0))
            return True

    # ---- info ----------------------------------------------------------------------
    def info(self, history_since: int = 0, with_history: bool = True) -> pb.JobInfo:
        with self.cond:
            msg = pb.JobInfo(
                job_id=self.job_id,
                spec=self.spec,
                state=self.state,
                version=self.version,
                layout=self.layout.to_proto(),
                counters=self.counters.to_proto(),
                created_at=self.created_at,
                last_checkpoint_version=self.last_checkpoint_version,
            )
            page = self.history.page(history_since, self.HISTORY_PAGE) if with_history else None
        if page is not None:  # the records are built outside the lock
            msg.history.extend(page.records())
            msg.history_more = page.more
        return msg

    def stop(self) -> None:
        with self.cond:
            if self.state == pb.JOB_STATE_RUNNING:
                self.state = pb.JOB_STATE_STOPPED
            self.cond.notify_all()

    def mark_deleted(self) -> None:
        with self.cond:
            self.state = pb.JOB_STATE_DELETED
            self.cond.notify_all()
