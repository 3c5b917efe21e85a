"""The Python SDK for a running parameter server.

    with Client("127.0.0.1:50051", token=...) as client:
        handle = client.create_job(job)      # a JobConfig
        handle.status(); handle.wait(); model = handle.model()

Workers are launched by ``train(job, backend="ray", server=...)``; the SDK creates,
inspects, follows, checkpoints, stops and deletes jobs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gradfleet.nn import MLP
from gradfleet.proto.client import ParameterServerClient, counters_dict, membership_event
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.sharded import ShardedClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.worker.config import JobConfig

STATES = {
    pb.JOB_STATE_RUNNING: "running",
    pb.JOB_STATE_COMPLETED: "completed",
    pb.JOB_STATE_STOPPED: "stopped",
    pb.JOB_STATE_DELETED: "deleted",
}
FINISHED = ("completed", "stopped", "deleted")


@dataclass(frozen=True)
class JobStatus:
    """A job now: its progress, last training loss and latest held-out scores."""

    job_id: str
    state: str
    version: int
    total_steps: int
    last_loss: float | None
    counters: dict[str, Any]
    name: str = ""
    evaluation: dict[str, float] | None = None  # {"step": ..., "val_accuracy": ...}
    members: tuple[int, ...] = ()  # the workers of the open step
    membership: tuple[dict[str, Any], ...] = ()  # every change: version, old, new, reason


@dataclass(frozen=True)
class JobEvent:
    job_id: str
    version: int
    state: str
    step: int | None = None
    loss: float | None = None
    samples_per_s: float | None = None
    membership: dict[str, Any] | None = None  # a change of workers: old, new, reason

    def __str__(self) -> str:
        if self.membership is not None:
            m = self.membership
            return (
                f"{self.job_id} workers {_ids(m['old'])} -> {_ids(m['new'])} from step "
                f"{self.version + 1} ({m['reason']})"
            )
        if self.step is None:
            return f"{self.job_id} {self.state} at version {self.version}"
        return (
            f"{self.job_id} step {self.step + 1} loss {self.loss:.4f} "
            f"{self.samples_per_s:.0f} samples/s"
        )


def _ids(workers: Any) -> str:
    return "[" + ", ".join(str(w) for w in workers) + "]"


def _config(info: pb.JobInfo) -> dict[str, Any]:
    text = info.spec.job_config_json
    return json.loads(text) if text else {}


class Client:
    """A connection to one gradfleet server; use it as a context manager.

    Every failure raises a `GradfleetError` subclass with one readable sentence
    (`JobNotFound`, `InvalidArgument`, `ServerUnavailable`, `Unauthenticated`, ...).
    `server` is the underlying `ParameterServerClient`, for tensor-level calls (a
    `ShardedClient` when `address` names the servers of a sharded job, comma-separated:
    a sharded job is then one handle whose status, model, export and watch assemble its
    shards).
    """

    def __init__(
        self,
        address: str,
        token: str | None = None,
        tls: str | Path | bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.address = address
        clients = [
            ParameterServerClient(a, token=token, tls_root_cert=tls, timeout=timeout)
            for a in address.split(",")
        ]
        self.server: ParameterServerClient | ShardedClient = (
            clients[0] if len(clients) == 1 else ShardedClient(clients)
        )
        try:
            for client in clients:  # gRPC reconnects with backoff meanwhile
                client.wait_ready(timeout=timeout)
        except GradfleetError:
            self.server.close()
            raise

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.server.close()

    def create_job(self, job: JobConfig, job_id: str | None = None) -> JobHandle:
        """Create ``job`` on the server (initial weights from its model spec)."""
        settings = job.resolve().server_settings()
        return JobHandle(self, self.server.create_job(**settings, job_id=job_id))

    def list_jobs(self) -> list[JobHandle]:
        return [JobHandle(self, info.job_id) for info in self.server.list_jobs()]

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job; raises JobNotFound when there is none."""
        handle = JobHandle(self, job_id)
        handle.status()
        return handle


class JobHandle:
    """One job on the server."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id

    def __repr__(self) -> str:
        return f"JobHandle({self.job_id!r} on {self.client.address})"

    def _info(self, history_since: int | None = None) -> pb.JobInfo:
        """The job's info, with its step records from `history_since` (a page of them)."""
        return self.client.server.get_job(
            self.job_id, history_since=history_since or 0, history=history_since is not None
        )

    def status(self) -> JobStatus:
        info = self._info()
        latest = self._info(history_since=info.version - 1).history if info.version else []
        return JobStatus(
            job_id=info.job_id,
            state=STATES.get(info.state, "unknown"),
            version=info.version,
            total_steps=info.spec.total_steps,
            last_loss=latest[-1].loss if latest else None,
            counters=counters_dict(info.counters),
            name=str(_config(info).get("name", "")),
            evaluation=(
                {"step": info.latest_evaluation.step, **info.latest_evaluation.metrics}
                if info.HasField("latest_evaluation")
                else None
            ),
            members=tuple(info.members),
            membership=tuple(membership_event(e) for e in info.membership),
        )

    def watch(self, from_version: int = 0) -> Iterator[JobEvent]:
        """Progress events (closed steps, changes of workers and of state) until the job
        finishes."""
        for event in self.client.server.watch(self.job_id, from_version=from_version):
            record = event.step if event.HasField("step") else None
            change = event.membership if event.HasField("membership") else None
            yield JobEvent(
                job_id=event.job_id,
                version=event.version,
                state=STATES.get(event.state, "unknown"),
                step=record.step if record else None,
                loss=record.loss if record else None,
                samples_per_s=record.samples_per_sec if record else None,
                membership=membership_event(change) if change else None,
            )

    def wait(self, timeout: float | None = None, poll: float = 0.2) -> JobStatus:
        """Block until the job completes or stops; raises TimeoutError after ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self.status()
            if status.state in FINISHED:
                return status
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(
                    f"job {self.job_id} is still {status.state} at step {status.version}/"
                    f"{status.total_steps} after {timeout}s"
                )
            time.sleep(poll)

    def weights(self) -> dict[str, np.ndarray]:
        """The current weights by parameter name."""
        return self.model().state_dict()

    def model(self) -> MLP:
        """A ready ``gradfleet.nn.MLP`` holding the job's current weights."""
        info = self._info()
        model = MLP.from_spec(json.loads(info.spec.model_spec_json))
        self.client.server.pull_weights(self.job_id, 0, out=model.flat, full_precision=True)
        return model

    def config(self) -> dict[str, Any]:
        """The job settings stored with the job (``JobConfig.summary()`` when created here)."""
        return _config(self._info())

    def scale(self, workers: int) -> JobStatus:
        """Ask for `workers` workers: the Ray trainer of an elastic job starts or stops
        workers to match, within its min_workers..max_workers (a clear error outside)."""
        self.client.server.scale_job(self.job_id, workers)
        return self.status()

    def checkpoint(self) -> str:
        """Write a checkpoint now; returns its path on the server."""
        return str(self.client.server.checkpoint(self.job_id).path)

    def stop(self) -> None:
        self.client.server.stop_job(self.job_id)

    def delete(self) -> None:
        self.client.server.delete_job(self.job_id)


__all__ = ["Client", "GradfleetError", "JobEvent", "JobHandle", "JobStatus"]
