"""The jobs a server holds: create, find, delete, resume from checkpoints, shut down."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from gradfleet.proto.errors import (
    GradfleetError,
    InvalidArgument,
    JobExists,
    JobNotFound,
    Reason,
    ResourceExhausted,
    WrongState,
)
from gradfleet.proto.partition import Partition
from gradfleet.proto.wire import FlatLayout, WireError
from gradfleet.server import checkpoint
from gradfleet.server.checkpoint_writer import Checkpointed, CheckpointWriter
from gradfleet.server.domain import JobSnapshot
from gradfleet.server.job import Job, JobResources
from gradfleet.server.metrics import ServerMetrics
from gradfleet.server.settings import JobSettings, initial_weights, model_nbytes

log = logging.getLogger(__name__)


class JobRegistry:
    """Thread-safe map of job id to `Job`, with the checkpoint writer they share."""

    def __init__(
        self,
        *,
        metrics: ServerMetrics,
        checkpoint_dir: Path | None,
        checkpoint_every: int,
        max_job_bytes: int,
        chunk_bytes: int,
        receive_budget_bytes: int,
        history_page: int = 10_000,
    ) -> None:
        self.metrics, self.checkpoint_dir, self.max_job_bytes = (
            metrics,
            checkpoint_dir,
            max_job_bytes,
        )
        writer = CheckpointWriter(checkpoint_dir, self._written) if checkpoint_dir else None
        self.resources = JobResources(
            metrics, chunk_bytes, receive_budget_bytes, history_page, writer, checkpoint_every
        )
        self._jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    def get(self, job_id: str) -> Job:
        with self._lock:
            job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(
                f"job {job_id!r} does not exist on this server (`gradfleet status` lists them)."
            )
        return job

    def all(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def create(
        self,
        job_id: str,
        settings: JobSettings,
        given: tuple[FlatLayout, np.ndarray] | None = None,
    ) -> tuple[Job, bool]:
        """The job `job_id` with these settings: (job, True) when created, (job, False)
        when an identical one exists. `given` holds initial weights; else the model spec
        builds them."""
        with self._lock:
            existing = self._jobs.get(job_id)
        if existing is not None:
            return self._reattach(existing, settings), False
        partition, shard = settings.spec.partition, settings.spec.shard_index
        if given is None:
            nbytes = model_nbytes(settings.model_spec)
            if partition is not None:  # only this shard's range lives here
                start, stop = partition.range(shard)
                nbytes = nbytes * (stop - start) // max(1, partition.total_elements)
            self.check_size(nbytes)
            layout, weights = initial_weights(settings.model_spec)
            if partition is not None:
                layout, weights = _shard_of(layout, weights, partition, shard)
        else:
            layout, weights = given
            if partition is not None:  # the shard's own range, as the client cut it
                full, _ = initial_weights(settings.model_spec)
                if layout != _shard_of(full, None, partition, shard)[0]:
                    raise InvalidArgument(
                        f"initial_layout is not shard {shard}'s range of the model.",
                        Reason.BAD_LAYOUT,
                    )
        self.check_size(layout.nbytes)
        job = Job(JobSnapshot.new(job_id, settings.spec, layout, weights), self.resources)
        with self._lock:
            existing = self._jobs.setdefault(job_id, job)
            self.metrics.jobs.set(len(self._jobs))
        if existing is not job:
            return self._reattach(existing, settings), False
        _wait(job.checkpoint())
        log.info(
            "created job %s: %s, %d workers, %d parameters",
            job_id,
            settings.mode.value,
            settings.num_workers,
            layout.total_elements,
        )
        return job, True

    def check_size(self, nbytes: int) -> None:
        """Refuse a model over this server's per-job limit (RESOURCE_EXHAUSTED)."""
        if nbytes > self.max_job_bytes:
            raise ResourceExhausted(
                f"the model needs {nbytes} bytes, over this server's limit of "
                f"{self.max_job_bytes} bytes per job.",
                Reason.JOB_TOO_LARGE,
            )

    @staticmethod
    def _reattach(job: Job, settings: JobSettings) -> Job:
        if not job.settings.same_job(settings):
            raise JobExists(
                f"job {job.job_id!r} already exists with a different configuration; "
                "pick another job id or delete it first."
            )
        return job

    def delete(self, job_id: str) -> None:
        """Remove the job and its checkpoints; calls still waiting on it end."""
        with self._lock:
            job = self._jobs.pop(job_id, None)
            self.metrics.jobs.set(len(self._jobs))
        if job is None:
            raise JobNotFound(f"job {job_id!r} does not exist on this server.")
        job.mark_deleted()
        if self.resources.checkpoints is not None:
            self.resources.checkpoints.remove(job_id)
        log.info("deleted job %s", job_id)

    def resume(self) -> int:
        """Load the latest good checkpoint of every job in the checkpoint directory."""
        if self.checkpoint_dir is None:
            return 0
        for snap in checkpoint.scan(self.checkpoint_dir):
            try:
                on_disk = checkpoint.versions(self.checkpoint_dir / snap.job_id)
                job = Job(snap, self.resources, on_disk)
            except GradfleetError as exc:
                log.warning("cannot resume job %s: %s", snap.job_id, exc.message)
                continue
            with self._lock:
                self._jobs[job.job_id] = job
                self.metrics.jobs.set(len(self._jobs))
            log.info("resumed job %s at version %d", job.job_id, job.version)
        return len(self._jobs)

    def _written(self, snap: JobSnapshot, on_disk: tuple[int, ...]) -> None:
        with self._lock:
            job = self._jobs.get(snap.job_id)
        if job is not None and job.created_at == snap.created_at:
            job.checkpoint_written(on_disk)

    def restore(self, job_id: str, version: int) -> Job:
        """Go back to the job's checkpoint of `version`: the job object in use is retired
        (its calls pull again), checkpoints after `version` are deleted, and a job built
        from that checkpoint takes its place."""
        old = self.get(job_id)
        if self.checkpoint_dir is None or self.resources.checkpoints is None:
            raise WrongState(
                "this server runs without --checkpoint-dir, so it cannot restore a job.",
                Reason.NO_CHECKPOINT_DIR,
            )
        job_dir = self.checkpoint_dir / job_id
        try:  # checked before anything changes
            snap = checkpoint.load_version(job_dir, version)
        except checkpoint.CheckpointError as exc:
            raise WrongState(f"job {job_id} cannot go back to version {version}: {exc}",
                             Reason.BAD_VERSION) from None  # fmt: skip
        old.retire(version)
        self.resources.checkpoints.rewind(job_id, version)
        job = Job(snap, self.resources, checkpoint.versions(job_dir))
        with self._lock:
            if self._jobs.get(job_id) is old:
                self._jobs[job_id] = job
        log.warning("job %s went back to version %d (from %d)", job_id, version, old.version)
        return job

    def wake_all(self) -> None:
        """Wake every waiting call (the server is stopping: they answer UNAVAILABLE)."""
        for job in self.all():
            job.wake_all()

    def close(self) -> None:
        """Write a final checkpoint of every job that changed since its last one, then
        stop the writer. One job's failed write does not cost the others theirs."""
        for future in [job.checkpoint_if_changed() for job in self.all()]:
            _wait(future, final=True)
        if self.resources.checkpoints is not None:
            self.resources.checkpoints.close()


def _shard_of(
    layout: FlatLayout, weights: np.ndarray | None, partition: Partition, shard: int
) -> tuple[FlatLayout, np.ndarray]:
    """`shard`'s range of a model: its layout and (a copy of) its weights."""
    try:
        shard_layout = partition.layout(layout, shard)
    except WireError as exc:
        raise InvalidArgument(
            f"the job's partition does not fit its model: {exc}", Reason.BAD_CONFIG
        ) from None
    start, stop = partition.range(shard)
    part = weights[start:stop].copy() if weights is not None else np.empty(0, layout.dtype)
    return shard_layout, part


def _wait(future: Future[Checkpointed] | None, final: bool = False) -> Checkpointed | None:
    """The checkpoint's path once written; a failed write is logged (by the writer)."""
    if future is None:
        return None
    try:
        return future.result()
    except Exception:
        if final:
            log.error("a final checkpoint failed; the job resumes from an older one")
        return None
