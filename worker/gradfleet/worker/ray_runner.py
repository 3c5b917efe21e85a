"""Launch one Ray actor per shard against a running parameter server and see the job through.

Each shard is put in Ray's object store once and handed to its actor; actors are spread
over nodes (SPREAD) and restarted by Ray when they die (``max_restarts``), and their
``run`` task is retried on the restarted actor, which resumes at the server's version.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import ray

from gradfleet.proto.errors import GradfleetError
from gradfleet.worker.actor import GradientWorker, WorkerSpec
from gradfleet.worker.batches import shard_rows
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset
from gradfleet.worker.ray_data import RayDataset

logger = logging.getLogger(__name__)
PollFn = Callable[[], None]


def init_ray(**kwargs: Any) -> Any:
    """``ray.init(**kwargs)``, tried a second time if Ray's GCS never came up.

    Ray starts its GCS with a ``preexec_fn``, which Python warns is unsafe while other
    threads run: in a process that already has gRPC threads (a parameter server, a client)
    the forked child has been seen to hang before exec, and Ray gives up waiting for the
    GCS's port file. A second start, in a new session, has always worked.
    """
    try:
        return ray.init(**kwargs)
    except RuntimeError as exc:
        if "gcs_server_port" not in str(exc):
            raise
        logger.warning("Ray's GCS did not start (%s); starting Ray again", exc)
        ray.shutdown()
        return ray.init(**kwargs)


class WorkersFailed(RuntimeError):
    """The workers died more often than ``max_restarts`` allows; the job cannot finish."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), self.args)


@dataclass
class WorkerOptions:
    """How each worker actor is scheduled: CPUs, custom resources, restarts."""

    num_cpus: float | None = None  # None: min(1, cluster CPUs / workers)
    resources: dict[str, float] = field(default_factory=dict)
    max_restarts: int = 3
    blas_threads: int = 1


@dataclass
class WorkerGroup:
    """The actors of one job and the shard each one trains on (object-store references,
    or Ray Data splits). Each shard is passed to its actor's ``run``, which Ray calls
    again on a restarted actor, so the group holds the shards for the job's lifetime."""

    actors: list[Any]
    shards: list[tuple[Any, Any]]


def start_workers(
    job: JobConfig,
    address: str,
    job_id: str,
    token: str | None = None,
    options: WorkerOptions | None = None,
    server_actor_name: str | None = None,
) -> WorkerGroup:
    """Create the actors (one per shard).

    ``server_actor_name`` names the server's Ray actor when it runs as one: workers ask it
    for the server's new address if the server moves to another node.
    """
    options = options or WorkerOptions()
    data = job.data
    num_cpus = options.num_cpus
    if num_cpus is None:
        num_cpus = min(1.0, ray.cluster_resources().get("CPU", 1.0) / job.workers)
    actor_class = ray.remote(GradientWorker).options(
        num_cpus=num_cpus,
        resources=options.resources or None,
        max_restarts=options.max_restarts,
        max_task_retries=-1 if options.max_restarts else 0,
        scheduling_strategy="SPREAD",
    )
    if isinstance(data, RayDataset):
        # Ray Data splits the rows in the object store; each actor reads its own split.
        shards: list[tuple[Any, Any]] = [(shard, None) for shard in data.shards(job.workers)]
    else:
        assert isinstance(data, ArrayDataset)
        # Each shard is put once; Ray resolves these top-level references for each try
        # of the actor's run (again on a restarted actor).
        shards = []
        for worker in range(job.workers):
            start, stop = shard_rows(len(data.x), worker, job.workers)
            shards.append((ray.put(data.x[start:stop]), ray.put(data.y[start:stop])))
    actors = [
        actor_class.remote(
            WorkerSpec.for_job(
                job,
                address,
                job_id,
                worker,
                token=token,
                blas_threads=options.blas_threads,
                server_actor_name=server_actor_name,
            )
        )
        for worker in range(job.workers)
    ]
    return WorkerGroup(actors, shards)


def run_workers(
    group: WorkerGroup, poll: PollFn | None = None, poll_every: float = 0.5
) -> list[dict]:
    """Run every actor's loop to the end, calling ``poll`` meanwhile; returns their timings.

    Raises ``WorkersFailed`` as soon as one actor is gone for good: its peers cannot close
    another sync step without it, so waiting for them would wait forever.
    """
    refs = [
        actor.run.remote(x, y) for actor, (x, y) in zip(group.actors, group.shards, strict=True)
    ]
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_every)
        for ref in ready:
            _result_or_raise(ref, refs.index(ref))
        if poll is not None:
            poll()
    return [_result_or_raise(ref, worker) for worker, ref in enumerate(refs)]


def _result_or_raise(ref: Any, worker: int) -> dict:
    """A worker's timings, or its error: ours as they were raised (one sentence, without
    Ray's wrapping), a death beyond its restarts as WorkersFailed."""
    try:
        return ray.get(ref)  # type: ignore[no-any-return]
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, GradfleetError):
            raise type(exc.cause)(exc.cause.message, exc.cause.reason) from None
        raise
    except (ray.exceptions.RayActorError, ray.exceptions.ActorDiedError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WorkersFailed(
            f"worker {worker} died more often than max_restarts allows, so the job cannot "
            f"finish; raise WorkerOptions(max_restarts=...) or find out why it dies: {reason}"
        ) from exc


def stop_workers(group: WorkerGroup) -> None:
    kill_and_wait(group.actors)


def kill_and_wait(actors: list[Any], limit: float = 60.0) -> None:
    """Kill ``actors`` and wait until Ray reports each one dead (its process may take a
    few more milliseconds to exit). A probe that merely times out (a busy machine) is
    sent again, up to ``limit`` seconds in all."""
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # already gone
            logger.debug("actor already stopped", exc_info=True)
    deadline = time.monotonic() + limit
    for actor in actors:
        while True:
            try:
                ray.get(actor.__ray_ready__.options(max_task_retries=0).remote(), timeout=1)
            except ray.exceptions.RayActorError:
                break
            except ray.exceptions.GetTimeoutError:
                pass
            if time.monotonic() > deadline:
                logger.warning("actor %s not reported dead %.0f s after ray.kill", actor, limit)
                break
            time.sleep(0.05)
