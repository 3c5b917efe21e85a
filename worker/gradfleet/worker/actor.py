"""The gradient worker: pull weights at version v, compute on its shard, push, repeat.

It runs as a Ray actor (see ``ray_runner``) but is a plain class, so it is also usable
in a thread. It talks to the parameter server only over gRPC. Its batches depend only
on (seed, v, worker), so a restarted worker simply asks the server for its current
version and carries on: in sync mode nothing is lost and nothing is counted twice.

With ``server_actor_name`` (the server runs as a named Ray actor, see
``gradfleet.client.cluster``), a worker that finds the server unreachable asks that actor
for its current address: after a node loss Ray restarts the server elsewhere, it resumes
from its last checkpoint, and the worker carries on from the server's version.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradfleet.nn import MLP
from gradfleet.proto.runtime import long_lived_objects_frozen
from gradfleet.worker.batches import BatchPlan
from gradfleet.worker.ps_client import ParameterServerClient, ParameterServerError

logger = logging.getLogger(__name__)
# Ray namespace of the named server actors (``gradfleet.client.cluster`` creates them).
SERVER_ACTOR_NAMESPACE = "gradfleet"
# Longest wait for a new version before re-syncing with the server's current one.
PULL_WAIT = 10.0
# With a server actor to ask, a client retries an unreachable server this often (about
# 1.5-5 s of backoff) and then asks the actor where the server is now, instead of
# retrying a dead node's address for the client's whole timeout.
RETRIES_WITH_SERVER_ACTOR = 5
# How long a worker (and the trainer) keeps trying to reach an unreachable server.
SERVER_PATIENCE = 120.0


def server_client(address: str, token: str | None, via_actor: bool) -> ParameterServerClient:
    """A client of the server at ``address``; when a server actor can say where the server
    went (``via_actor``), it gives up on an unreachable address after a few retries."""
    retries = RETRIES_WITH_SERVER_ACTOR if via_actor else None
    return ParameterServerClient(address, token=token, retries=retries)


class GradientWorker:
    """One data-parallel worker owning one shard of the training data."""

    def __init__(
        self,
        address: str,
        job_id: str,
        worker: int,
        x: Any,
        y: np.ndarray | None,
        model_spec: dict[str, Any],
        loss: str,
        rows_per_worker: int,
        seed: int,
        total_steps: int,
        mode: str = "sync",
        token: str | None = None,
        blas_threads: int = 1,
        server_actor_name: str | None = None,
        server_patience: float = SERVER_PATIENCE,
        num_workers: int = 1,
    ) -> None:
        # One BLAS thread per worker: workers share the node's cores with each other.
        self._blas_limit = threadpool_limits(blas_threads)
        self.job_id, self.worker, self.mode = job_id, worker, mode
        if y is None:  # a Ray Data shard: this worker turns its own rows into arrays
            x, y = x.arrays()
        self.x, self.y, self.loss = x, y, loss
        self.total_steps = total_steps
        self.model = MLP.from_spec(model_spec)
        self.grad = np.empty_like(self.model.flat)
        self.plan = BatchPlan(seed, worker, len(x), rows_per_worker)
        self.num_workers = num_workers
        # async: this worker's own step count picks its batches (see `_batch_step`)
        self._own_steps = 0
        self.token, self.server_actor_name = token, server_actor_name
        self.client = server_client(address, token, via_actor=bool(server_actor_name))
        # pull: plain pulls (first step, re-syncs); exchange: push + wait for the step + pull
        self.timings = {"pull": 0.0, "compute": 0.0, "exchange": 0.0, "steps": 0, "stale": 0}
        self.server_patience = server_patience
        self._unavailable_since: float | None = None

    def pid(self) -> int:
        """The worker's process id (tests use it to kill the process)."""
        return os.getpid()

    def run(self) -> dict[str, float]:
        """Train until the job's version reaches ``total_steps``; return time per phase.

        One call per step after the first: ``push_and_pull`` sends the gradient of
        version v and answers with the weights of the next version once the step has
        closed (sync) or at once (async: whatever is newest). A plain pull is needed only
        at the start and after ``_recover``.
        """
        with long_lived_objects_frozen():  # no full-GC pauses in the step loop
            return self._train_loop()

    def _train_loop(self) -> dict[str, float]:
        version, synced = 0, False
        while True:
            try:
                started = time.perf_counter()
                if not synced:
                    version, _ = self.client.pull_weights(
                        self.job_id, min_version=version, out=self.model.flat, timeout=PULL_WAIT
                    )
                    synced = True
                    self._own_steps = max(self._own_steps, version // self.num_workers)
                pulled = time.perf_counter()
                if version >= self.total_steps:
                    break
                rows = self.plan.indices(self._batch_step(version))
                loss, _ = self.model.loss_and_grads(
                    self.x[rows], self.y[rows], self.loss, out=self.grad
                )
                computed = time.perf_counter()
                version, _ = self.client.push_and_pull(
                    self.job_id,
                    self.worker,
                    version,
                    len(rows),
                    loss,
                    self.grad,
                    out=self.model.flat,
                    timeout=PULL_WAIT,
                )
            except ParameterServerError as exc:
                version, synced = self._recover(exc), False
                continue
            self._own_steps += 1
            self._unavailable_since = None
            self.timings["pull"] += pulled - started
            self.timings["compute"] += computed - pulled
            self.timings["exchange"] += time.perf_counter() - computed
            self.timings["steps"] += 1
        self.client.close()
        return dict(self.timings)

    def _batch_step(self, version: int) -> int:
        """Which of this worker's batches to use: step ``version`` in sync mode; in async
        mode the worker's own count of gradients, since the job's version moves about N
        per gradient of one worker and indexing by it would skip some rows of each epoch
        and repeat others. After a restart the count resumes at version // N, where an
        even share of the job's updates would have put it."""
        return self._own_steps if self.mode == "async" else version

    def _recover(self, exc: ParameterServerError) -> int:
        """Decide how to go on after a failed call; returns the version to pull next (0 =
        whatever the server has now). Anything but a known transient condition re-raises."""
        if exc.code == "DEADLINE_EXCEEDED":
            # No new version in PULL_WAIT: a peer is slow or restarting, or the server
            # restarted from an older checkpoint. Re-sync; a repeated push is a duplicate.
            return 0
        if exc.code == "ABORTED":
            # The server voided this step's gradient more often than push_and_pull retries
            # (other pushes kept failing half-way): take the server's state afresh.
            return 0
        if exc.code == "FAILED_PRECONDITION" and exc.reason == "stopped":
            raise exc  # the job was stopped (by a user, or because training diverged)
        if exc.code == "FAILED_PRECONDITION":
            # Async: too stale. Sync: a step the server does not have (it went back to a
            # checkpoint). Either way, take the server's current version.
            self.timings["stale"] += self.mode == "async"
            return 0
        if exc.code not in ("UNAVAILABLE", "CANCELLED"):  # CANCELLED: the server stopped mid-call
            raise exc
        now = time.monotonic()
        self._unavailable_since = self._unavailable_since or now
        if now - self._unavailable_since > self.server_patience:
            raise ParameterServerError(
                "UNAVAILABLE",
                f"worker {self.worker} could not reach the parameter server for "
                f"{self.server_patience:.0f}s; giving up",
            ) from exc
        if self.server_actor_name is not None:  # a new address restarts the patience
            self._reconnect()
            return 0
        time.sleep(0.5)
        return 0

    def _reconnect(self) -> None:
        """Ask the named server actor for its address (Ray may be restarting it)."""
        import ray

        assert self.server_actor_name is not None
        try:
            server = ray.get_actor(self.server_actor_name, namespace=SERVER_ACTOR_NAMESPACE)
            address = str(ray.get(server.get_address.remote(), timeout=300))
        except (ValueError, ray.exceptions.RayActorError) as exc:
            raise ParameterServerError(
                "UNAVAILABLE",
                f"the parameter server actor {self.server_actor_name} is gone and was not "
                "restarted; give the job a checkpoint directory every node can read so that "
                "it can resume after a node loss.",
            ) from exc
        if address == self.client.address:
            return  # the same server, still unreachable: patience keeps running
        logger.warning("worker %d: parameter server moved to %s", self.worker, address)
        self.client.close()
        self.client = server_client(address, self.token, via_actor=True)
        self._unavailable_since = None  # a restarted server gets the full patience
