"""A Ray cluster of several nodes on this machine: one head and two worker nodes.

Each node is its own raylet (``ray.cluster_utils.Cluster``). Worker nodes offer the
custom resource ``WORKER_RESOURCE`` that the tests' workers ask for, so no worker lands
on the head; the head offers no CPUs, as on a production cluster.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import ray
from ray.cluster_utils import Cluster

from gradfleet.worker.ray_runner import WorkerOptions

WORKER_RESOURCE = "gradfleet_worker"
SLOTS_PER_NODE = 2  # a surviving node can take over the workers of a lost one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class LocalCluster:
    """The running ``Cluster`` plus the helpers the tests need around it."""

    cluster: Cluster

    @property
    def head_id(self) -> str:
        assert self.cluster.head_node is not None
        return str(self.cluster.head_node.node_id)

    def worker_nodes(self) -> list[Any]:
        return sorted(self.cluster.worker_nodes, key=lambda node: node.node_id)

    def node_by_id(self, node_id: str) -> Any:
        return next(node for node in self.worker_nodes() if node.node_id == node_id)

    def worker_options(self) -> WorkerOptions:
        """One CPU and one worker slot per worker: workers stay off the head."""
        return WorkerOptions(num_cpus=1, resources={WORKER_RESOURCE: 1})

    def ensure_worker_nodes(self, count: int = 2) -> None:
        """Add worker nodes until ``count`` are alive (a test may have removed some)."""
        while len(self.cluster.worker_nodes) < count:
            self.cluster.add_node(
                num_cpus=SLOTS_PER_NODE, resources={WORKER_RESOURCE: SLOTS_PER_NODE}
            )
        self.cluster.wait_for_nodes()


@pytest.fixture(scope="module")
def local_cluster() -> Iterator[LocalCluster]:
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 0,
            # The dashboard serves Ray's state API, which the tests use to find actors.
            "include_dashboard": True,
            "dashboard_host": "127.0.0.1",
            "dashboard_port": free_port(),
            "dashboard_agent_listen_port": free_port(),
        },
    )
    try:
        running = LocalCluster(cluster)
        running.ensure_worker_nodes(2)
        ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
        yield running
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture
def two_worker_nodes(local_cluster: LocalCluster) -> LocalCluster:
    local_cluster.ensure_worker_nodes(2)
    return local_cluster
