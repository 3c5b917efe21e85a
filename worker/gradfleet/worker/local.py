"""Local single-process mode: the whole job in one process, no Ray, no sockets.

N virtual workers compute on the same per-worker batches as Ray workers would
(``BatchPlan``), and their gradients are averaged by the parameter server's own kernel
(``GradientSum``: summed in the model's dtype in worker order, then divided by the
count; through the job's codecs as ``LocalExchange`` does), then the same optimiser code.
So a sync job gives the same weights here and on a cluster.

Async mode runs as async training with no staleness: update v applies the gradient of
worker v mod N on its batch number v // N (its own step count, as a Ray worker counts),
computed on the current weights.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

import numpy as np

from gradfleet.nn import MLP, make_optimizer
from gradfleet.proto.errors import TrainingDiverged
from gradfleet.proto.wire import FlatLayout
from gradfleet.worker.batches import BatchPlan, shard_rows
from gradfleet.worker.config import JobConfig
from gradfleet.worker.datasets import ArrayDataset
from gradfleet.worker.local_exchange import LocalExchange
from gradfleet.worker.ray_data import RayDataset
from gradfleet.worker.result import TrainResult, evaluate, held_out_metrics

logger = logging.getLogger(__name__)
ProgressFn = Callable[[dict[str, float]], None]


def train_local(job: JobConfig, progress: ProgressFn | None = None) -> TrainResult:
    """Run ``job`` in this process and return the trained model with its history."""
    data = job.data
    if isinstance(data, RayDataset):
        data = data.to_arrays()
    assert isinstance(data, ArrayDataset)
    started = time.perf_counter()
    model = MLP.from_spec(job.model_spec)
    params = model.unflatten(model.flat)
    layout = FlatLayout.from_arrays(params)
    exchange = LocalExchange(
        layout, job.workers, job.servers, job.compression, job.pull_compression
    )
    # the model the workers compute with: the master weights as a pull delivers them
    seen = model if job.pull_compression == "none" else MLP.from_spec(job.model_spec)
    optimizer = make_optimizer(job.optimizer_settings)
    shards = []
    for worker in range(job.workers):
        start, stop = shard_rows(len(data.x), worker, job.workers)
        plan = BatchPlan(job.seed, worker, stop - start, job.rows_per_worker)
        shards.append((data.x[start:stop], data.y[start:stop], plan))
    grad = np.empty_like(model.flat)
    result = TrainResult(model=model, backend="local")
    evaluating = 0.0  # time spent on held-out evaluation, left out of wall_time
    for step in range(job.total_steps):
        step_started = time.perf_counter()
        weighted_loss, rows_used = 0.0, 0
        exchange.begin()
        if seen is not model:
            exchange.weights_seen(model.flat, out=seen.flat)
        contributions = _contributions(job, step)
        for i, (worker, batch_step) in enumerate(contributions):
            x, y, plan = shards[worker]
            rows = plan.indices(batch_step)
            with np.errstate(all="ignore"):  # a diverging step is reported below, once
                loss, _ = seen.loss_and_grads(x[rows], y[rows], job.loss, out=grad)
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


def _contributions(job: JobConfig, step: int) -> list[tuple[int, int]]:
    """(worker, that worker's batch number) of every gradient in update ``step``."""
    if job.mode == "async":
        return [(step % job.workers, step // job.workers)]
    return [(worker, step) for worker in range(job.workers)]


def _evaluate(model: MLP, job: JobConfig) -> dict[str, float]:
    data = job.data
    return evaluate(model, data.x_val, data.y_val, job.loss)
