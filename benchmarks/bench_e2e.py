"""End-to-end training speed on MNIST: gradfleet's backends against hand-written and PyTorch.

MLP 784-256-256-10, ReLU, plain SGD (lr 0.1), ``--rows`` rows per worker per step, on the
MNIST test set (tests/data/mnist) split 8,000 train / 2,000 held out. For every variant it reports
samples/s (steady state, after the first step), seconds to 95 % held-out accuracy,
held-out accuracy after 5 epochs and after ``--epochs`` (default 10), and the time to the
first step (start-up); for gradfleet's Ray backend also the per-step split per worker
(pull, compute, exchange = push + wait for the step + pull of the next weights).
The held-out split is scored four times an epoch. The hand-written and local runs leave
that time out; on Ray a process at idle priority scores each of those versions while the
workers train, so Ray's samples/s pay for what it takes from them. Variants run one after another
in each round; ``--rounds`` rounds are interleaved and the median is printed.

    python benchmarks/bench_e2e.py                 # 64 rows per worker
    python benchmarks/bench_e2e.py --rows 256

PyTorch variants run when ``import torch`` works (``pip install torch==2.13.0``).
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import ArrayDataset, load_mnist

SIZES = [784, 256, 256, 10]
TARGET = 0.95
CODEC_VARIANTS = [  # (compression, pull_compression, overlap)
    ("none", "none", False),
    ("none", "none", True),
    ("bf16", "none", False),
    ("bf16", "none", True),
    ("bf16", "bf16", False),
    ("bf16", "bf16", True),
    ("fp16", "fp16", True),
    ("topk:0.01", "none", False),
    ("sign", "none", False),
]


def _describe(push: str, pull: str, overlap: bool) -> str:
    if (push, pull, overlap) == ("none", "none", False):
        return ""
    parts = [push if pull == "none" else f"{push}/{pull} pulls"] if push != "none" else []
    return ", " + ", ".join(parts + (["overlap"] if overlap else []))


@dataclass
class Run:
    """One training run: when each step finished and what the held-out accuracy was."""

    samples_per_step: int
    step_times: list[float]  # seconds since the start of the run, excluding evaluation
    evaluations: list[tuple[float, float]]  # (seconds, held-out accuracy)
    final_accuracy: float
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def startup(self) -> float:
        return self.step_times[0]

    @property
    def samples_per_s(self) -> float:
        span = self.step_times[-1] - self.step_times[0]
        return self.samples_per_step * (len(self.step_times) - 1) / span

    def accuracy_after(self, epochs: int, total_epochs: int) -> float:
        """Held-out accuracy of the last evaluation made by the end of epoch ``epochs``."""
        per_epoch = len(self.step_times) // total_epochs
        cutoff = self.step_times[min(len(self.step_times), epochs * per_epoch) - 1] + 1e-9
        return next((acc for t, acc in reversed(self.evaluations) if t <= cutoff), float("nan"))

    @property
    def time_to_target(self) -> float:
        return next((t for t, acc in self.evaluations if acc >= TARGET), float("nan"))


def find_mnist() -> Path:
    """The MNIST test set kept in the repository (tests/data/mnist)."""
    return Path(__file__).resolve().parents[1] / "tests" / "data" / "mnist"


def gradfleet_run(
    data: ArrayDataset,
    backend: str,
    workers: int,
    rows: int,
    epochs: int,
    lr: float,
    **options: object,
) -> Run:
    """A gradfleet run; `options` are further JobConfig fields (compression, overlap,
    eval_every: four times an epoch unless given)."""
    four_per_epoch = max(1, len(data.x) // (rows * workers) // 4)
    job = JobConfig(
        model=nn.MLP(SIZES, seed=0),
        dataset=data,
        optimizer={"name": "sgd", "lr": lr},
        batch_size=rows * workers,
        epochs=epochs,
        workers=workers,
        **({"eval_every": four_per_epoch} | options),  # type: ignore[arg-type]
    )
    result = train(job, backend=backend)
    steps = [entry["wall_time"] for entry in result.history]  # from train()'s start
    extra: dict[str, float] = {}
    timings = result.final_metrics.get("worker_timings")
    if timings:
        count = sum(t["steps"] for t in timings)
        for phase in ("pull", "compute", "push", "exchange"):
            if phase in timings[0]:
                extra[phase] = 1000 * sum(t[phase] for t in timings) / count
    return Run(
        rows * workers,
        steps,
        [(e["wall_time"], e["val_accuracy"]) for e in result.evaluations],
        result.final_metrics["val_accuracy"],
        extra,
    )


def numpy_run(data: ArrayDataset, rows: int, epochs: int, lr: float) -> Run:
    """The floor for any NumPy engine: only the necessary products and elementwise work."""
    model = nn.MLP(SIZES, seed=0)
    w = [layer.weight.data.T.copy() for layer in model.linears]  # (in, out)
    b = [layer.bias.data.copy() for layer in model.linears]
    x, y = data.x, data.y
    rng = np.random.default_rng(0)
    steps: list[float] = []
    evaluations: list[tuple[float, float]] = []
    per_epoch = len(x) // rows
    started, evaluating = time.perf_counter(), 0.0
    for epoch in range(epochs):
        order = rng.permutation(len(x))
        for i in range(per_epoch):
            idx = order[i * rows : (i + 1) * rows]
            xb, yb = x[idx], y[idx]
            h1 = np.maximum(xb @ w[0] + b[0], 0)
            h2 = np.maximum(h1 @ w[1] + b[1], 0)
            logits = h2 @ w[2] + b[2]
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            p[np.arange(rows), yb] -= 1
            p /= rows
            g2 = (p @ w[2].T) * (h2 > 0)
            g1 = (g2 @ w[1].T) * (h1 > 0)
            w[2] -= lr * (h2.T @ p)
            b[2] -= lr * p.sum(axis=0)
            w[1] -= lr * (h1.T @ g2)
            b[1] -= lr * g2.sum(axis=0)
            w[0] -= lr * (xb.T @ g1)
            b[0] -= lr * g1.sum(axis=0)
            steps.append(time.perf_counter() - started - evaluating)
            if (i + 1) % max(1, per_epoch // 4) == 0:
                t = time.perf_counter()
                evaluations.append((steps[-1], _numpy_accuracy(w, b, data)))
                evaluating += time.perf_counter() - t
        del epoch
    return Run(rows, steps, evaluations, _numpy_accuracy(w, b, data))


def _numpy_accuracy(w: list[np.ndarray], b: list[np.ndarray], data: ArrayDataset) -> float:
    h = data.x_val
    for i in range(3):
        h = h @ w[i] + b[i]
        if i < 2:
            h = np.maximum(h, 0)
    return float((h.argmax(axis=1) == data.y_val).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64, help="rows per worker per step")
    parser.add_argument("--epochs", type=int, default=10, help="epochs per run (>= 5)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--skip-torch", action="store_true")
    parser.add_argument(
        "--only", nargs="*", default=[], help="run the variants whose names contain these"
    )
    args = parser.parse_args()

    data = load_mnist(find_mnist())
    variants: dict[str, Callable[[], Run]] = {
        "hand-written NumPy (1 process)": lambda: numpy_run(data, args.rows, args.epochs, args.lr),
        "gradfleet local": lambda: gradfleet_run(data, "local", 1, args.rows, args.epochs, args.lr),
        "gradfleet ray, 1 worker": lambda: gradfleet_run(
            data, "ray", 1, args.rows, args.epochs, args.lr
        ),
    }
    # codecs (gradients / pulled weights) x overlap, 2 Ray workers
    for push, pull, overlap in CODEC_VARIANTS:
        name = "gradfleet ray, 2 workers" + _describe(push, pull, overlap)
        variants[name] = functools.partial(
            gradfleet_run, data, "ray", 2, args.rows, args.epochs, args.lr,
            compression=push, pull_compression=pull, overlap=overlap,
        )  # fmt: skip
    if not args.skip_torch:
        try:
            from benchmarks import torch_baselines
        except ImportError:
            sys.path.insert(0, str(Path(__file__).parent))
            try:
                import torch_baselines  # type: ignore[no-redef]
            except ImportError as exc:
                print(f"PyTorch variants skipped: {exc}")
                torch_baselines = None  # type: ignore[assignment]
        if torch_baselines is not None:
            variants |= torch_baselines.variants(data, args.rows, args.epochs, args.lr, Run)

    if args.only:
        variants = {k: v for k, v in variants.items() if any(o in k for o in args.only)}
    blas = threadpool_info()
    print(
        f"# bench_e2e: MNIST 8000/2000, MLP {SIZES}, SGD lr {args.lr}, "
        f"{args.rows} rows per worker per step, {args.epochs} epochs, {args.rounds} round(s)"
    )
    kernels = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in blas]
    print(f"# BLAS: {kernels}")
    runs: dict[str, list[Run]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, run in variants.items():
            runs[name].append(run())

    def median(name: str, metric: Callable[[Run], float]) -> float:
        return statistics.median(metric(r) for r in runs[name])

    header = (
        f"{'variant':52} {'samples/s':>10} {'s to 95%':>9} {'acc@5ep':>8} {'acc@end':>8} "
        f"{'start-up s':>10}"
    )
    print(header)
    print("-" * len(header))
    for name in variants:
        print(
            f"{name:52} {median(name, lambda r: r.samples_per_s):10.0f} "
            f"{median(name, lambda r: r.time_to_target):9.2f} "
            f"{median(name, lambda r: r.accuracy_after(5, args.epochs)):8.4f} "
            f"{median(name, lambda r: r.final_accuracy):8.4f} "
            f"{median(name, lambda r: r.startup):10.2f}"
        )
    print()
    for name in variants:
        extra = runs[name][-1].extra
        if extra:
            split = ", ".join(f"{k} {v:.2f} ms" for k, v in extra.items())
            print(f"per-step split, {name}: {split}")
    ratios = {
        "ray 2 workers / DDP 2 processes": (
            "gradfleet ray, 2 workers",
            "PyTorch DDP (gloo, 2 processes)",
        ),
        "ray 2 workers, bf16, overlap / DDP 2 processes": (
            "gradfleet ray, 2 workers, bf16, overlap",
            "PyTorch DDP (gloo, 2 processes)",
        ),
        "ray 2 workers, bf16/bf16 pulls, overlap / DDP 2 processes": (
            "gradfleet ray, 2 workers, bf16/bf16 pulls, overlap",
            "PyTorch DDP (gloo, 2 processes)",
        ),
        "ray 2 workers, bf16, overlap / Ray-PS with PyTorch": (
            "gradfleet ray, 2 workers, bf16, overlap",
            "Ray PS pattern, PyTorch workers (2)",
        ),
        "ray 2 workers / Ray-PS with PyTorch": (
            "gradfleet ray, 2 workers",
            "Ray PS pattern, PyTorch workers (2)",
        ),
        "local / hand-written NumPy": ("gradfleet local", "hand-written NumPy (1 process)"),
    }
    print()
    for label, (a, b) in ratios.items():
        if a in runs and b in runs:
            ratio = median(a, lambda r: r.samples_per_s) / median(b, lambda r: r.samples_per_s)
            print(f"{label}: {ratio:.2f}x samples/s")


if __name__ == "__main__":
    with threadpool_limits(1):  # every variant computes with one BLAS thread per process
        main()
