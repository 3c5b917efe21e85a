"""Local single-process mode: the whole job in one process, no Ray, no sockets.

N virtual workers compute on the same per-worker batches as Ray workers would
(``BatchPlan``), and their gradients are averaged by the parameter server's own kernel
(``GradientSum``: summed in the model's dtype in worker order, then divided by the
count; through the job's codecs as ``LocalExchange`` does), then the same optimiser code,
with one BLAS thread as each Ray worker has (a product's rounding depends on the thread
count). So a sync job gives the same weights here and on a cluster.

Async mode runs as async training with no staleness: update v applies the gradient of
worker v mod N on its batch number v // N (its own step count, as a Ray worker counts),
computed on the current weights.

An elastic job replays the membership events it is given (``membership``, as a run's
``TrainResult.membership`` records them): each step's members compute on the rows
``gradfleet.worker.elastic`` plans, a worker that joins starts with a fresh residual, and
a sync job's weights equal the Ray run's that recorded those events.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from gradfleet.nn import MLP, make_optimizer
from gradfleet.proto.errors import TrainingDiverged
from gradfleet.proto.wire import FlatLayout
from gradfleet.worker.batches import BatchPlan, shard_rows
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset
from gradfleet.worker.elastic import Change, Timeline
from gradfleet.worker.local_exchange import LocalExchange
from gradfleet.worker.ray_data import RayDataset
from gradfleet.worker.result import TrainResult, evaluate, held_out_metrics

logger = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, float]], None]


def train_local(
    job: JobConfig,
    progress: ProgressFn | None = None,
    membership: Sequence[Mapping[str, Any]] = (),
) -> TrainResult:
    """Run ``job`` in this process and return the trained model with its history;
    ``membership``: the events of an elastic job to replay (see the module docstring)."""
    with threadpool_limits(1):
        return _train(job, progress, membership)


def _train(
    job: JobConfig, progress: ProgressFn | None, membership: Sequence[Mapping[str, Any]]
) -> TrainResult:
    data = job.data
    if isinstance(data, RayDataset):
        data = data.to_arrays()
    assert isinstance(data, ArrayDataset)
    started = time.perf_counter()
    model = MLP.from_spec(job.model_spec)
    params = model.unflatten(model.flat)
    layout = FlatLayout.from_arrays(params)
    exchange = LocalExchange(
        layout, job.worker_bounds[1], job.servers, job.compression, job.pull_compression
    )
    # the model the workers compute with: the master weights as a pull delivers them
    seen = model if job.pull_compression == "none" else MLP.from_spec(job.model_spec)
    optimizer = make_optimizer(job.optimizer_settings)
    batches = _Batches(job, len(data.x), membership)
    grad = np.empty_like(model.flat)
    result = TrainResult(model=model, backend="local")
    evaluating = 0.0  # time spent on held-out evaluation, left out of wall_time
    for step in range(job.total_steps):
        step_started = time.perf_counter()
        weighted_loss, rows_used = 0.0, 0
        exchange.begin()
        if seen is not model:
            exchange.weights_seen(model.flat, out=seen.flat)
        for worker in batches.joining(step):
            exchange.reset(worker)
        contributions = batches.of_step(step)
        for i, (worker, rows) in enumerate(contributions):
            with np.errstate(all="ignore"):  # a diverging step is reported below, once
                loss, _ = seen.loss_and_grads(data.x[rows], data.y[rows], job.loss, out=grad)
            weighted_loss += loss * len(rows)
            rows_used += len(rows)
            mean = exchange.add(worker, grad, last=i == len(contributions) - 1)
        if not math.isfinite(weighted_loss):
            raise TrainingDiverged.at_step(step + 1, "loss")
        if mean is None:
            raise TrainingDiverged.at_step(step + 1, "gradients")
        optimizer.step(params, model.unflatten(mean))
        elapsed = time.perf_counter() - step_started
        entry = {
            "step": step + 1,
            "loss": weighted_loss / rows_used,
            "rows": rows_used,
            "samples_per_s": rows_used / elapsed if elapsed > 0 else 0.0,
            "wall_time": time.perf_counter() - started - evaluating,
        }
        result.history.append(entry)
        if job.eval_every and (step + 1) % job.eval_every == 0:
            eval_started = time.perf_counter()
            metrics = {"step": step + 1, "wall_time": entry["wall_time"], **_evaluate(model, job)}
            result.evaluations.append(metrics)
            evaluating += time.perf_counter() - eval_started
        if progress is not None:
            progress(entry | held_out_metrics(result.evaluations))
    result.final_metrics = {"steps": job.total_steps, **_evaluate(model, job)}
    result.wall_time = time.perf_counter() - started
    logger.info("local training finished: %s", result.final_metrics)
    return result


class _Batches:
    """Each step's contributions: (worker, its rows of the training data), in worker
    order; from fixed shards, or from an elastic job's plan over its recorded members."""

    def __init__(self, job: JobConfig, rows: int, membership: Sequence[Mapping[str, Any]]):
        self.job, self.sync = job, job.mode == "sync"
        self.own_steps: dict[int, int] = {}  # async: each worker's own count
        if membership and not job.elastic:
            raise ValueError("membership events replay an elastic job (min/max_workers)")
        changes = tuple(
            Change(int(e["version"]), tuple(e["new"]), bool(e.get("mid_step", False)))
            for e in membership
        )
        self.timeline = Timeline(tuple(range(job.workers)), changes)
        self.plan = job.elastic_plan() if job.elastic else None
        self.shards = []
        for worker in range(job.workers):
            start, stop = shard_rows(rows, worker, job.workers)
            plan = BatchPlan(job.seed, worker, stop - start, job.rows_per_worker)
            self.shards.append((start, plan))

    def joining(self, step: int) -> set[int]:
        """Workers that are members of `step` but not of the step before (new ones)."""
        if step == 0:
            return set()
        return set(self.timeline.members(step)) - set(self.timeline.members(step - 1))

    def of_step(self, step: int) -> list[tuple[int, np.ndarray]]:
        members = self.timeline.members(step)
        if not self.sync:  # update `step` takes the gradient of one worker
            worker = members[step % len(members)]
            own = self.own_steps[worker] = self.own_steps.get(worker, -1) + 1
            if self.plan is not None:
                return [(worker, self.plan.async_indices(own, worker, members))]
            start, plan = self.shards[worker]
            return [(worker, start + plan.indices(own))]
        if self.plan is not None:
            return [(w, self.plan.indices(step, w, self.timeline)) for w in members]
        return [(w, self.shards[w][0] + self.shards[w][1].indices(step)) for w in members]


def _evaluate(model: MLP, job: JobConfig) -> dict[str, float]:
    data = job.data
    return evaluate(model, data.x_val, data.y_val, job.loss)
