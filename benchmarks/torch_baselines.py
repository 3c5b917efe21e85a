"""PyTorch baselines for bench_e2e.py: one process, DDP (gloo), and a Ray parameter server.

Only benchmarks import this; PyTorch is never a gradfleet dependency.
"""

from __future__ import annotations

import itertools
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn as tnn

SIZES = [784, 256, 256, 10]


def make_model() -> tnn.Module:
    torch.manual_seed(0)
    layers: list[tnn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(SIZES)):
        layers.append(tnn.Linear(a, b))
        if i < len(SIZES) - 2:
            layers.append(tnn.ReLU())
    return tnn.Sequential(*layers)


def accuracy(model: tnn.Module, x: np.ndarray, y: np.ndarray) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x)).argmax(1).numpy() == y).mean())


def single_process(data: Any, rows: int, epochs: int, lr: float, run_cls: type) -> Any:
    torch.set_num_threads(1)
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = tnn.CrossEntropyLoss()
    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    rng = np.random.default_rng(0)
    per_epoch = len(x) // rows
    steps, evaluations, evaluating = [], [], 0.0
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(len(x)))
        for i in range(per_epoch):
            idx = order[i * rows : (i + 1) * rows]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            steps.append(time.perf_counter() - started - evaluating)
            if (i + 1) % max(1, per_epoch // 4) == 0:
                t = time.perf_counter()
                evaluations.append((steps[-1], accuracy(model, data.x_val, data.y_val)))
                evaluating += time.perf_counter() - t
    return run_cls(rows, steps, evaluations, accuracy(model, data.x_val, data.y_val))


def _ddp_rank(
    rank: int,
    world: int,
    port: int,
    data: Any,
    rows: int,
    epochs: int,
    lr: float,
    out: str,
    hook: str,
) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = tnn.parallel.DistributedDataParallel(make_model())
    register_hook(model, hook)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    loss_fn = tnn.CrossEntropyLoss()
    shard = len(data.x) // world
    x = torch.from_numpy(data.x[rank * shard : (rank + 1) * shard])
    y = torch.from_numpy(data.y[rank * shard : (rank + 1) * shard])
    rng = np.random.default_rng(rank)
    per_epoch = shard // rows
    steps, evaluations, evaluating = [], [], 0.0
    dist.barrier()
    started = time.perf_counter()
    for _ in range(epochs):
        order = torch.from_numpy(rng.permutation(shard))
        for i in range(per_epoch):
            idx = order[i * rows : (i + 1) * rows]
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x[idx]), y[idx]).backward()
            opt.step()
            steps.append(time.perf_counter() - started - evaluating)
            if rank == 0 and (i + 1) % max(1, per_epoch // 4) == 0:
                t = time.perf_counter()
                evaluations.append((steps[-1], accuracy(model.module, data.x_val, data.y_val)))
                evaluating += time.perf_counter() - t
    if rank == 0:
        final = accuracy(model.module, data.x_val, data.y_val)
        np.savez(out, steps=np.array(steps), evaluations=np.array(evaluations), final=final)
    dist.destroy_process_group()


def register_hook(model: tnn.parallel.DistributedDataParallel, hook: str) -> None:
    """DDP's communication hooks: "none" (all-reduce in fp32), "fp16", "powersgd" (rank 4,
    with error feedback, from the second step). DDP's bf16 hook needs CUDA and NCCL (it
    refuses gloo), so fp16 stands in for it on CPU."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if hook == "fp16":
        model.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif hook == "powersgd":
        state = powerSGD_hook.PowerSGDState(
            process_group=None, matrix_approximation_rank=4, start_powerSGD_iter=2
        )
        model.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    elif hook != "none":
        raise ValueError(f"unknown DDP hook {hook!r}")


def ddp(
    data: Any,
    rows: int,
    epochs: int,
    lr: float,
    run_cls: type,
    world: int = 2,
    hook: str = "none",
) -> Any:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.npz")
        started = time.perf_counter()
        mp.spawn(_ddp_rank, args=(world, port, data, rows, epochs, lr, out, hook), nprocs=world)
        spawn_time = time.perf_counter() - started
        result = np.load(out)
        steps = list(result["steps"])
        del spawn_time
        return run_cls(
            rows * world, steps, [tuple(e) for e in result["evaluations"]], float(result["final"])
        )


@ray.remote(num_cpus=0)
class _ParameterServer:
    def __init__(self, lr: float) -> None:
        self.params = [p.detach().numpy().copy() for p in make_model().parameters()]
        self.lr = lr

    def apply_gradients(self, *grads: list[np.ndarray]) -> list[np.ndarray]:
        for i, p in enumerate(self.params):
            p -= self.lr * np.mean([g[i] for g in grads], axis=0)
        return self.params

    def get_weights(self) -> list[np.ndarray]:
        return self.params


@ray.remote(num_cpus=1)
class _Worker:
    def __init__(self, x: np.ndarray, y: np.ndarray, rows: int, seed: int) -> None:
        torch.set_num_threads(1)
        self.model, self.loss = make_model(), tnn.CrossEntropyLoss()
        self.x, self.y, self.rows = torch.from_numpy(x), torch.from_numpy(y), rows
        self.rng, self.order, self.pos = np.random.default_rng(seed), None, len(x)

    def compute_gradients(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        with torch.no_grad():
            for p, w in zip(self.model.parameters(), weights, strict=True):
                p.copy_(torch.from_numpy(w))
        if self.pos + self.rows > len(self.x):
            self.order, self.pos = torch.from_numpy(self.rng.permutation(len(self.x))), 0
        idx = self.order[self.pos : self.pos + self.rows]
        self.pos += self.rows
        self.model.zero_grad(set_to_none=True)
        self.loss(self.model(self.x[idx]), self.y[idx]).backward()
        return [p.grad.numpy() for p in self.model.parameters()]


def ray_parameter_server(
    data: Any, rows: int, epochs: int, lr: float, run_cls: type, world: int = 2
) -> Any:
    """The textbook Ray pattern: an actor holds the weights, gradients travel via ray.get."""
    started = time.perf_counter()
    ray.init(address="local", num_cpus=world, include_dashboard=False, log_to_driver=False)
    try:
        shard = len(data.x) // world
        ps = _ParameterServer.remote(lr)
        workers = [
            _Worker.remote(
                data.x[r * shard : (r + 1) * shard], data.y[r * shard : (r + 1) * shard], rows, r
            )
            for r in range(world)
        ]
        model = make_model()
        weights = ps.get_weights.remote()
        steps, evaluations, evaluating = [], [], 0.0
        per_epoch = shard // rows
        for step in range(epochs * per_epoch):
            grads = [w.compute_gradients.remote(weights) for w in workers]
            weights = ps.apply_gradients.remote(*grads)
            ray.wait([weights])
            steps.append(time.perf_counter() - started - evaluating)
            if (step + 1) % max(1, per_epoch // 4) == 0:
                t = time.perf_counter()
                with torch.no_grad():
                    for p, w in zip(model.parameters(), ray.get(weights), strict=True):
                        p.copy_(torch.from_numpy(w))
                evaluations.append((steps[-1], accuracy(model, data.x_val, data.y_val)))
                evaluating += time.perf_counter() - t
        with torch.no_grad():
            for p, w in zip(model.parameters(), ray.get(weights), strict=True):
                p.copy_(torch.from_numpy(w))
        return run_cls(rows * world, steps, evaluations, accuracy(model, data.x_val, data.y_val))
    finally:
        ray.shutdown()


def variants(data: Any, rows: int, epochs: int, lr: float, run_cls: type) -> dict[str, Callable]:
    return {
        "PyTorch (1 process)": lambda: single_process(data, rows, epochs, lr, run_cls),
        "PyTorch DDP (gloo, 2 processes)": lambda: ddp(data, rows, epochs, lr, run_cls),
        "PyTorch DDP, fp16 hook": lambda: ddp(data, rows, epochs, lr, run_cls, hook="fp16"),
        "PyTorch DDP, PowerSGD rank 4": lambda: ddp(
            data, rows, epochs, lr, run_cls, hook="powersgd"
        ),
        "Ray PS pattern, PyTorch workers (2)": lambda: ray_parameter_server(
            data, rows, epochs, lr, run_cls
        ),
    }
