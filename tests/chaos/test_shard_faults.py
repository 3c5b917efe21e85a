"""A job over two `gradfleet server` processes, one of them SIGKILLed and restarted on its
port: the shards agree on a version again and the job ends with the undisturbed weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from gradfleet import nn
from gradfleet.client import JobConfig, train
from gradfleet.client.data import load_dataset
from gradfleet.proto.client import ParameterServerClient

pytestmark = [pytest.mark.integration, pytest.mark.ray, pytest.mark.slow]


def test_a_sigkilled_shard_restarted_on_its_port_costs_nothing(tmp_path: Path, chaos: Any) -> None:
    # prepare: two CLI servers with their own checkpoint directories
    job = JobConfig(
        model=nn.MLP([64, 64, 10], seed=3, dtype="float64"),
        dataset=load_dataset("digits"),
        optimizer={"name": "sgd", "lr": 0.05, "momentum": 0.9},
        batch_size=24,
        steps=400,  # outlasts several of the trainer's polls: the kill lands mid-run
        workers=2,
        seed=11,
        checkpoint_every=5,
    )
    shards = [
        chaos.server_process("--checkpoint-dir", str(tmp_path / f"shard-{s}")).start()
        for s in range(2)
    ]
    killed: list[int] = []

    def kill_and_restart_shard_1(entry: dict[str, float]) -> None:
        if not killed and entry["step"] >= 20:
            killed.append(int(entry["step"]))
            shards[1].kill()
            shards[1].start()

    # execute
    disturbed = train(
        job,
        backend="ray",
        server=",".join(shard.address for shard in shards),
        progress=kill_and_restart_shard_1,
    )
    undisturbed = train(job, backend="local")
    infos = []
    for shard in shards:
        with ParameterServerClient(shard.address) as client:
            infos.append(client.get_job(disturbed.job_id, history=False))

    # assert
    assert killed and killed[0] < job.total_steps
    assert "resumed job" in shards[1].log()
    assert disturbed.final_metrics["steps"] == job.total_steps
    assert disturbed.model.flat.tobytes() == undisturbed.model.flat.tobytes()
    for info in infos:
        assert info.version == job.total_steps
        assert chaos.reconciles(info.counters)
        assert tuple(info.spec.shard.bounds) == tuple(infos[0].spec.shard.bounds)
