"""Client keepalive against the server's ping policy: silent long waits stay up.

Clients ping a silent server every KEEPALIVE_MS during a call, so that a vanished host
becomes UNAVAILABLE (tests/chaos/test_server_faults.py). grpcio's default server policy
expects at most one ping per 5 minutes while it sends nothing and answers the third
early one with GOAWAY "too_many_pings", which would end long-polls and idle watches.
"""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from gradfleet.proto.wire import KEEPALIVE_MS, client_options, server_options
from gradfleet.server import serve

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# A short keepalive keeps the test quick; the policy scales with it
KEEPALIVE = 1000
# A client pinging a little slower than the server must allow
EDGE_MS = KEEPALIVE // 2 + 100


@pytest.mark.parametrize("keepalive", [KEEPALIVE_MS, KEEPALIVE])
def test_the_server_allows_the_pings_its_clients_send(keepalive: int) -> None:
    client = dict(client_options(keepalive_ms=keepalive))
    server = dict(server_options(keepalive_ms=keepalive))

    assert client["grpc.keepalive_time_ms"] == keepalive
    assert server["grpc.http2.min_ping_interval_without_data_ms"] < keepalive


def test_a_pull_and_a_watch_silent_for_several_pings_get_their_step(kit) -> None:
    # prepare: a pull and a watch wait on one connection that pings at the edge of what
    # the server allows, while nothing happens
    options = dict(client_options(keepalive_ms=KEEPALIVE)) | {"grpc.keepalive_time_ms": EDGE_MS}
    with (
        serve(port=0, keepalive_ms=KEEPALIVE) as server,
        grpc.insecure_channel(server.address, options=list(options.items())) as channel,
        ParameterServerClient(server.address) as pusher,
    ):
        job = pusher.create_job(kit.SPEC64, kit.SGD, total_steps=2)
        layout = pusher.layout(job)
        stub = pb_grpc.ParameterServiceStub(channel)
        pulled: list[int] = []
        watched: list[int] = []
        failed: list[grpc.StatusCode] = []

        def pull() -> None:
            request = pb.PullWeightsRequest(job_id=job, min_version=1)
            try:
                for chunk in stub.PullWeights(request, timeout=120):
                    if chunk.HasField("header"):
                        pulled.append(chunk.header.version)
            except grpc.RpcError as exc:
                failed.append(exc.code())

        def watch() -> None:
            try:
                for event in stub.WatchJob(pb.WatchJobRequest(job_id=job), timeout=120):
                    watched.append(event.version)
                    if event.version >= 1:
                        return
            except grpc.RpcError as exc:
                failed.append(exc.code())

        threads = [threading.Thread(target=pull), threading.Thread(target=watch)]
        for thread in threads:
            thread.start()
        # execute: six ping intervals of silence (the default policy cuts at the fifth)
        time.sleep(6 * EDGE_MS / 1000)
        pusher.push_gradient(job, 0, 0, 1, 0.5, np.zeros(layout.total_elements, layout.dtype))
        for thread in threads:
            thread.join(60)
    # assert
    assert failed == []
    assert pulled == [1]
    assert watched and watched[-1] == 1
