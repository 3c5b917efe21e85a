"""The gradient worker: pull weights at version v, compute on its shard, push, repeat.

It runs as a Ray actor (see ``ray_runner``) but is a plain class, so it also runs in a
thread. It talks to the parameter server only over gRPC. Its batches depend only on
(seed, v, worker), so a restarted worker asks the server for its current version and
carries on: in sync mode nothing is lost and nothing is counted twice.

With ``overlap`` each step is one PushAndPull stream (``gradfleet.proto.exchange``): the
backward pass sends each layer's gradient as soon as it is written, and the next forward
pass starts on the first layer while the later layers' weights are still arriving. An
exchange that fails is redone as a plain ``push_and_pull`` of the same step. A model
whose gradient and weights each fit one message keeps the one unary call per step.

When the server runs as a named Ray actor (``gradfleet.client.cluster``), the worker's
client asks that actor where the server is whenever it stops answering: after a node
loss Ray restarts the server elsewhere, it resumes from its last checkpoint, and the
worker carries on from the server's version.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import (
    DeadlineExceeded,
    GradfleetError,
    InvalidArgument,
    JobStopped,
    Reason,
    ServerUnavailable,
    TrainingDiverged,
    WrongState,
)
from gradfleet.proto.exchange import StreamedExchange
from gradfleet.proto.runtime import long_lived_objects_frozen
from gradfleet.proto.sharded import ShardedClient, ShardedExchange
from gradfleet.worker.batches import BatchPlan
from gradfleet.worker.config import JobConfig
from gradfleet.worker.elastic import ElasticPlan, Timeline, timeline_of

logger = logging.getLogger(__name__)
# Ray namespace of the named server actors (``gradfleet.client.cluster`` creates them).
SERVER_ACTOR_NAMESPACE = "gradfleet"
# How long workers and the trainer keep trying a server that does not answer.
SERVER_PATIENCE = 120.0


def server_locator(
    actor_name: str | None, ray_address: str | None = None
) -> Callable[[], str] | None:
    """For a server running as the named Ray actor: a function that asks the actor for
    the server's current address (waiting while Ray restarts it). A process outside Ray
    gives the cluster's `ray_address`, joined the first time the server must be found."""
    if actor_name is None:
        return None

    def locate() -> str:
        import ray

        if ray_address is not None and not ray.is_initialized():
            from gradfleet.worker.ray_runner import init_ray

            init_ray(address=ray_address, logging_level=logging.ERROR, log_to_driver=False)
        for _ in range(3):
            try:
                server = ray.get_actor(actor_name, namespace=SERVER_ACTOR_NAMESPACE)
                return str(ray.get(server.get_address.remote(), timeout=300))
            except ValueError as exc:  # no actor by that name any more
                raise _gone(actor_name) from exc
            except ray.exceptions.RayActorError as exc:
                # asked just as it died: a call to an actor Ray restarts waits for it, a
                # call to one dead for good fails again
                error = exc
                time.sleep(1.0)
        raise _gone(actor_name) from error

    return locate


def _gone(actor_name: str) -> ServerUnavailable:
    return ServerUnavailable(
        f"the parameter server actor {actor_name} is gone and was not restarted; give the "
        "job a checkpoint directory every node can read so that it can resume after a "
        "node loss"
    )


ServerClient = ParameterServerClient | ShardedClient  # one server, or the shards of a job
Exchange = StreamedExchange | ShardedExchange


class _ExchangeFailed(Exception):
    """The stream of an overlapped step failed (`cause`), seen while the next computed."""

    def __init__(self, exchange: Exchange, cause: GradfleetError) -> None:
        super().__init__(str(cause))
        self.exchange, self.cause = exchange, cause


def _settled(exchange: Exchange, wait: Callable[[], Any]) -> Any:
    """`wait()` on an overlapped step's exchange; its failure as `_ExchangeFailed`."""
    try:
        return wait()
    except GradfleetError as exc:
        raise _ExchangeFailed(exchange, exc) from None


