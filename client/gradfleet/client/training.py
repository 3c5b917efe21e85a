"""``train(job, backend=...)``: one job, run in this process or on Ray workers.

``backend="local"`` runs everything in this process (no Ray, no sockets).
``backend="ray"`` joins the Ray cluster at ``address`` / ``RAY_ADDRESS`` (or starts a
local one), uses the parameter server at ``server`` (or starts one in this process on a
free loopback port), creates the job, runs one worker actor per shard, and shuts down
whatever it started — also on Ctrl-C and on error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

from gradfleet.nn import MLP
from gradfleet.proto.client import counters_dict, membership_event
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.runtime import long_lived_objects_frozen
from gradfleet.proto.shard_watch import ShardWatch
from gradfleet.proto.sharded import ShardedClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.worker.actor import SERVER_PATIENCE, server_client
from gradfleet.worker.config import JobConfig
from gradfleet.worker.local import train_local
from gradfleet.worker.result import TrainResult, evaluate, held_out_metrics
from gradfleet.worker.scoring import Scorer, ScoringOrder

logger = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, float]], None]
BACKENDS = ("local", "ray")
SCORER_START = 60.0  # seconds the first step waits for the scoring process


def train(
    job: JobConfig,
    backend: str = "ray",
    *,
    address: str | None = None,
    server: str | None = None,
    token: str | None = None,
    progress: ProgressFn | bool | None = None,
    worker_options: Any = None,
    checkpoint_dir: str | None = None,
    server_placement: str = "driver",
    servers: int | None = None,
    membership: Sequence[Mapping[str, Any]] = (),
) -> TrainResult:
    """Train ``job`` and return the trained model, its weights and history.

    ``progress=True`` shows a progress bar (log lines when stderr is not a terminal); a
    callable gets each step's metrics instead. With ``backend="ray"`` and no ``server``,
    the parameter server runs in this process (``server_placement="driver"``) or as a Ray
    actor: ``"head"`` pins it to the head node, ``"node:<node id>"`` to a given node (see
    ``gradfleet.client.cluster``). ``servers`` S (default ``job.servers``) spreads the
    job over S servers: S in this process, or S Ray actors on different nodes; ``server``
    may name S servers, comma-separated. ``membership``: an elastic job's events to replay
    in local mode (a Ray run's ``TrainResult.membership``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: choose 'local' or 'ray'")
    if servers is not None:
        job = dataclasses.replace(job, servers=servers)
    elif server:
        job = dataclasses.replace(job, servers=len(server.split(",")))
    job = job.resolve()
    if progress is True:
        from gradfleet.client.reporting import ProgressReporter

        with ProgressReporter(job.total_steps, job.steps_per_epoch) as reporter:
            return train(
                job,
                backend,
                address=address,
                server=server,
                token=token,
                progress=reporter.update,
                worker_options=worker_options,
                checkpoint_dir=checkpoint_dir,
                server_placement=server_placement,
                membership=membership,
            )
    callback = progress if callable(progress) else None
    if backend == "local":
        return train_local(job, callback, membership)
    if membership:
        raise ValueError("membership events are replayed by backend='local' only")
    return _train_ray(
        job, address, server, token, callback, worker_options, checkpoint_dir, server_placement
    )


def _train_ray(
    job: JobConfig,
    address: str | None,
    server: str | None,
    token: str | None,
    progress: ProgressFn | None,
    worker_options: Any,
    checkpoint_dir: str | None,
    server_placement: str,
) -> TrainResult:
    started, started_unix = time.perf_counter(), time.time()
    with (
        _ray_session(address),
        _server_session(server, token, checkpoint_dir, server_placement, job.servers) as (
            server_address,
            server_actor,
        ),
        long_lived_objects_frozen(),  # no full-GC stalls of the in-process server
    ):
        from gradfleet.worker import ray_runner
        from gradfleet.worker.ray_elastic import ElasticWorkers

        actor_names = server_actor.name if server_actor else None
        client = server_client(server_address, token, actor_names, SERVER_PATIENCE)
        group: Any = None
        monitor, job_id, finished = None, None, False
        try:
            job_id = client.create_job(**job.server_settings())
            logger.info(
                "job %s on %s: %d steps, %d workers",
                job_id,
                server_address,
                job.total_steps,
                job.workers,
            )
            monitor = _Monitor(
                server_address, job_id, job, progress, started_unix, server_actor, token
            )
            if job.elastic:
                group = ElasticWorkers(
                    job, client, server_address, job_id, token, worker_options, actor_names
                )
            else:  # the actors start while the scorer does
                group = ray_runner.start_workers(
                    job, server_address, job_id, token, worker_options, actor_names
                )
            monitor.wait_for_scorer()
            if isinstance(group, ElasticWorkers):
                timings = group.run(poll=monitor.poll)
            else:
                timings = ray_runner.run_workers(group, poll=monitor.poll)
            monitor.poll()
            result = monitor.result(timings)
            finished = True
        finally:
            try:
                if isinstance(group, ElasticWorkers):
                    group.stop()
                elif group is not None:
                    ray_runner.stop_workers(group)
                if server and job_id is not None and not finished:
                    _stop_abandoned_job(server_address, token, job_id)
            finally:
                client.close()
                if monitor is not None and not finished:
                    monitor.close(finished=False)
    result.wall_time = time.perf_counter() - started
    return result


def _stop_abandoned_job(address: str, token: str | None, job_id: str) -> None:
    """Stop a job this call started on a server that outlives it (``server=``) when the
    call fails or is interrupted: its workers are gone, so it would show RUNNING forever."""
    try:
        with server_client(address, token, None, patience=0) as client:
            client.stop_job(job_id)
    except GradfleetError as exc:
        logger.warning("could not stop job %s on %s: %s", job_id, address, exc)


def _start_scorer(
    address: str, job_id: str, job: JobConfig, actor_name: str | None, token: str | None
) -> Scorer | None:
    """The held-out scoring process, when the job scores anything while it trains."""
    data = job.data
    if not job.eval_every or data.x_val is None or data.y_val is None or not len(data.x_val):
        return None
    ray_address = None
    if actor_name is not None:
        import ray

        ray_address = ray.get_runtime_context().gcs_address
    order = ScoringOrder.for_job(
        job, address, job_id, token=token, server_actor_name=actor_name, ray_address=ray_address
    )
    try:
        return Scorer(order)
    except OSError as exc:  # no Python to start (an embedded interpreter)
        logger.warning("held-out scoring could not start, so nothing is scored: %s", exc)
        return None


class _Monitor:
    """Follows the job on the server: step history, evaluations, progress callbacks."""

    def __init__(
        self,
        address: str,
        job_id: str,
        job: JobConfig,
        progress: ProgressFn | None,
        started: float,
        server_actor: Any = None,
        token: str | None = None,
    ) -> None:
        self.job_id, self.job = job_id, job
        self.progress, self.started = progress, started
        self.model = MLP.from_spec(job.model_spec)
        self.history: list[dict[str, float]] = []
        actor_name = server_actor.name if server_actor else None
        self.client = server_client(address, token, actor_name, SERVER_PATIENCE)
        self._shards = (
            ShardWatch(self.client, job_id) if isinstance(self.client, ShardedClient) else None
        )
        self._scorer = _start_scorer(address, job_id, job, actor_name, token)

    def wait_for_scorer(self, timeout: float = SCORER_START) -> None:
        """Let the scorer start before the first step, so that it misses no version."""
        if self._scorer is not None and not self._scorer.wait_ready(timeout):
            logger.warning("held-out scoring is slow to start; it may skip early versions")

    def poll(self) -> None:
        if self._shards is not None:
            self._shards.check()
        info = self.client.get_job(self.job_id, history_since=len(self.history))
        self._record(info.history)
        if self.progress is not None and self.history:
            latest = self._scorer.latest() if self._scorer else {}
            self.progress(self.history[-1] | held_out_metrics([latest]))

    def _record(self, records: Iterable[pb.StepRecord]) -> int:
        """Append the records not yet seen; returns how many were new."""
        before = len(self.history)
        for record in records:
            if record.step < len(self.history):
                continue
            self.history.append(
                {
                    "step": record.step + 1,
                    "loss": record.loss,
                    "rows": record.rows,
                    "samples_per_s": record.samples_per_sec,
                    "wall_time": record.wall_time - self.started,  # applied, server clock
                }
            )
        return len(self.history) - before

    def catch_up(self) -> None:
        """Fetch the records polls have not seen yet (each answer holds one page)."""
        while True:
            info = self.client.get_job(self.job_id, len(self.history))
            if not self._record(info.history) or not info.history_more:
                return

    def close(self, finished: bool) -> list[dict[str, float]]:
        """The evaluations (waiting for the rest when the job `finished`), then let go."""
        try:
            if self._scorer is not None:
                evaluations = self._scorer.close(finished)
            else:  # nothing to score them on: the steps alone, as local mode gives them
                every, steps = self.job.eval_every, len(self.history)
                evaluations = [{"step": s} for s in range(every, steps + 1, every)] if every else []
        finally:
            self.client.close()
        for evaluation in evaluations:  # when its step was applied, by the server's clock
            step = int(evaluation["step"])
            if step <= len(self.history):
                evaluation["wall_time"] = self.history[step - 1]["wall_time"]
        return evaluations

    def result(self, timings: list[dict[str, float]]) -> TrainResult:
        self.catch_up()
        version, _ = self.client.pull_weights(
            self.job_id, min_version=0, out=self.model.flat, full_precision=True
        )
        info = self.client.get_job(self.job_id, history=False)
        counters = info.counters
        data = self.job.data
        metrics: dict[str, Any] = {
            "steps": version,
            **evaluate(self.model, data.x_val, data.y_val, self.job.loss),
            "worker_timings": timings,
            "server_counters": counters_dict(counters),
        }
        return TrainResult(
            model=self.model,
            history=self.history,
            evaluations=self.close(finished=True),
            final_metrics=metrics,
            backend="ray",
            job_id=self.job_id,
            server_address=self.client.address,
            membership=[membership_event(e) for e in info.membership],
        )


@contextlib.contextmanager
def _ray_session(address: str | None) -> Iterator[None]:
    """Join the given cluster (or RAY_ADDRESS), else start a local one; stop only ours."""
    import ray

    from gradfleet.worker.ray_runner import init_ray

    if ray.is_initialized():
        yield
        return
    # "local" starts a new instance: without it Ray would join any cluster that a
    # `ray start` left running on this machine.
    target = address or os.environ.get("RAY_ADDRESS") or "local"
    # Ray's own console output is not the user's business: its workers' logs stay in its
    # log directory unless gradfleet logs at DEBUG (-v), and it says only what is wrong.
    ours = logging.getLogger("gradfleet")
    settings = {
        "logging_level": logging.WARNING if ours.isEnabledFor(logging.WARNING) else logging.ERROR,
        "log_to_driver": ours.isEnabledFor(logging.DEBUG),
    }
    # Ray announces which token-auth mode it picked for a local instance at WARNING; that
    # is a setting (docs/security.md says what to choose), not something gone wrong.
    logging.getLogger(_RAY_AUTH_NOTICE).setLevel(logging.ERROR)
    init_ray(address=target, include_dashboard=False, **settings)
    try:
        yield
    finally:
        ray.shutdown()


_RAY_AUTH_NOTICE = "ray._private.authentication.authentication_token_setup"


@contextlib.contextmanager
def _server_session(
    server: str | None, token: str | None, checkpoint_dir: str | None, placement: str, count: int
) -> Iterator[tuple[str, Any]]:
    """(address, server actor or None): the given servers, or `count` new ones in this
    process or as Ray actors (one per shard; comma-separated when several)."""
    if server:
        if len(server.split(",")) != count:
            raise ValueError(f"{len(server.split(','))} servers given for a job over {count}")
        yield server, None
        return
    if placement != "driver":
        from gradfleet.client.cluster import server_actor, shard_actors

        if count > 1:
            with shard_actors(count, token, checkpoint_dir) as actors:
                yield actors.address, actors
            return
        with server_actor(placement, token, checkpoint_dir) as actor:
            yield actor.address, actor
        return
    from gradfleet.server import serve

    with contextlib.ExitStack() as stack:
        addresses = []
        for shard in range(count):
            directory = checkpoint_dir
            if checkpoint_dir is not None and count > 1:
                directory = os.path.join(checkpoint_dir, f"shard-{shard}")
            running = serve(host="127.0.0.1", port=0, token=token, checkpoint_dir=directory)
            addresses.append(stack.enter_context(running).address)
        yield ",".join(addresses), None
