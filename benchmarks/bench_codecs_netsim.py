"""Time to 95 % held-out MNIST accuracy on a simulated cluster: gradfleet's codecs vs DDP.

MLP 784-2048-2048-10 (5.8M float32 parameters, 23 MB), 4 workers x 64 rows per step, SGD
lr 0.1, MNIST 8,000 train / 2,000 held out (tests/data/mnist). Each variant is measured
in two parts, and time to 95 % is their product:

* steps to 95 %: the synchronous steps until held-out accuracy first reaches 95 %
  (evaluated every ``--eval-every`` steps). The count does not depend on the network, so
  it is measured once on this machine: gradfleet's in local mode, which computes bit
  for bit the weights of the distributed job with the same codecs and servers; DDP's in
  its own 4-process run over loopback.
* seconds per step on a simulated cluster (``netsim.py``): each process in a network
  namespace of its own, its link shaped to ``--rate`` each way; gradfleet with S server
  nodes and 4 worker nodes (``--shards``), DDP with 4 nodes; the median step after a
  warm-up. Every process shares this machine's 2 cores, as the numbers note.

    sudo .venv/bin/python benchmarks/bench_codecs_netsim.py --rate 1gbit 100mbit
    sudo .venv/bin/python benchmarks/bench_codecs_netsim.py --only bf16 --skip-accuracy
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import netsim

HERE = Path(__file__).resolve().parent
SIZES = [784, 2048, 2048, 10]
WORKERS, ROWS, LR, TARGET = 4, 64, 0.1, 0.95
PORT = 50051
MNIST = HERE.parent / "tests" / "data" / "mnist"


@dataclass(frozen=True)
class Variant:
    name: str
    system: str  # "gradfleet" or "ddp"
    compression: str = "none"
    pull: str = "none"
    overlap: bool = False
    hook: str = "none"  # DDP's communication hook

    @property
    def numerics(self) -> tuple[str, ...]:
        """What decides the steps to 95 % (overlap does not change a bit)."""
        return (self.system, self.compression, self.pull, self.hook)


VARIANTS = [
    Variant("gradfleet none", "gradfleet"),
    Variant("gradfleet bf16, bf16 pulls", "gradfleet", "bf16", "bf16"),
    Variant("gradfleet bf16, bf16 pulls, overlap", "gradfleet", "bf16", "bf16", True),
    Variant("gradfleet topk:0.01, bf16 pulls", "gradfleet", "topk:0.01", "bf16"),
    Variant("gradfleet sign, bf16 pulls", "gradfleet", "sign", "bf16"),
    Variant("DDP (gloo)", "ddp"),
]
# DDP's PowerSGD hook (rank 4) fails at 4 ranks over gloo in PyTorch 2.13 (gloo
# EnforceNotMet: "Received data size doesn't match expected size", 4116 vs 1024 bytes);
# `--only PowerSGD` still runs it.
POWERSGD = Variant("DDP, PowerSGD rank 4", "ddp", hook="powersgd")


def job_config(variant: Variant, steps: int, eval_every: int, shards: int) -> object:
    from gradfleet.client import JobConfig
    from gradfleet.client.data import load_mnist

    return JobConfig(
        model={"sizes": SIZES, "seed": 0},
        dataset=load_mnist(MNIST),
        optimizer={"name": "sgd", "lr": LR},
        batch_size=ROWS * WORKERS,
        steps=steps,
        workers=WORKERS,
        eval_every=eval_every,
        servers=shards,
        compression=variant.compression,
        pull_compression=variant.pull,
        overlap=variant.overlap,
    )


# ---- steps to 95 % -----------------------------------------------------------------


class _Reached(Exception):
    pass


def gradfleet_steps_to_target(variant: Variant, limit: int, every: int, shards: int) -> int:
    from gradfleet.client import train

    def stop_at_target(entry: dict[str, float]) -> None:
        if entry.get("val_accuracy", 0.0) >= TARGET:
            raise _Reached(int(entry["step"]))

    try:
        train(job_config(variant, limit, every, shards), backend="local", progress=stop_at_target)
    except _Reached as reached:
        return int(reached.args[0])
    return -1  # not within the limit


_DDP_RANK = """
import json, os, sys, time
import numpy as np, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, {here!r})
import torch_baselines
from gradfleet.client.data import load_mnist
rank, world, mode = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
hook, limit, every, warmup = sys.argv[4], int(sys.argv[5]), int(sys.argv[6]), int(sys.argv[7])
torch.set_num_threads(1)
dist.init_process_group("gloo", rank=rank, world_size=world)
side = dist.new_group(backend="gloo")  # the evaluation's flag, apart from DDP's hooks
torch.manual_seed(0)
sizes = {sizes!r}
layers = []
for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
    layers.append(nn.Linear(a, b))
    if i < len(sizes) - 2:
        layers.append(nn.ReLU())
