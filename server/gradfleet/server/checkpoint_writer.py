"""Checkpoints written by one background thread, so no disk I/O runs under a job's lock.

A job hands the writer a `JobSnapshot` (its state copied and its weights lent, both under
the job's lock: the job's next update goes to a copy while the write still reads them)
and goes on; snapshots are written in order, every one of them, so a
checkpoint exists at every version a job asked for. A job whose snapshots pile up waits
for the disk outside its lock (`Job` keeps at most two in flight), so memory stays
bounded without stalling other calls. Whoever needs a checkpoint on disk (StopJob,
CheckpointJob, shutdown) waits for the future `submit` returns. Deleting a job drops its
queued snapshots, waits for its write in flight, then removes its directory, so a
deleted job never comes back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import NamedTuple

from gradfleet.server import checkpoint
from gradfleet.server.domain import JobSnapshot

log = logging.getLogger(__name__)
# The writer yields the CPU to the calls of the data path: on a busy server the disk work
# fills the gaps while they wait for the network.
WRITER_NICENESS = 10


class Checkpointed(NamedTuple):
    """A checkpoint on disk: the version it holds and its JSON file."""

    version: int
    path: Path


class CheckpointWriter:
    """Writes snapshots under `root` in the background; `on_written` runs after each, with
    the versions its job's directory then holds."""

    def __init__(
        self, root: Path, on_written: Callable[[JobSnapshot, tuple[int, ...]], None]
    ) -> None:
        self.root, self._on_written = root, on_written
        self._lock = threading.Condition()
        self._queue: deque[tuple[JobSnapshot, int, Future[Checkpointed]]] = deque()
        self._writing: str | None = None
        self._removing: set[str] = set()  # jobs whose directory is being deleted
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="gradfleet-ckpt", daemon=True)
        self._thread.start()

    def submit(self, snap: JobSnapshot, keep: int = 2) -> Future[Checkpointed]:
        """Queue `snap` (its job keeps the `keep` newest checkpoints); its future says what
        is on disk once it is written."""
        future: Future[Checkpointed] = Future()
        with self._lock:
            if self._closed:
                future.set_exception(RuntimeError("the checkpoint writer is closed"))
                return future
            self._queue.append((snap, keep, future))
            self._lock.notify_all()
        return future

    def remove(self, job_id: str) -> None:
        """Drop the job's queued snapshots, wait for its write in flight, delete its files."""
        self._clear(job_id, lambda: checkpoint.remove_job(self.root, job_id))

    def rewind(self, job_id: str, version: int) -> None:
        """Like `remove`, but keep the checkpoints up to `version`."""
        self._clear(job_id, lambda: checkpoint.remove_newer(self.root / job_id, version))

    def _clear(self, job_id: str, delete: Callable[[], None]) -> None:
        with self._lock:
            dropped = [entry for entry in self._queue if entry[0].job_id == job_id]
            for entry in dropped:
                self._queue.remove(entry)
            self._removing.add(job_id)  # a new job of that id waits for the removal
            while self._writing == job_id:
                self._lock.wait()
        for _, _, future in dropped:
            future.cancel()
        try:
            delete()
        finally:
            with self._lock:
                self._removing.discard(job_id)
                self._lock.notify_all()

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join()

    def _next(self) -> tuple[JobSnapshot, int, Future[Checkpointed]] | None:
        """The oldest queued snapshot whose job is not being removed (taken off the queue)."""
        for entry in self._queue:
            if entry[0].job_id not in self._removing:
                self._queue.remove(entry)
                return entry
        return None

    def _run(self) -> None:
        if sys.platform.startswith("linux"):  # Linux: a thread id renices that thread only
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WRITER_NICENESS)
        while True:
            with self._lock:
                while (entry := self._next()) is None and not (self._closed and not self._queue):
                    self._lock.wait()
                if entry is None:
                    return
                snap, keep, future = entry
                self._writing = snap.job_id
            try:
                path, held = checkpoint.write_checkpoint(self.root, snap, keep)
                self._on_written(snap, held)
            except Exception as exc:
                log.exception(
                    "checkpoint of job %s at version %d failed", snap.job_id, snap.version
                )
                future.set_exception(exc)
            else:
                future.set_result(Checkpointed(snap.version, path))
            finally:
                with self._lock:
                    self._writing = None
                    self._lock.notify_all()


class JobCheckpoints:
    """One job's checkpoints on their way to disk: it hands in snapshots (under its lock)
    and, past two not yet written, the push that asked for another waits (off it)."""

    IN_FLIGHT = 2

    def __init__(self, writer: CheckpointWriter | None, keep: int = 2) -> None:
        self._writer, self._keep = writer, keep
        self._writes: deque[Future[Checkpointed]] = deque()
        self._lock = threading.Lock()

    @property
    def on(self) -> bool:
        return self._writer is not None

    def submit(self, snap: JobSnapshot) -> Future[Checkpointed]:
        assert self._writer is not None
        future = self._writer.submit(snap, self._keep)
        with self._lock:
            self._writes.append(future)
        return future

    def keep_up(self) -> None:
        """Wait while more than `IN_FLIGHT` of this job's checkpoints are not on disk."""
        while True:
            with self._lock:
                while self._writes and self._writes[0].done():
                    self._writes.popleft()
                if len(self._writes) <= self.IN_FLIGHT:
                    return
                oldest = self._writes[0]
            with contextlib.suppress(Exception):  # a failed write is logged by the writer
                oldest.result()
