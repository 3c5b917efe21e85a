"""Declared sizes are checked before memory is spent on them."""

from __future__ import annotations

import json
import tracemalloc

import grpc
import pytest

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import serve

pytestmark = pytest.mark.integration


def test_oversized_model_spec_is_refused_before_allocating() -> None:
    # 2048 x 4096 float64: 67 MB, over a 1 MiB max_job_bytes
    spec = {"type": "MLP", "sizes": [2048, 4096], "dtype": "float64", "seed": 0}
    request = pb.CreateJobRequest(
        job_id="huge",
        spec=pb.JobSpec(
            model_spec_json=json.dumps(spec),
            optimizer_json='{"name": "sgd", "lr": 0.1}',
            num_workers=1,
            total_steps=1,
        ),
    )
    with (
        serve(port=0, max_job_bytes=1 << 20) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        create = channel.unary_unary(
            "/gradfleet.v1.ParameterService/CreateJob",
            request_serializer=pb.CreateJobRequest.SerializeToString,
            response_deserializer=pb.CreateJobResponse.FromString,
        )
        tracemalloc.start()
        try:
            with pytest.raises(grpc.RpcError) as err:
                create(request, timeout=60)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()

    print(f"peak traced memory during the refused CreateJob: {peak / 2**20:.1f} MiB")
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert peak < 16 << 20