from gradfleet.nn import MLP
start = MLP(sizes, seed=0, dtype="float32")  # gradfleet's initial weights: same start
with torch.no_grad():
    for name, value in start.unflatten(start.flat).items():
        index, kind = name.split(".")[1:]
        getattr(layers[int(index)], kind).copy_(torch.from_numpy(value.copy()))
model = nn.parallel.DistributedDataParallel(nn.Sequential(*layers))
torch_baselines.register_hook(model, hook)
opt = torch.optim.SGD(model.parameters(), lr={lr})
data = load_mnist({mnist!r})
shard = len(data.x) // world
x = torch.from_numpy(data.x[rank * shard:(rank + 1) * shard])
y = torch.from_numpy(data.y[rank * shard:(rank + 1) * shard])
rng = np.random.default_rng(rank)
loss_fn, order, pos, times = nn.CrossEntropyLoss(), None, shard, []
dist.barrier()
for step in range(limit):
    if pos + {rows} > shard:
        order, pos = torch.from_numpy(rng.permutation(shard)), 0
    idx = order[pos:pos + {rows}]
    pos += {rows}
    opt.zero_grad(set_to_none=True)
    loss_fn(model(x[idx]), y[idx]).backward()
    opt.step()
    times.append(time.perf_counter())
    if mode == "accuracy" and (step + 1) % every == 0:
        flag = torch.zeros(1)
        if rank == 0:
            with torch.no_grad():
                out = model.module(torch.from_numpy(data.x_val)).argmax(1).numpy()
            flag[0] = float((out == data.y_val).mean() >= {target})
        dist.broadcast(flag, 0, group=side)
        if flag[0]:
            print(json.dumps({{"steps": step + 1}}), flush=True)
            break
else:
    if mode == "accuracy":
        print(json.dumps({{"steps": -1}}), flush=True)
if mode == "speed" and rank == 0:
    gaps = np.diff(times[warmup - 1:])
    print(json.dumps({{"seconds": float(np.median(gaps))}}), flush=True)
dist.destroy_process_group()
"""


def ddp_script() -> str:
    return _DDP_RANK.format(
        here=str(HERE), sizes=SIZES, lr=LR, mnist=str(MNIST), rows=ROWS, target=TARGET
    )


def ddp_steps_to_target(variant: Variant, limit: int, every: int) -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = os.environ | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    args = ["accuracy", variant.hook, str(limit), str(every), "1"]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ddp_script(), str(r), str(WORKERS), *args],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for r in range(WORKERS)
    ]
    outputs = [p.communicate(timeout=7200)[0] for p in procs]
    return int(json.loads(outputs[0].strip().splitlines()[-1])["steps"])


# ---- seconds per step on the simulated cluster ---------------------------------------

_SERVER = "import sys; from gradfleet.server import main; sys.exit(main(sys.argv[1:]))"
_CREATE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_codecs_netsim as b
from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.sharded import ShardedClient
v = b.Variant(**json.loads(sys.argv[2]))
addresses, steps = sys.argv[3].split(","), int(sys.argv[4])
job = b.job_config(v, steps, 0, len(addresses))
clients = [ParameterServerClient(a, timeout=600) for a in addresses]
ps = clients[0] if len(clients) == 1 else ShardedClient(clients)
with ps:
    ps.create_job(job_id="bench", **job.server_settings())
"""
_WORKER = """
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import bench_codecs_netsim as b
from gradfleet.worker.actor import GradientWorker, WorkerSpec
from gradfleet.worker.batches import shard_rows
v = b.Variant(**json.loads(sys.argv[2]))
address, worker, steps, warmup = sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
job = b.job_config(v, steps, 0, len(address.split(",")))
data = job.data
start, stop = shard_rows(len(data.x), worker, job.workers)
spec = WorkerSpec.for_job(job, address, "bench", worker, pull_wait=600.0)
timings = GradientWorker(spec).run(data.x[start:stop], data.y[start:stop])
if worker == 0:
    from gradfleet.proto.client import ParameterServerClient
    with ParameterServerClient(address.split(",")[0], timeout=600) as ps:
        history = ps.get_job("bench").history
    times = [record.wall_time for record in history]
    print(json.dumps({"seconds": float(np.median(np.diff(times[warmup - 1:])))}), flush=True)
"""


