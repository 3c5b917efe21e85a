"""The Ray workers of an elastic job: as many as the cluster's CPUs (or ``gradfleet
scale``) ask for, within the job's min_workers..max_workers, changed at step boundaries.

Every poll compares the workers running with the size wanted: the size a ScaleJob asked
for, else as many as the cluster's live CPUs hold. A new worker is started first, and
made a member (from the next step) only once its actor is up, so the job never waits
for an actor being scheduled; a worker whose actor died (its node went) is removed from
the step it has not pushed to; when the job shrinks, the workers with the highest ids
leave at the next step and end their loop. Every worker reads the whole dataset (one
copy in the object store per node), as the elastic plan hands any row to any member.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray

from gradfleet.proto.errors import GradfleetError, WrongState
from gradfleet.worker.actor import GradientWorker, ServerClient, WorkerSpec
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset
from gradfleet.worker.ray_runner import PollFn, WorkerOptions, kill_and_wait

logger = logging.getLogger(__name__)


@dataclass
class _Running:
    actor: Any
    ready: Any  # the actor's readiness probe, until it is a member
    run: Any = None  # its run task, once it is a member


class ElasticWorkers:
    """The workers of one elastic job; `run` sees it to the end."""

    def __init__(
        self,
        job: JobConfig,
        client: ServerClient,
        address: str,
        job_id: str,
        token: str | None,
        options: WorkerOptions | None,
        server_actor_name: str | None,
    ) -> None:
        self.job, self.client, self.job_id = job, client, job_id
        self.options = options or WorkerOptions()
        self.cpus = 1.0 if self.options.num_cpus is None else self.options.num_cpus
        data = job.data
        assert isinstance(data, ArrayDataset)
        self._x, self._y = ray.put(data.x), ray.put(data.y)
        self._spec = {"token": token, "blas_threads": self.options.blas_threads,
                      "server_actor_name": server_actor_name}  # fmt: skip
        self._address = address
        self._actor_class = ray.remote(GradientWorker).options(
            num_cpus=self.cpus,
            resources=self.options.resources or None,
            max_restarts=0,  # a lost worker leaves the job; a new one may take its place
            scheduling_strategy="SPREAD",
        )
        self.workers: dict[int, _Running] = {}
        self.timings: list[dict[str, float]] = []
        for worker in range(job.workers):  # the first members, from step 0
            self._start(worker)
            running = self.workers[worker]
            running.run = running.actor.run.remote(self._x, self._y)

    def _start(self, worker: int) -> None:
        spec = WorkerSpec.for_job(self.job, self._address, self.job_id, worker, **self._spec)
        actor: Any = self._actor_class.remote(spec)
        self.workers[worker] = _Running(actor, actor.__ray_ready__.remote())

    def run(self, poll: PollFn | None = None, poll_every: float = 0.5) -> list[dict]:
        """Keep the workers to the wanted size until the job is done; their timings."""
        while True:
            info = self.client.get_job(self.job_id, history=False)
            if info.version >= self.job.total_steps:
                break
            self._reap(set(info.members))
            self._resize(self.client.get_job(self.job_id, history=False))
            if poll is not None:
                poll()
            runs = [w.run for w in self.workers.values() if w.run is not None]
            if runs:
                ray.wait(runs, num_returns=1, timeout=poll_every)
            else:
                time.sleep(poll_every)
        for worker, running in list(self.workers.items()):
            if running.run is not None:
                self._finish(worker, running)
        return self.timings

    def _reap(self, members: set[int]) -> None:
        """Collect the workers whose loop ended: removed, or dead (then removed)."""
        for worker, running in list(self.workers.items()):
            if running.run is None:
                ready, _ = ray.wait([running.ready], timeout=0)
                if ready:
                    try:
                        ray.get(running.ready)
                    except ray.exceptions.RayActorError:
                        del self.workers[worker]  # died before it joined: nothing to undo
                continue
            done, _ = ray.wait([running.run], timeout=0)
            if done:
                lost = not self._finish(worker, running)
                if lost and worker in members:
                    members.discard(worker)
                    self._set_members(sorted(members), "lost", at_once=True)

    def _finish(self, worker: int, running: _Running) -> bool:
        """Take a worker's timings and let its actor go; False when it died instead."""
        del self.workers[worker]
        try:
            self.timings.append(ray.get(running.run))
        except ray.exceptions.RayActorError as exc:
            logger.warning("worker %d of job %s was lost: %s", worker, self.job_id, exc)
            return False
        except ray.exceptions.RayTaskError as exc:
            kill_and_wait([running.actor])
            if isinstance(exc.cause, GradfleetError):
                raise type(exc.cause)(exc.cause.message, exc.cause.reason) from None
            raise
        kill_and_wait([running.actor])  # its loop ended: the job is done or it left
        return True

    def wanted(self, requested: int) -> int:
        """The size to keep: what ScaleJob asked for, else what the live CPUs hold."""
        low, high = self.job.worker_bounds
        if requested:
            return max(low, min(high, requested))
        cpus = sum(node["Resources"].get("CPU", 0.0) for node in ray.nodes() if node.get("Alive"))
        return max(low, min(high, int(cpus // self.cpus + 1e-9)))

    def _resize(self, info: Any) -> None:
        members = set(info.next_members) if info.next_members else set(info.members)
        target = self.wanted(info.requested_workers)
        starting = [w for w, r in self.workers.items() if r.run is None]
        joining: list[int] = []
        for worker in starting:
            ready, _ = ray.wait([self.workers[worker].ready], timeout=0)
            if ready and len(members) + len(joining) < target:
                joining.append(worker)
        if joining:
            new = sorted(members | set(joining))
            if self._set_members(new, "join"):
                for worker in joining:
                    running = self.workers[worker]
                    running.run = running.actor.run.remote(self._x, self._y)
                members = set(new)
        if len(members) > target:
            leaving = sorted(members)[target:]
            self._set_members(sorted(members)[:target], "scale")
            logger.info("job %s: workers %s leave (size %d)", self.job_id, leaving, target)
        waiting = [w for w in starting if w not in joining]
        needed = max(0, target - len(members))
        free = [w for w in range(self.job.worker_bounds[1]) if w not in self.workers]
        for worker in free[: max(0, needed - len(waiting))]:
            self._start(worker)
        for worker in waiting[needed:]:  # started for a size no longer wanted
            kill_and_wait([self.workers.pop(worker).actor])

    def _set_members(self, members: list[int], reason: str, at_once: bool = False) -> bool:
        """Make `members` the job's, as soon as may be (every shard of a sharded job
        from one step; `at_once`: each as soon as it may, for a lost worker). False when
        the change does not fit the job (logged) or the step moved on meanwhile."""
        try:
            self.client.set_members(self.job_id, members, reason, at_once=at_once)
            return True
        except WrongState:  # the step moved on meanwhile: next poll tries again
            return False
        except GradfleetError as exc:
            logger.warning("job %s cannot have workers %s: %s", self.job_id, members, exc)
            return False

    def stop(self) -> None:
        kill_and_wait([running.actor for running in self.workers.values()])
        self.workers.clear()