def server_client(
    address: str,
    token: str | None,
    actor_name: str | None,
    patience: float,
    ray_address: str | None = None,
) -> ServerClient:
    """A client of the server at ``address`` that follows it if it moves (server actor);
    of every shard when ``address`` (and ``actor_name``) list several, comma-separated.
    `ray_address` is for a process outside Ray (see `server_locator`)."""
    addresses = address.split(",")
    names: list[str | None] = list(actor_name.split(",")) if actor_name else [None] * len(addresses)
    clients = [
        ParameterServerClient(
            a, token=token, patience=patience, locate=server_locator(n, ray_address)
        )
        for a, n in zip(addresses, names, strict=True)
    ]
    return clients[0] if len(clients) == 1 else ShardedClient(clients)


def _restarted_by_ray() -> bool:
    """Whether this worker is a Ray actor that Ray restarted after a failure."""
    if "ray" not in sys.modules:
        return False
    import ray

    if not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    return context.get_actor_id() is not None and context.was_current_actor_reconstructed


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker needs besides its rows: the job, the server, how to train."""

    address: str  # host:port, or one per shard, comma-separated
    job_id: str
    worker: int
    num_workers: int
    model_spec: dict[str, Any]
    loss: str
    rows_per_worker: int
    seed: int
    total_steps: int
    mode: str = "sync"
    token: str | None = field(default=None, repr=False)
    blas_threads: int = 1  # workers share a node's cores with each other
    server_actor_name: str | None = None
    server_patience: float = SERVER_PATIENCE
    pull_wait: float = 10.0  # longest wait for a new version before re-syncing
    overlap: bool = False  # push layer by layer during backward; see the module docstring
    plan: ElasticPlan | None = None  # an elastic job's rows (its run gets every row)

    @classmethod
    def for_job(
        cls, job: JobConfig, address: str, job_id: str, worker: int, **settings: Any
    ) -> WorkerSpec:
        """Worker `worker` of `job` (created on the server at `address` as `job_id`);
        `settings` sets the fields that do not come from the job."""
        return cls(
            address=address,
            job_id=job_id,
            worker=worker,
            num_workers=job.workers,
            model_spec=job.model_spec,
            loss=job.loss,
            rows_per_worker=job.rows_per_worker,
            seed=job.seed,
            total_steps=job.total_steps,
            mode=job.mode,
            overlap=job.overlap,
            plan=job.elastic_plan() if job.elastic else None,
            **settings,
        )


class GradientWorker:
    """One data-parallel worker; ``run`` trains it on its shard of the data."""

    def __init__(self, spec: WorkerSpec) -> None:
        self.spec = spec
        self.model = MLP.from_spec(spec.model_spec)
        self.grad = np.empty_like(self.model.flat)
        self._own_steps = 0  # async: this worker's own step count picks its batches
        self.client = server_client(
            spec.address, spec.token, spec.server_actor_name, spec.server_patience
        )
        # pull: plain pulls (first step, re-syncs); exchange: push + wait for the step + pull
        self.timings = {"pull": 0.0, "compute": 0.0, "exchange": 0.0, "steps": 0, "stale": 0}

    def run(self, x: Any, y: np.ndarray | None) -> dict[str, float]:
        """Train on the shard (x, y) until the job's version reaches ``total_steps``;
        return time per phase. ``y`` is None when ``x`` is a Ray Data shard, whose rows the
        worker reads itself. (Ray passes the shard to each try of this call, also on a
        restarted actor, so the actor is built from its spec alone.)

        One call per step after the first: ``push_and_pull`` sends the gradient of
        version v and answers with the weights of the next version once the step has
        closed (sync) or at once (async: whatever is newest). A plain pull is needed only
        at the start and after a re-sync.
        """
        if y is None:
            x, y = x.arrays()
        self.x, self.y = x, y
        self.plan = BatchPlan(self.spec.seed, self.spec.worker, len(x), self.spec.rows_per_worker)
        self._timeline: Timeline | None = None  # an elastic job's members, step by step
        self._events_seen, self._next, self._joined = -1, ((), 0), False
        # the BLAS threads change a product's rounding: every backend computes with the same
        with threadpool_limits(self.spec.blas_threads), long_lived_objects_frozen():
            try:
                return self._train_loop()
            finally:
                self.client.close()

    def _train_loop(self) -> dict[str, float]:
        spec, version, synced = self.spec, 0, False
        # a one-message exchange is one unary call: cheapest, and nothing to overlap
        overlap = spec.overlap and not self.client.exchanges_in_one_message(spec.job_id)
        pending: Exchange | None = None  # overlap: the last step's, its weights coming
        while True:
            try:
                started = time.perf_counter()
                if pending is not None:
                    version = _settled(pending, pending.wait_version)
                elif not synced:
                    version, _ = self.client.pull_weights(
                        spec.job_id,
                        min_version=version,
                        out=self.model.flat,
                        timeout=spec.pull_wait,
                    )
                    synced = True
                    if not self.timings["steps"] and _restarted_by_ray():
                        self._own_steps = version // spec.num_workers
                pulled = time.perf_counter()
                if version >= spec.total_steps:
                    if pending is not None:
                        _settled(pending, pending.finish)
                    break
                rows = self._rows(version)
                if not isinstance(rows, np.ndarray):  # not a member of this step
                    if pending is not None:
                        _settled(pending, pending.finish)
                        pending = None
                    if rows is None:
                        break  # removed from the job
                    version, synced = rows, False  # wait for the step it joins at
                    continue
                if overlap:
                    loss, pending = self._overlapped(version, rows, pending)
                    computed = exchanged = time.perf_counter()
                else:
                    with np.errstate(all="ignore"):  # a diverging step is reported below, once
                        loss, _ = self.model.loss_and_grads(
                            self.x[rows], self.y[rows], spec.loss, out=self.grad
                        )
                    if not math.isfinite(loss):
                        raise TrainingDiverged.at_step(version + 1, "loss")
                    computed = time.perf_counter()
                    version, _ = self._exchange(version, len(rows), loss)
                    exchanged = time.perf_counter()
            except _ExchangeFailed as failed:  # the last step's stream: redo it plainly
                pending = None
                try:
                    version, synced = self._redo(failed)
                except (DeadlineExceeded, WrongState) as exc:  # as below: re-sync
                    logger.debug("worker %d re-syncs: %s", spec.worker, exc)
                    self.timings["stale"] += spec.mode == "async" and not isinstance(
                        exc, DeadlineExceeded
                    )
                    version, synced = 0, False
                continue
            except JobStopped:
                raise  # stopped by a user, or because training diverged
            except (DeadlineExceeded, WrongState) as exc:
                # No new version in time (a peer is slow or restarting), too stale (async),
                # or a step the server does not have (it went back to a checkpoint): take
                # the server's current version. A repeated push is a duplicate.
                logger.debug("worker %d re-syncs: %s", spec.worker, exc)
                self.timings["stale"] += spec.mode == "async" and not isinstance(
                    exc, DeadlineExceeded
                )
                version, synced, pending = 0, False, None
                continue
            self._own_steps += 1
            self.timings["pull"] += pulled - started
            self.timings["compute"] += computed - pulled
            self.timings["exchange"] += exchanged - computed
            self.timings["steps"] += 1
        return dict(self.timings)

    def _overlapped(
        self, version: int, rows: np.ndarray, pending: Exchange | None
    ) -> tuple[float, Exchange]:
        """Compute step `version` while `pending`'s weights still arrive, sending each
        layer's gradient as it is written; returns (loss, this step's exchange)."""
        spec, ranges = self.spec, self._layer_ranges
        exchange = self.client.begin_exchange(
            spec.job_id, spec.worker, version, self.grad, out=self.model.flat,
            timeout=spec.pull_wait,
        )  # fmt: skip

        def before_layer(i: int) -> None:
            if pending is not None:
                _settled(pending, lambda: pending.wait(*ranges[i]))
                if i == len(ranges) - 1:  # all weights in before backward reuses `grad`
                    _settled(pending, pending.finish)

        def grads_ready(loss: float, i: int) -> None:
            if not math.isfinite(loss):
                raise TrainingDiverged.at_step(version + 1, "loss")
            exchange.send(*ranges[i], len(rows), loss)

        try:
            with np.errstate(all="ignore"):
                loss, _ = self.model.loss_and_grads(
                    self.x[rows], self.y[rows], spec.loss, out=self.grad,
                    before_layer=before_layer, grads_ready=grads_ready,
                )  # fmt: skip
        except BaseException:
            exchange.cancel()
            raise
        exchange.close()
        return loss, exchange

    def _redo(self, failed: _ExchangeFailed) -> tuple[int, bool]:
        """Redo a step whose stream failed as a plain exchange (the same payload: pushes
        are idempotent); returns (version, synced). `grad` still holds its gradient."""
        exc, exchange = failed.cause, failed.exchange
        if isinstance(exc, JobStopped):
            raise exc
        if isinstance(exc, InvalidArgument) and exc.reason is Reason.NON_FINITE:
            raise TrainingDiverged.at_step(exchange.step + 1, "gradients") from None
        if isinstance(exc, DeadlineExceeded | WrongState):
            logger.debug("worker %d re-syncs: %s", self.spec.worker, exc)
            return 0, False
        logger.debug("worker %d redoes step %d: %s", self.spec.worker, exchange.step, exc)
        version, _ = self._exchange(exchange.step, exchange.rows, exchange.loss)
        return version, True

    @property
    def _layer_ranges(self) -> list[tuple[int, int]]:
        """The flat element range [start, stop) of each layer's weight and bias."""
        entries = self.model.layout
        return [
            (entries[2 * i][2], entries[2 * i + 1][2] + int(np.prod(entries[2 * i + 1][1])))
            for i in range(len(entries) // 2)
        ]

    def _exchange(self, version: int, rows: int, loss: float) -> tuple[int, np.ndarray]:
        """Push this step's gradient and take the next weights into the model."""
        spec = self.spec
        try:
            return self.client.push_and_pull(
                spec.job_id,
                spec.worker,
                version,
                rows,
                loss,
                self.grad,
                out=self.model.flat,
                timeout=spec.pull_wait,
            )
        except InvalidArgument as exc:
            if exc.reason is Reason.NON_FINITE:  # a finite loss, a gradient that overflowed
                raise TrainingDiverged.at_step(version + 1, "gradients") from None
            raise

    def _rows(self, version: int) -> np.ndarray | int | None:
        """This worker's rows of step `version`. An elastic job's worker that is not a
        member of that step gets the version to wait for instead (it joins later), or
        None once it has left the job."""
        spec = self.spec
        if spec.plan is None:
            return self.plan.indices(self._batch_step(version))
        seen = self.client.membership_events(spec.job_id)
        if self._timeline is None or seen != self._events_seen:
            info = self.client.get_job(spec.job_id, history=False)
            self._timeline, self._events_seen = timeline_of(info), len(info.membership)
            self._next = (tuple(info.next_members), info.next_members_version)
        sync = spec.mode == "sync"
        members = self._timeline.planned(version) if sync else self._timeline.members(version)
        if spec.worker in members:
            self._joined = True
            if sync:
                return spec.plan.indices(version, spec.worker, self._timeline)
            return spec.plan.async_indices(self._own_steps, spec.worker, members)
        if spec.worker in self._next[0]:
            return max(self._next[1], version + 1)
        return None if self._joined else version + 1

    def _batch_step(self, version: int) -> int:
        """Which of this worker's batches to use: step ``version`` in sync mode; in async
        mode the worker's own count of gradients, since the job's version moves about N
        per gradient of one worker and indexing by it would skip some rows of each epoch
        and repeat others. A worker Ray restarted starts counting at version // N, where
        an even share of the job's updates would have put it; a new worker starts at 0,
        and a re-sync keeps the count, so no batch is skipped."""
        return self._own_steps if self.spec.mode == "async" else version
