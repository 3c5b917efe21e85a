"""What the trainer's held-out scoring costs Ray training, per source tree (issue 13).

``bench_e2e.py``'s 2-worker Ray job (MNIST, 784-256-256-10, 64 rows per worker per step)
trained by ``train()`` with the held-out split scored every ``--eval-every`` steps (15 is
``bench_e2e.py``'s cadence; 0 scores nothing while training), from each ``--tree``
(default this repository; give an older checkout to compare before and after). Each
variant runs in a child process with its tree's sources first on ``PYTHONPATH``, and
each round starts with the next variant. Reported per variant, median over rounds:
samples/s after the first step, and, from ``/proc/stat`` over the steps after the first
half second, the machine's busy CPU per step and its idle cores.

    python benchmarks/bench_trainer.py [--tree /path/to/old/checkout] [--rounds 6] \\
        [--epochs 20] [--eval-every 15 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from bench_e2e import SIZES, find_mnist

ROWS, WORKERS = 64, 2


class CpuSampler:
    """Busy and idle CPU seconds of the whole machine, sampled every 0.1 s."""

    def __init__(self) -> None:
        self.samples: list[tuple[float, float, float]] = []
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            with open("/proc/stat") as f:
                ticks = [int(v) / 100 for v in f.readline().split()[1:8]]
            user, nice, system, idle, iowait, irq, softirq = ticks
            busy = user + nice + system + irq + softirq
            self.samples.append((time.time(), busy, idle + iowait))
            time.sleep(0.1)

    def between(self, start: float, stop: float) -> tuple[float, float, float]:
        """(seconds, busy CPU seconds, idle CPU seconds) within [start, stop]."""
        inside = [s for s in self.samples if start <= s[0] <= stop]
        first, last = inside[0], inside[-1]
        return last[0] - first[0], last[1] - first[1], last[2] - first[2]


def run_one(epochs: int, eval_every: int) -> dict[str, float]:
    """One training run in this process (the tree on PYTHONPATH)."""
    from gradfleet import nn
    from gradfleet.client import JobConfig, train
    from gradfleet.client.data import load_mnist

    data = load_mnist(find_mnist())
    job = JobConfig(
        model=nn.MLP(SIZES, seed=0),
        dataset=data,
        optimizer={"name": "sgd", "lr": 0.1},
        batch_size=ROWS * WORKERS,
        epochs=epochs,
        workers=WORKERS,
        eval_every=eval_every,
    )
    cpu = CpuSampler()
    started = time.time()
    history = train(job, backend="ray").history
    first, last = history[0]["wall_time"], history[-1]["wall_time"]
    seconds, busy, idle = cpu.between(started + first + 0.5, started + last)
    steps = (len(history) - 1) * seconds / (last - first)
    return {
        "samples/s": (len(history) - 1) * ROWS * WORKERS / (last - first),
        "CPU ms/step": busy / steps * 1e3,
        "idle cores": idle / seconds,
    }


def child(tree: Path, epochs: int, eval_every: int) -> dict[str, float]:
    """One training run in a child process that imports gradfleet from `tree`."""
    from bench_checkpoints import tree_env  # not in the child: it needs this tree's client

    command = [sys.executable, __file__, "--run", str(epochs), str(eval_every)]
    done = subprocess.run(command, capture_output=True, text=True, env=tree_env(tree), check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tree", type=Path, action="append", default=[])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--eval-every", type=int, nargs="+", default=[15, 0])
    parser.add_argument("--run", type=int, nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_one(*args.run)))
        return
    from bench_checkpoints import HERE, rotated

    trees = [HERE, *args.tree]
    variants = [(tree, every) for every in args.eval_every for tree in trees]
    results: dict[tuple[Path, int], list[dict[str, float]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for tree, every in rotated(variants, round_):
            results[tree, every].append(child(tree, args.epochs, every))
    columns = ["samples/s", "CPU ms/step", "idle cores"]
    print(f"# {WORKERS} Ray workers, {ROWS} rows each, {args.epochs} epochs, {args.rounds} rounds")
    print(f"{'tree':<28}{'eval_every':>11}" + "".join(f"{c:>13}" for c in columns))
    for (tree, every), runs in results.items():
        cells = "".join(f"{statistics.median(r[c] for r in runs):13.2f}" for c in columns)
        print(f"{tree!s:<28}{every:>11}{cells}")


if __name__ == "__main__":
    main()