def gradfleet_seconds_per_step(
    variant: Variant, rate: str, shards: int, steps: int, warmup: int
) -> float:
    described = json.dumps(variant.__dict__)
    with netsim.cluster(shards + WORKERS, rate) as net:
        servers = [
            net.popen(s, [sys.executable, "-c", _SERVER, "--host", net.address(s),
                          "--port", str(PORT), "--max-message-bytes", str(64 << 20), "-q"],
                      stderr=subprocess.DEVNULL)
            for s in range(shards)
        ]  # fmt: skip
        try:
            addresses = ",".join(f"{net.address(s)}:{PORT}" for s in range(shards))
            net.popen(shards, [sys.executable, "-c", _CREATE, str(HERE), described, addresses,
                               str(steps)]).wait(timeout=600)  # fmt: skip
            workers = [
                net.popen(shards + w, [sys.executable, "-c", _WORKER, str(HERE), described,
                                       addresses, str(w), str(steps), str(warmup)],
                          stdout=subprocess.PIPE, text=True)
                for w in range(WORKERS)
            ]  # fmt: skip
            outputs = [w.communicate(timeout=7200)[0] for w in workers]
        finally:
            for server in servers:
                server.terminate()
                server.wait(timeout=60)
    return float(json.loads(outputs[0].strip().splitlines()[-1])["seconds"])


def ddp_seconds_per_step(variant: Variant, rate: str, steps: int, warmup: int) -> float:
    with netsim.cluster(WORKERS, rate) as net:
        env = os.environ | {
            "MASTER_ADDR": net.address(0),
            "MASTER_PORT": str(PORT),
            "GLOO_SOCKET_IFNAME": "eth0",
        }
        args = ["speed", variant.hook, str(steps), "1", str(warmup)]
        procs = [
            net.popen(r, [sys.executable, "-c", ddp_script(), str(r), str(WORKERS), *args],
                      env=env, stdout=subprocess.PIPE, text=True)
            for r in range(WORKERS)
        ]  # fmt: skip
        outputs = [p.communicate(timeout=7200)[0] for p in procs]
    return float(json.loads(outputs[0].strip().splitlines()[-1])["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", nargs="+", default=["1gbit", "100mbit"])
    parser.add_argument("--shards", type=int, default=4, help="gradfleet's server nodes")
    parser.add_argument("--steps", type=int, default=14, help="steps timed per variant")
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--limit", type=int, default=1500, help="most steps to reach 95 %%")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--only", nargs="*", default=[], help="variants whose names hold these")
    parser.add_argument("--skip-accuracy", action="store_true", help="steps to 95 %%: not run")
    args = parser.parse_args()
    every = [*VARIANTS, POWERSGD]
    variants = [v for v in every if any(o in v.name for o in args.only)] if args.only else VARIANTS

    print(f"# bench_codecs_netsim: MLP {SIZES}, {WORKERS} workers x {ROWS} rows, SGD lr {LR}, "
          f"gradfleet on {args.shards} server nodes; {time.strftime('%F %H:%M')}")  # fmt: skip
    to_target: dict[tuple[str, ...], int] = {}
    if not args.skip_accuracy:
        for v in variants:
            if v.numerics not in to_target:
                if v.system == "ddp":
                    to_target[v.numerics] = ddp_steps_to_target(v, args.limit, args.eval_every)
                else:
                    to_target[v.numerics] = gradfleet_steps_to_target(
                        v, args.limit, args.eval_every, args.shards
                    )
                print(f"#   steps to 95 %, {v.name}: {to_target[v.numerics]}", flush=True)
    seconds: dict[tuple[str, str], float] = {}
    for rate in args.rate:
        for v in variants:
            if v.system == "ddp":
                s = ddp_seconds_per_step(v, rate, args.steps, args.warmup)
            else:
                s = gradfleet_seconds_per_step(v, rate, args.shards, args.steps, args.warmup)
            seconds[v.name, rate] = s
            print(f"#   {rate}, {v.name}: {s:.3f} s/step", flush=True)

    header = f"{'variant':38} {'steps to 95%':>12}"
    for rate in args.rate:
        header += f" {rate + ' s/step':>14} {rate + ' s to 95%':>15}"
    print(header)
    print("-" * len(header))
    for v in variants:
        steps = to_target.get(v.numerics)
        line = f"{v.name:38} {steps if steps is not None else '-':>12}"
        for rate in args.rate:
            s = seconds[v.name, rate]
            total = f"{steps * s:.1f}" if steps and steps > 0 else "-"
            line += f" {s:14.3f} {total:>15}"
        print(line)
    ddp = next((v for v in variants if v.name == "DDP (gloo)"), None)
    if ddp is not None and to_target.get(ddp.numerics, -1) > 0:
        for rate in args.rate:
            base = to_target[ddp.numerics] * seconds[ddp.name, rate]
            best = min(
                (to_target[v.numerics] * seconds[v.name, rate], v.name)
                for v in variants
                if v.system == "gradfleet" and to_target.get(v.numerics, -1) > 0
            )
            print(f"{rate}: best gradfleet ({best[1]}) reaches 95 % {base / best[0]:.2f}x "
                  f"sooner than DDP (gloo)")  # fmt: skip


if __name__ == "__main__":
    main()
