"""One job spread over S parameter servers, used like one `ParameterServerClient`.

Each server holds one contiguous range of the job's flat buffer (`partition.py`). A pull
or a push moves every range at once, one call per server in flight together, straight
between the servers and slices of the caller's flat arrays. The servers know nothing of
each other: a worker computes on version v only when every shard is at v (sync), and in
async mode its version is the oldest of its shards'. When a shard's state is rebuilt
from disk (its process or node was lost), `agree` brings every shard back to the newest
version all of them hold.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import WrongState
from gradfleet.proto.exchange import StreamedExchange
from gradfleet.proto.partition import Partition, partition
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class ShardsDisagree(WrongState):
    """The shards of a job hold no version in common to go on from."""


@dataclass
class _ShardedJob:
    partition: Partition
    dtype: np.dtype
    sync: bool
    versions: list[int] = field(default_factory=list)  # of the last pull, per shard
    incarnations: list[int] = field(default_factory=list)


class ShardedExchange:
    """A `StreamedExchange` per shard, used as one over the whole flat buffer."""

    def __init__(
        self,
        client: ShardedClient,
        job_id: str,
        job: _ShardedJob,
        exchanges: list[StreamedExchange],
        step: int,
        out: np.ndarray,
        timeout: float | None,
    ) -> None:
        self._client, self._job_id, self._job = client, job_id, job
        self._exchanges, self.step, self.out, self._timeout = exchanges, step, out, timeout
        self.rows, self.loss = 0, 0.0
        self.version: int | None = None

    def _pieces(self, start: int, stop: int) -> Iterator[tuple[StreamedExchange, int, int]]:
        """(shard exchange, start, stop in its range) of each shard [start, stop) covers."""
        for s, exchange in enumerate(self._exchanges):
            lo, hi = self._job.partition.range(s)
            if max(start, lo) < min(stop, hi):
                yield exchange, max(start, lo) - lo, min(stop, hi) - lo

    def send(self, start: int, stop: int, rows: int, loss: float) -> None:
        self.rows, self.loss = rows, loss
        for exchange, lo, hi in self._pieces(start, stop):
            exchange.send(lo, hi, rows, loss)

    def close(self) -> None:
        for exchange in self._exchanges:
            exchange.close()

    def wait_version(self) -> int:
        """The next version every shard is at (sync); a shard that closed the step
        without this worker (backup workers) makes it pull the newest whole."""
        if self.version is None:
            versions = [exchange.wait_version() for exchange in self._exchanges]
            self._job.versions = versions
            self.version = min(versions)
            if self._job.sync and len(set(versions)) > 1:
                for exchange in self._exchanges:
                    exchange.finish()
                self.version, _ = self._client.pull_weights(
                    self._job_id, max(versions), self.out, self._timeout
                )
        return self.version

    def wait(self, start: int, stop: int) -> None:
        self.wait_version()
        for exchange, lo, hi in self._pieces(start, stop):
            exchange.wait(lo, hi)

    def finish(self) -> tuple[int, np.ndarray]:
        version = self.wait_version()
        for exchange in self._exchanges:
            exchange.finish()
        return version, self.out

    def cancel(self) -> None:
        for exchange in self._exchanges:
            exchange.cancel()


class ShardedClient:
    """Clients of the S servers of sharded jobs, shard s on `clients[s]`; thread-safe."""

    def __init__(self, clients: list[ParameterServerClient]) -> None:
        if len(clients) < 2:
            raise ValueError("a sharded job needs at least two servers")
        self.clients = clients
        self._pool = ThreadPoolExecutor(len(clients), thread_name_prefix="gradfleet-shard")
        self._jobs: dict[str, _ShardedJob] = {}

    @property
    def address(self) -> str:
        return ",".join(c.address for c in self.clients)

    def close(self) -> None:
        self._pool.shutdown()
        for client in self.clients:
            client.close()

    def __enter__(self) -> ShardedClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _each(self, call: Callable[[int, ParameterServerClient], _T]) -> list[_T]:
        """`call(s, client)` for every shard at once; the first shard's error is raised."""
        futures = [self._pool.submit(call, s, c) for s, c in enumerate(self.clients)]
        return [f.result() for f in futures]

    # jobs

    def create_job(
        self,
        model_spec: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        *,
        layout: FlatLayout,
        job_id: str | None = None,
        initial_weights: np.ndarray | None = None,
        mode: str = "sync",
        **settings: Any,
    ) -> str:
        """Create the job on every server, each with its range of `layout` (the model's
        layout; `initial_weights` its flat buffer)."""
        cut = partition(layout, len(self.clients), self.clients[0].chunk_bytes)
        job_id = job_id or uuid.uuid4().hex[:12]  # one id on every server

        def create(s: int, client: ParameterServerClient) -> str:
            given = None
            if initial_weights is not None:
                start, stop = cut.range(s)
                given = cut.layout(layout, s).views(initial_weights[start:stop])
            return client.create_job(
                model_spec, optimizer, mode=mode, job_id=job_id, shard=cut.to_proto(s),
                initial_weights=given, **settings,
            )  # fmt: skip

        self._each(create)
        self._jobs[job_id] = _ShardedJob(cut, layout.dtype, mode == "sync")
        return job_id

    def _job(self, job_id: str) -> _ShardedJob:
        known = self._jobs.get(job_id)
        if known is None:
            infos = self._each(lambda s, c: c.get_job(job_id, history=False))
            known = self._jobs[job_id] = self._check(job_id, infos)
        return known

    def _check(self, job_id: str, infos: list[pb.JobInfo]) -> _ShardedJob:
        """The job's partition, after checking every server holds the range it should."""
        count = len(self.clients)
        for s, info in enumerate(infos):
            shard = info.spec.shard
            if not info.spec.HasField("shard") or shard.count != count or shard.index != s:
                have = (
                    f"shard {shard.index} of {shard.count}"
                    if info.spec.HasField("shard")
                    else "all of it"
                )
                raise ShardsDisagree(
                    f"job {job_id} is not spread over these {count} servers in this order: "
                    f"{self.clients[s].address} holds {have}"
                )
        cut, _ = Partition.from_proto(infos[0].spec.shard)
        if any(tuple(info.spec.shard.bounds) != cut.bounds for info in infos):
            raise ShardsDisagree(f"the servers of job {job_id} hold different partitions of it")
        dtype = FlatLayout.from_proto(infos[0].layout).dtype
        return _ShardedJob(cut, dtype, infos[0].spec.mode != pb.MODE_ASYNC)

    def get_job(self, job_id: str, history_since: int = 0, history: bool = True) -> pb.JobInfo:
        """Shard 0's info (every shard keeps the same step records), with the version and
        the state of the job as a whole: the oldest version, stopped if any shard is."""
        infos = self._each(
            lambda s, c: c.get_job(job_id, history_since, history if s == 0 else False)
        )
        self._job(job_id)
        merged = pb.JobInfo()
        merged.CopyFrom(infos[0])
        merged.version = min(info.version for info in infos)
        states = {info.state for info in infos}
        for state in (pb.JOB_STATE_DELETED, pb.JOB_STATE_STOPPED, pb.JOB_STATE_RUNNING):
            if state in states:
                merged.state = state
                break
        return merged

    def shard_infos(self, job_id: str) -> list[pb.JobInfo]:
        return self._each(lambda s, c: c.get_job(job_id, history=False))

    def list_jobs(self) -> list[pb.JobInfo]:
        return self.clients[0].list_jobs()

    def delete_job(self, job_id: str) -> None:
        self._each(lambda s, c: c.delete_job(job_id))
        self._jobs.pop(job_id, None)

    def stop_job(self, job_id: str) -> pb.JobInfo:
        return self._each(lambda s, c: c.stop_job(job_id))[0]

    def checkpoint(self, job_id: str) -> pb.CheckpointJobResponse:
        """A checkpoint on every server; the answer names the oldest version written."""
        answers = self._each(lambda s, c: c.checkpoint(job_id))
        return min(answers, key=lambda a: a.version)

    def set_members(
        self,
        job_id: str,
        members: Sequence[int],
        reason: str = "",
        from_version: int | None = None,
        at_once: bool = False,
    ) -> pb.JobInfo:
        """`ParameterServerClient.set_members` on every shard, all from the same step:
        `from_version`, or (None) the step after the newest any shard has open. `at_once`
        lets each shard change as soon as it may instead, for a worker that is gone: the
        shards still agree unless its last push reached only some of them."""
        if from_version is None and not at_once:
            from_version = max(info.version for info in self.shard_infos(job_id)) + 1
        return self._each(lambda s, c: c.set_members(job_id, members, reason, from_version))[0]

    def scale_job(self, job_id: str, workers: int) -> pb.JobInfo:
        return self._each(lambda s, c: c.scale_job(job_id, workers))[0]

    def membership_events(self, job_id: str) -> int:
        return min(client.membership_events(job_id) for client in self.clients)

    def record_evaluation(self, job_id: str, step: int, metrics: Mapping[str, float]) -> None:
        self.clients[0].record_evaluation(job_id, step, metrics)

    def watch(self, job_id: str, from_version: int = 0) -> Iterator[pb.JobEvent]:
        """Shard 0's events: every shard closes the same steps."""
        return self.clients[0].watch(job_id, from_version)

    def layout(self, job_id: str) -> FlatLayout:
        """The layout of shard 0's range (the model's layout comes from its spec)."""
        return self.clients[0].layout(job_id)

    def exchanges_in_one_message(self, job_id: str) -> bool:
        return all(client.exchanges_in_one_message(job_id) for client in self.clients)

    # tensors

    def pull_weights(
        self,
        job_id: str,
        min_version: int = 0,
        out: np.ndarray | None = None,
        timeout: float | None = None,
        exact: bool = False,
        full_precision: bool = False,
    ) -> tuple[int, np.ndarray]:
        """Every range of version >= min_version into `out` (a new flat array if None);
        returns (version, out). In sync mode every shard's range is of one version."""
        job = self._job(job_id)
        flat = np.empty(job.partition.total_elements, job.dtype) if out is None else out
        target = min_version
        while True:

            def pull(s: int, c: ParameterServerClient, version: int = target) -> int:
                into = self._range(flat, job, s)
                return c.pull_weights(job_id, version, into, timeout, exact, full_precision)[0]

            versions = self._each(pull)
            if not job.sync or exact or len(set(versions)) == 1:
                job.versions = versions
                return min(versions), flat
            target = max(versions)  # a shard closed the step first: wait for the others

    def push_and_pull(
        self,
        job_id: str,
        worker: int,
        step: int,
        rows: int,
        loss: float,
        flat_grad: np.ndarray,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> tuple[int, np.ndarray]:
        """Push every range of the gradient of `step` (async: of the versions each shard
        gave the last pull) and take the next weights; returns (version, weights)."""
        job = self._job(job_id)
        flat = np.empty(job.partition.total_elements, job.dtype) if out is None else out
        steps = job.versions if not job.sync and min(job.versions or [-1]) == step else None

        def exchange(s: int, client: ParameterServerClient) -> int:
            return client.push_and_pull(
                job_id, worker, steps[s] if steps else step, rows, loss,
                self._range(flat_grad, job, s), out=self._range(flat, job, s), timeout=timeout,
            )[0]  # fmt: skip

        versions = self._each(exchange)
        if job.sync and len(set(versions)) > 1:  # backup workers: a shard went on without us
            return self.pull_weights(job_id, max(versions), flat, timeout)
        job.versions = versions
        return min(versions), flat

    def begin_exchange(
        self,
        job_id: str,
        worker: int,
        step: int,
        flat_grad: np.ndarray,
        out: np.ndarray | None = None,
        timeout: float | None = None,
    ) -> ShardedExchange:
        """`ParameterServerClient.begin_exchange` on every shard, each with its range."""
        job = self._job(job_id)
        flat = np.empty(job.partition.total_elements, job.dtype) if out is None else out
        steps = job.versions if not job.sync and min(job.versions or [-1]) == step else None
        exchanges = [
            client.begin_exchange(
                job_id, worker, steps[s] if steps else step, self._range(flat_grad, job, s),
                out=self._range(flat, job, s), timeout=timeout,
            )
            for s, client in enumerate(self.clients)
        ]  # fmt: skip
        return ShardedExchange(self, job_id, job, exchanges, step, flat, timeout)

    def push_gradient(
        self, job_id: str, worker: int, step: int, rows: int, loss: float, flat_grad: np.ndarray
    ) -> list[pb.PushAck]:
        job = self._job(job_id)
        return self._each(
            lambda s, c: c.push_gradient(
                job_id, worker, step, rows, loss, self._range(flat_grad, job, s)
            )
        )

    @staticmethod
    def _range(flat: np.ndarray, job: _ShardedJob, shard: int) -> np.ndarray:
        start, stop = job.partition.range(shard)
        return flat.reshape(-1)[start:stop]

    # agreement

    def incarnations(self, job_id: str) -> list[int]:
        """Each shard's incarnation: one changes when its state was rebuilt from disk."""
        return [info.incarnation for info in self.shard_infos(job_id)]

    def agree(self, job_id: str) -> int:
        """Bring every shard to the newest version all of them hold (in memory or in a
        checkpoint), after one of them lost its state; returns that version."""
        infos = self.shard_infos(job_id)
        versions = [info.version for info in infos]
        if len(set(versions)) == 1:
            return versions[0]
        held = [set(info.checkpoints) | {info.version} for info in infos]
        common = set.intersection(*held)
        if not common:
            described = "; ".join(
                f"shard {s} at {self.clients[s].address}: version {info.version}, "
                f"checkpoints {list(info.checkpoints) or 'none'}"
                for s, info in enumerate(infos)
            )
            raise ShardsDisagree(
                f"the shards of job {job_id} hold no version in common ({described})"
            )
        target = max(common)
        log.warning("job %s: shards at versions %s go back to %d", job_id, versions, target)
        self._each(lambda s, c: c.restore_job(job_id, target) if versions[s] != target else None)
        return target
