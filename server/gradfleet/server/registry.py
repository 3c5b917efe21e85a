"""The jobs a server holds: create, find, delete, resume from checkpoints, shut down."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np

from gradfleet.proto.errors import GradfleetError, JobExists, JobNotFound, Reason, ResourceExhausted
from gradfleet.proto.wire import FlatLayout
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
        if given is None:
            self.check_size(model_nbytes(settings.model_spec))
            layout, weights = initial_weights(settings.model_spec)
        else:
            layout, weights = given
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
                job = Job(snap, self.resources, last_checkpoint_version=snap.version)
            except GradfleetError as exc:
                log.warning("cannot resume job %s: %s", snap.job_id, exc.message)
                continue
            with self._lock:
                self._jobs[job.job_id] = job
                self.metrics.jobs.set(len(self._jobs))
            log.info("resumed job %s at version %d", job.job_id, job.version)
        return len(self._jobs)

    def _written(self, snap: JobSnapshot) -> None:
        with self._lock:
            job = self._jobs.get(snap.job_id)
        if job is not None and job.created_at == snap.created_at:
            job.checkpoint_written(snap.version)

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
