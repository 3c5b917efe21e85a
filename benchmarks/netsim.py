"""A simulated cluster network on this machine, for benchmarks: nodes joined by a switch.

Each node is a network namespace with one interface on a bridge (itself in a namespace
of its own, the switch), its link shaped to ``rate`` in both directions with tc's token
bucket filter (``tbf``; the ``netem`` qdisc is not available here). Nodes get addresses
198.18.0.1, 198.18.0.2, ... from the benchmarking range 198.18.0.0/15, and nothing is
configured outside the namespaces this creates; they are all removed on exit. Needs
root (``ip`` and ``tc`` from iproute2).

    with netsim.cluster(nodes=6, rate="1gbit") as net:
        proc = net.popen(0, [sys.executable, "-c", "..."])   # runs inside node 0
        net.address(0)                                          # "198.18.0.1"

    python benchmarks/netsim.py --nodes 3 --rate 100mbit      # a quick self-check
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

SUBNET = "198.18.0.{}/24"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _in(namespace: str, *command: str) -> None:
    subprocess.run(["ip", "netns", "exec", namespace, *command], check=True, capture_output=True)


@dataclass
class Network:
    """The running namespaces: node i is ``namespaces[i]`` at ``address(i)``."""

    namespaces: list[str]
    switch: str
    rate: str

    def address(self, node: int) -> str:
        return SUBNET.format(node + 1).split("/")[0]

    def popen(self, node: int, command: Sequence[str], **options: Any) -> subprocess.Popen:
        """Start `command` inside node `node` (its only route is the simulated link)."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespaces[node], *command], **options)


def _shape(namespace: str, device: str, rate: str) -> None:
    # burst: enough for a few full-size segments at this rate; latency bounds the queue
    _in(namespace, "tc", "qdisc", "add", "dev", device, "root", "tbf", "rate", rate,
        "burst", "512kb", "latency", "20ms")  # fmt: skip


@contextlib.contextmanager
def cluster(nodes: int, rate: str = "1gbit") -> Iterator[Network]:
    """`nodes` namespaces on one switch, every link shaped to `rate` each way."""
    if os.geteuid() != 0:
        raise PermissionError("netsim needs root to create network namespaces")
    tag = uuid.uuid4().hex[:6]
    switch = f"gfsw{tag}"
    names = [f"gfn{tag}{i}" for i in range(nodes)]
    created: list[str] = []
    try:
        _ip("netns", "add", switch)
        created.append(switch)
        _in(switch, "ip", "link", "add", "br0", "type", "bridge")
        _in(switch, "ip", "link", "set", "br0", "up")
        for i, name in enumerate(names):
            _ip("netns", "add", name)
            created.append(name)
            outside = f"s{tag}{i}"  # the switch's port of node i
            _ip("link", "add", f"n{tag}{i}", "netns", name, "type", "veth", "peer", "name", outside,
                "netns", switch)  # fmt: skip
            _in(name, "ip", "link", "set", f"n{tag}{i}", "name", "eth0")
            _in(name, "ip", "addr", "add", SUBNET.format(i + 1), "dev", "eth0")
            _in(name, "ip", "link", "set", "eth0", "up")
            _in(name, "ip", "link", "set", "lo", "up")
            _in(switch, "ip", "link", "set", outside, "master", "br0")
            _in(switch, "ip", "link", "set", outside, "up")
            _shape(name, "eth0", rate)  # what node i sends
            _shape(switch, outside, rate)  # what node i receives
        yield Network(names, switch, rate)
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


def _measure(net: Network, seconds: float = 3.0) -> float:
    """Mbit/s node 1 sends to node 0 over TCP (a self-check of the shaping)."""
    sink = net.popen(0, [sys.executable, "-c", _SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        sink.stdout.readline()  # listening
        source = net.popen(1, [sys.executable, "-c", _SOURCE, net.address(0), str(seconds)])
        source.wait(timeout=seconds + 30)
        return float(sink.stdout.readline())
    finally:
        sink.kill()
        sink.wait()


_SINK = """
import socket, time
s = socket.create_server(("0.0.0.0", 5201)); print("ready", flush=True)
c, _ = s.accept(); n = 0; start = None
while chunk := c.recv(1 << 20):
    start = start or time.perf_counter(); n += len(chunk)
print(n * 8 / (time.perf_counter() - start) / 1e6, flush=True)
"""
_SOURCE = """
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5201)); end = time.perf_counter() + float(sys.argv[2])
block = bytes(1 << 20)
while time.perf_counter() < end: c.sendall(block)
c.close()
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rate", default="1gbit")
    args = parser.parse_args()
    started = time.perf_counter()
    with cluster(args.nodes, args.rate) as net:
        print(f"{args.nodes} nodes up in {time.perf_counter() - started:.1f}s: "
              f"{[net.address(i) for i in range(args.nodes)]}")  # fmt: skip
        print(f"node 1 -> node 0 over a {args.rate} link: {_measure(net):.0f} Mbit/s")


if __name__ == "__main__":
    main()
