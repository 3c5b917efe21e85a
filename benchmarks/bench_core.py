"""Time one full training step of an MLP: gradfleet.nn against hand-written NumPy and PyTorch.

One step is forward, mean cross-entropy, backward and an SGD update, in float32, for
784-256-256-10 (ReLU) at batch 64, 256 and 1024 and 784-1024-1024-10 at batch 256.
Variants, interleaved in rounds within one run so drifting machine load hits all alike:

    fused     gradfleet.nn's fast path: MLP.loss_and_grads + SGD.step on unflatten views
    graph     gradfleet.nn's generic graph: model(x) -> cross_entropy -> backward -> SGD
    numpy     a hand-written NumPy step, only the 8 matrix products and the elementwise
              work a step needs (the floor for any NumPy engine)
    torch     PyTorch on the CPU with the same thread count, when ``import torch`` works

It prints medians, ratios against hand-written NumPy and PyTorch, the BLAS that
threadpoolctl reports, and peak RSS at step 10 and step 1000 of a 1000-step run of the
fused and the graph path (each in a fresh process, so the numbers are its own).
Set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE only if you mean to: they can slow NumPy.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_core.py
    python benchmarks/bench_core.py --repeats 60 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from threadpoolctl import threadpool_info, threadpool_limits

from gradfleet.nn import MLP, SGD, cross_entropy

torch: Any = None  # imported by main() only, so the memory children stay lean
TORCH_MISSING = ""

CASES = [
    ((784, 256, 256, 10), 64),
    ((784, 256, 256, 10), 256),
    ((784, 256, 256, 10), 1024),
    ((784, 1024, 1024, 10), 256),
]
LR = 0.01
WARMUP_STEPS = 3
MEMORY_CASE = ((784, 256, 256, 10), 256)
MEMORY_STEPS = 1000

Step = Callable[[], None]


def make_batch(sizes: tuple[int, ...], batch: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, sizes[0]), dtype=np.float32)
    y = rng.integers(0, sizes[-1], batch)
    return x, y


def fused_step(sizes: tuple[int, ...], x: np.ndarray, y: np.ndarray) -> Step:
    model = MLP(sizes, activation="relu", seed=0, dtype="float32")
    optimizer = SGD(lr=LR)
    params = model.unflatten(model.flat)
    grad_buffer = np.empty_like(model.flat)
    grads = model.unflatten(grad_buffer)

    def step() -> None:
        model.loss_and_grads(x, y, out=grad_buffer)
        optimizer.step(params, grads)

    return step


def graph_step(sizes: tuple[int, ...], x: np.ndarray, y: np.ndarray) -> Step:
    model = MLP(sizes, activation="relu", seed=0, dtype="float32")
    optimizer = SGD(lr=LR)
    named = dict(model.named_parameters())
    params = {name: p.data for name, p in named.items()}

    def step() -> None:
        model.zero_grad()
        cross_entropy(model(x), y).backward()
        optimizer.step(params, {name: p.grad for name, p in named.items()})

    return step


def numpy_step(sizes: tuple[int, ...], x: np.ndarray, y: np.ndarray) -> Step:
    """The floor: per layer one product forward, two backward (none for the input)."""
    model = MLP(sizes, activation="relu", seed=0, dtype="float32")
    weights = [layer.weight.data.copy() for layer in model.linears]  # (out, in)
    biases = [layer.bias.data.copy() for layer in model.linears]
    rows = np.arange(len(y))
    lr = np.float32(LR)
    inv_batch = np.float32(1.0 / len(y))

    def step() -> None:
        activations = [x]
        h = x
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            h = h @ w.T
            h += b
            if i < len(weights) - 1:
                np.maximum(h, 0, out=h)
                activations.append(h)
        h -= h.max(axis=1, keepdims=True)  # softmax of the logits, in place
        np.exp(h, out=h)
        h /= h.sum(axis=1, keepdims=True)
        h[rows, y] -= 1
        h *= inv_batch
        g = h  # d(mean loss)/d(logits), (B, classes)
        for i in range(len(weights) - 1, -1, -1):
            grad_w = g.T @ activations[i]
            grad_b = g.sum(axis=0)
            if i > 0:
                g = g @ weights[i]
                g *= activations[i] > 0
            grad_w *= lr
            weights[i] -= grad_w
            grad_b *= lr
            biases[i] -= grad_b

    return step


def torch_step(sizes: tuple[int, ...], x: np.ndarray, y: np.ndarray) -> Step:
    assert torch is not None
    model = MLP(sizes, activation="relu", seed=0, dtype="float32")
    layers: list[Any] = []
    for i, linear in enumerate(model.linears):
        module = torch.nn.Linear(linear.in_features, linear.out_features)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(linear.weight.data))
            module.bias.copy_(torch.from_numpy(linear.bias.data))
        layers.append(module)
        if i < len(model.linears) - 1:
            layers.append(torch.nn.ReLU())
    net = torch.nn.Sequential(*layers)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(net(inputs), labels).backward()
        optimizer.step()

    return step


VARIANTS: dict[str, Callable[[tuple[int, ...], np.ndarray, np.ndarray], Step]] = {
    "fused": fused_step,
    "graph": graph_step,
    "numpy": numpy_step,
}


def load_torch() -> None:
    """Add the PyTorch variant when torch imports; otherwise remember why not."""
    global torch, TORCH_MISSING
    # Idle OpenMP threads must sleep, not spin, or they steal the cores that the
    # interleaved NumPy variants run on right after a PyTorch step.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("KMP_BLOCKTIME", "0")
    try:
        import torch as imported
    except Exception as exc:  # ImportError, or OSError from a broken install
        TORCH_MISSING = f"{type(exc).__name__}: {exc}"
        return
    torch = imported
    VARIANTS["torch"] = torch_step


def time_case(sizes: tuple[int, ...], batch: int, repeats: int) -> dict[str, float]:
    """Median seconds per step of each variant, timed in interleaved rounds."""
    x, y = make_batch(sizes, batch)
    steps = {name: build(sizes, x, y) for name, build in VARIANTS.items()}
    for step in steps.values():
        for _ in range(WARMUP_STEPS):
            step()
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for round_index in range(repeats):
        # Rotate the order each round so no variant always runs right after another.
        names = list(steps)
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            steps[name]()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def blas_description() -> str:
    parts = [
        f"{info.get('internal_api')} {info.get('version')} kernel={info.get('architecture')} "
        f"threads={info.get('num_threads')} ({info.get('filepath', '').rsplit('/', 1)[-1]})"
        for info in threadpool_info()
        if info.get("user_api") == "blas"
    ]
    return "; ".join(parts) or "no BLAS found by threadpoolctl"


def print_table(threads: int, results: list[tuple[str, int, dict[str, float]]]) -> None:
    names = list(VARIANTS)
    header = f"{'model':<16}{'batch':>6}" + "".join(f"{n + ' ms':>11}" for n in names)
    header += f"{'fused/np':>10}{'graph/np':>10}"
    if torch is not None:
        header += f"{'fused/torch':>13}{'np/torch':>10}"
    print(f"\n## {threads} thread(s): {blas_description()}")
    print(header)
    print("-" * len(header))
    for model, batch, medians in results:
        row = f"{model:<16}{batch:>6}" + "".join(f"{medians[n] * 1e3:>11.2f}" for n in names)
        row += f"{medians['fused'] / medians['numpy']:>10.2f}"
        row += f"{medians['graph'] / medians['numpy']:>10.2f}"
        if torch is not None:
            row += f"{medians['fused'] / medians['torch']:>13.2f}"
            row += f"{medians['numpy'] / medians['torch']:>10.2f}"
        print(row)


def rss_mib() -> dict[str, float]:
    """Peak RSS by getrusage, and (Linux) this process's own peak and current RSS from /proc.

    ru_maxrss survives exec on Linux, so a child starts with its parent's peak; VmHWM
    belongs to the child's own address space. main() spawns the children first, while
    the parent is still small, so both peaks are the child's.
    """
    figures = {"maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # KiB
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    figures[key] = int(value.split()[0]) / 1024  # kB
    except OSError:
        pass
    return figures


def memory_run(path: str, threads: int) -> None:
    """Child process: 1000 steps of one path; print its RSS figures at step 10 and 1000."""
    sizes, batch = MEMORY_CASE
    x, y = make_batch(sizes, batch)
    step = {"fused": fused_step, "graph": graph_step}[path](sizes, x, y)
    figures: dict[str, dict[str, float]] = {}
    with threadpool_limits(limits=threads, user_api="blas"):
        for i in range(1, MEMORY_STEPS + 1):
            step()
            if i in (10, MEMORY_STEPS):
                figures[str(i)] = rss_mib()
    print(json.dumps(figures))


def measure_memory(threads: int) -> None:
    sizes, batch = MEMORY_CASE
    model = "-".join(map(str, sizes))
    last = MEMORY_STEPS
    print(f"\n## RSS in MiB over {last} steps ({model}, batch {batch}, fresh process each)")
    header = f"{'path':<7}"
    for label in ("peak(getrusage)", "peak(VmHWM)", "now(VmRSS)"):
        header += f"{label + '@10':>20}{f'@{last}':>7}"
    print(header)
    for path in ("fused", "graph"):
        child = subprocess.run(
            [sys.executable, __file__, "--memory-child", path, "--threads", str(threads)],
            capture_output=True,
            text=True,
            check=True,
        )
        figures = json.loads(child.stdout.strip().splitlines()[-1])
        row = f"{path:<7}"
        for key in ("maxrss", "VmHWM", "VmRSS"):
            early, late = figures["10"].get(key, math.nan), figures[str(last)].get(key, math.nan)
            row += f"{early:>20.1f}{late:>7.1f}"
        print(row)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=60, help="timed rounds per case")
    parser.add_argument(
        "--threads", default="1,2", help="comma-separated BLAS thread counts, e.g. 1 or 1,2"
    )
    parser.add_argument("--memory-child", choices=("fused", "graph"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    thread_counts = [int(t) for t in args.threads.split(",")]
    if args.memory_child:
        memory_run(args.memory_child, thread_counts[0])
        return

    print(f"python {sys.version.split()[0]}, numpy {np.__version__}, float32, SGD lr={LR}")
    measure_memory(thread_counts[0])  # first, while this parent process is still small
    print(f"BLAS (threadpoolctl, before pinning): {blas_description()}")
    load_torch()
    if torch is None:
        print(f"torch: no PyTorch column, import failed ({TORCH_MISSING});")
        print("       install it with pip install 'gradfleet[bench]' for the comparison.")
    else:
        wait = os.environ["OMP_WAIT_POLICY"]
        print(f"torch {torch.__version__}, CPU, threads pinned like BLAS, OMP_WAIT_POLICY={wait}")
    print(f"median of {args.repeats} interleaved rounds after {WARMUP_STEPS} warm-up steps")
    for threads in thread_counts:
        with threadpool_limits(limits=threads, user_api="blas"):
            if torch is not None:
                torch.set_num_threads(threads)
            results = [
                ("-".join(map(str, sizes)), batch, time_case(sizes, batch, args.repeats))
                for sizes, batch in CASES
            ]
            print_table(threads, results)


if __name__ == "__main__":
    main()
