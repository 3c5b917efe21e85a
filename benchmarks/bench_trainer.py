"""What the trainer's held-out scoring costs Ray training, per source tree (issue 13).

``bench_e2e.py``'s 2-worker Ray job (MNIST, 784-256-256-10, 64 rows per worker per step)
trained by ``train()`` with the held-out split scored every ``--eval-every`` steps (15 is
``bench_e2e.py``'s cadence; 0 scores nothing while training), from each ``--tree``
(default this repository; give an older checkout to compare before and after). Each
variant runs in a child process with its tree's sources first on ``PYTHONPATH``, and
each round starts with the next variant. Reported per variant, median over rounds:
samples/s after the first step, a worker's mean exchange (push and pull) and compute time
per step, and, from ``/proc/stat`` over the steps after the first half second, the
machine's busy CPU per step and its idle cores.

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

from bench_e2e import find_mnist, gradfleet_run

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
    """One run of ``bench_e2e.py``'s job in this process (the tree on PYTHONPATH)."""
    from gradfleet.client.data import load_mnist

    data = load_mnist(find_mnist())
    cpu = CpuSampler()
    started = time.time()
    run = gradfleet_run(data, "ray", WORKERS, ROWS, epochs, 0.1, eval_every=eval_every)
    first, last = run.step_times[0], run.step_times[-1]
    seconds, busy, idle = cpu.between(started + first + 0.5, started + last)
    steps = (len(run.step_times) - 1) * seconds / (last - first)
    return {
        "samples/s": run.samples_per_s,
        "exchange ms": run.extra["exchange"],
        "compute ms": run.extra["compute"],
        "CPU ms/step": busy / steps * 1e3,
        "idle cores": idle / seconds,
    }


def child(env: dict[str, str], epochs: int, eval_every: int) -> dict[str, float]:
    """One training run in a child process with the environment `env` (its tree's)."""
    command = [sys.executable, __file__, "--run", str(epochs), str(eval_every)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
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
    # not in the child: bench_checkpoints imports the client of this tree
    from bench_checkpoints import HERE, rotated, tree_env

    trees = [HERE, *args.tree]
    variants = [(tree, every) for every in args.eval_every for tree in trees]
    results: dict[tuple[Path, int], list[dict[str, float]]] = {v: [] for v in variants}
    for round_ in range(args.rounds):
        for tree, every in rotated(variants, round_):
            results[tree, every].append(child(tree_env(tree), args.epochs, every))
    columns = ["samples/s", "exchange ms", "compute ms", "CPU ms/step", "idle cores"]
    print(f"# {WORKERS} Ray workers, {ROWS} rows each, {args.epochs} epochs, {args.rounds} rounds")
    print(f"{'tree':<28}{'eval_every':>11}" + "".join(f"{c:>13}" for c in columns))
    for (tree, every), runs in results.items():
        cells = "".join(f"{statistics.median(r[c] for r in runs):13.2f}" for c in columns)
        print(f"{tree!s:<28}{every:>11}{cells}")


if __name__ == "__main__":
    main()
