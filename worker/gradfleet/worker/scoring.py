"""Held-out scoring beside a Ray job, in a process of its own at idle priority.

The trainer scores the exact weights of every ``eval_every``-th version (the job keeps
them for it). That is CPU the workers and the parameter server want too, and the server
usually runs in the driver: a scoring thread there would take the server's GIL and a
share of the cores. A child process under Linux's ``SCHED_IDLE`` policy gets only
a tiny share of a busy core, and a worker that wakes preempts it at once (elsewhere it
runs at the lowest nice level or priority class). Its scores come back over its stdout
as pickles; when its stdin closes (the trainer is done with it, or gone) it exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import subprocess
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gradfleet.worker.actor import ServerClient
    from gradfleet.worker.config import JobConfig

logger = logging.getLogger(__name__)
READY = "ready"


@dataclass(frozen=True)
class ScoringOrder:
    """What the scoring process needs: where the job is, which versions, which rows."""

    address: str  # host:port, or one per shard, comma-separated
    job_id: str
    model_spec: dict[str, Any]
    loss: str
    eval_every: int
    total_steps: int
    x_val: np.ndarray
    y_val: np.ndarray
    token: str | None = None
    server_actor_name: str | None = None  # the server's Ray actor, when it runs as one
    ray_address: str | None = None  # joined only to ask that actor where the server moved

    @classmethod
    def for_job(cls, job: JobConfig, address: str, job_id: str, **settings: Any) -> ScoringOrder:
        """The order for `job` (created on the server at `address` as `job_id`), which has
        held-out rows; `settings` sets the fields that do not come from the job."""
        data = job.data
        assert data.x_val is not None and data.y_val is not None, "no held-out rows"
        return cls(
            address=address,
            job_id=job_id,
            model_spec=job.model_spec,
            loss=job.loss,
            eval_every=job.eval_every,
            total_steps=job.total_steps,
            x_val=data.x_val,
            y_val=data.y_val,
            **settings,
        )


class Scorer:
    """Starts the scoring process for `order` and collects its scores as they come."""

    STOP_GRACE = 5.0  # seconds a stopped process has to exit before it is killed

    def __init__(self, order: ScoringOrder) -> None:
        self.results: list[dict[str, float]] = []
        self._lock = threading.Lock()
        self._ready, self._sent = threading.Event(), threading.Event()
        self._up = False  # it said READY (the ready event is also set when it ends)
        self._error: BaseException | None = None
        # the child imports gradfleet from wherever this process did (-P: and not from
        # the working directory)
        path = os.pathsep.join(p for p in sys.path if isinstance(p, str) and p)
        self._process = subprocess.Popen(
            [sys.executable, "-P", "-m", __name__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": path},
            start_new_session=True,  # the trainer's Ctrl-C is the trainer's to handle
            creationflags=getattr(subprocess, "IDLE_PRIORITY_CLASS", 0),  # Windows
        )
        self._reader = threading.Thread(
            target=self._talk, args=(order,), name="gradfleet-scores", daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: float) -> bool:
        """Whether the process is ready to pull the first version it scores; raises its
        error if it ended first."""
        ready = self._ready.wait(timeout)
        if ready and not self._up:
            self._reader.join()
            raise self._error or self._exit_error()
        return ready

    def latest(self) -> dict[str, float]:
        with self._lock:
            return self.results[-1] if self.results else {}

    def close(self, finished: bool) -> list[dict[str, float]]:
        """Every score, in step order; when the job `finished`, after scoring the rest."""
        assert self._process.stdin is not None
        if not finished:
            if not self._sent.is_set():  # it may never read its order
                self._process.kill()
            with contextlib.suppress(OSError):
                self._process.stdin.close()
            try:
                self._process.wait(timeout=self.STOP_GRACE)
            except subprocess.TimeoutExpired:
                logger.warning("the held-out scoring process did not stop; killing it")
                self._process.kill()
        self._reader.join()
        self._process.wait()
        with contextlib.suppress(OSError):
            self._process.stdin.close()
        if finished and (self._error is not None or self._process.returncode):
            raise self._error or self._exit_error()
        with self._lock:
            return list(self.results)

    def _exit_error(self) -> RuntimeError:
        code = self._process.wait()
        return RuntimeError(f"the held-out scoring process exited with code {code}; see above")

    def _talk(self, order: ScoringOrder) -> None:
        """Send the order, then read what the process says until it closes its end; if
        what it says cannot be read, stop it (it would block on a full pipe)."""
        assert self._process.stdin is not None and self._process.stdout is not None
        with contextlib.suppress(OSError, ValueError):  # gone or stopped already
            pickle.dump(order, self._process.stdin, protocol=pickle.HIGHEST_PROTOCOL)
            self._process.stdin.flush()
            self._sent.set()
        try:
            while True:
                try:
                    said = pickle.load(self._process.stdout)
                except EOFError:  # the process is done
                    return
                if said == READY:
                    self._up = True
                    self._ready.set()
                elif isinstance(said, BaseException):
                    self._error = said
                else:
                    with self._lock:
                        self.results.append(said)
        except Exception as exc:
            self._error = RuntimeError(f"could not read the held-out scoring process: {exc}")
            self._process.kill()
        finally:
            self._ready.set()


def score(order: ScoringOrder, say: Callable[[Any], None]) -> None:
    """Score every kept version in turn; one the job no longer keeps is skipped."""
    from threadpoolctl import threadpool_limits

    from gradfleet.nn import MLP
    from gradfleet.worker.actor import SERVER_PATIENCE, server_client
    from gradfleet.worker.result import evaluate

    threadpool_limits(limits=1)  # one core's worth of BLAS, and no spinning helpers
    model = MLP.from_spec(order.model_spec)
    every = order.eval_every
    with server_client(
        order.address, order.token, order.server_actor_name, SERVER_PATIENCE, order.ray_address
    ) as client:
        say(READY)
        _lowest_priority()
        for step in range(every, order.total_steps + 1, every):
            if not _pull_exact(client, order.job_id, step, model.flat):
                continue
            scores = evaluate(model, order.x_val, order.y_val, order.loss)
            say({"step": step, **scores})
            client.record_evaluation(order.job_id, step, scores)


def _pull_exact(client: ServerClient, job_id: str, step: int, out: np.ndarray) -> bool:
    """Pull exactly version `step` into `out` (waiting for it); False when it is gone."""
    from gradfleet.proto.errors import DeadlineExceeded, WrongState

    while True:
        try:
            client.pull_weights(job_id, min_version=step, out=out, timeout=2.0, exact=True)
            return True
        except DeadlineExceeded:
            continue
        except WrongState:  # not kept any more: scoring fell behind
            logger.debug("version %d was not kept long enough to score it", step)
            return False


def _lowest_priority() -> None:
    """The smallest share of a busy core: the job's workers and server come first. Every
    thread of the process (gRPC's too); threads started later inherit it."""
    switched = False
    if hasattr(os, "SCHED_IDLE") and os.path.isdir("/proc/self/task"):
        for thread in os.listdir("/proc/self/task"):
            with contextlib.suppress(OSError):  # a thread that just ended; not allowed
                os.sched_setscheduler(int(thread), os.SCHED_IDLE, os.sched_param(0))
                switched = True
    if not switched and hasattr(os, "nice"):  # on Windows its priority class does it
        with contextlib.suppress(OSError):
            os.nice(19)


def main() -> None:
    """The scoring process: its order on stdin, its scores on stdout; EOF on stdin ends
    it at once, wherever it is (a pull may be waiting out an unreachable server)."""
    channel: IO[bytes] = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints go to stderr
    order = pickle.load(sys.stdin.buffer)

    def stop_at_eof() -> None:  # the trainer is done with us (or gone): nothing to finish
        while os.read(sys.stdin.fileno(), 4096):
            pass
        os._exit(0)

    def say(what: Any) -> None:
        pickle.dump(what, channel, protocol=pickle.HIGHEST_PROTOCOL)
        channel.flush()

    threading.Thread(target=stop_at_eof, daemon=True).start()
    try:
        score(order, say)
    except Exception as exc:
        try:
            pickle.loads(pickle.dumps(exc))
        except Exception:  # does not survive the trip: its message will do
            exc = RuntimeError(f"held-out scoring failed: {type(exc).__name__}: {exc}")
        say(exc)
        sys.exit(1)


if __name__ == "__main__":
    main()
