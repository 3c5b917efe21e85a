"""Checkpoints: SIGTERM then restart resumes bit for bit; torn files are skipped."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from gradfleet.proto.client import ParameterServerClient
from gradfleet.proto.errors import GradfleetError
from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.server import checkpoint, serve
from gradfleet.server.domain import JobSnapshot, JobState
from gradfleet.server.settings import JobSettings, JobSpec, initial_weights

ADDRESS = re.compile(r"parameter server on (127\.0\.0\.1:\d+)")


def _start_cli(args: list[str]) -> tuple[subprocess.Popen, str]:
    """Run `gradfleet server` in a subprocess; return it and the address from its log line."""
    code = "import sys; from gradfleet.server import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    found: list[str] = []
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            match = ADDRESS.search(line)
            if match and not found:
                found.append(match.group(1))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    ready.wait(timeout=60)
    if not found:
        proc.kill()
        raise AssertionError("server did not start:\n" + "".join(lines))
    return proc, found[0]


def _train(c: ParameterServerClient, job: str, steps: range, kit, ref) -> np.ndarray:
    layout = c.layout(job)
    for step in steps:
        grads = [kit.gradient(layout, w, step) for w in range(2)]
        for w in range(2):
            c.push_gradient(job, w, step, 4, 1.0, grads[w])
        expected = ref.sync_step(grads)
    return expected


def test_sigterm_then_restart_resumes_with_identical_weights(tmp_path: Path, kit) -> None:
    # prepare: a CLI server, a job with momentum (optimiser state must survive), 3 steps
    ckpt = tmp_path / "ckpt"
    proc, address = _start_cli(["--port", "0", "--checkpoint-dir", str(ckpt)])
    try:
        with ParameterServerClient(address) as c:
            job = c.create_job(kit.SPEC64, kit.SGD, num_workers=2, total_steps=10, job_id="j1")
            _, weights0 = c.pull_weights(job)
            ref = kit.Reference(c.layout(job), weights0, kit.SGD)
            _train(c, job, range(3), kit, ref)
            version, before = c.pull_weights(job, 3)
        # execute
        proc.send_signal(signal.SIGTERM)
        exit_code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    with (
        serve(port=0, checkpoint_dir=ckpt) as restarted,
        ParameterServerClient(restarted.address) as c,
    ):
        resumed_version, resumed = c.pull_weights("j1")
        info = c.get_job("j1")
        expected = _train(c, "j1", range(3, 4), kit, ref)
        _, after_step = c.pull_weights("j1", 4)
    # assert
    assert exit_code == 0
    assert (version, resumed_version) == (3, 3)
    assert resumed.tobytes() == before.tobytes()
    assert info.counters.accepted == 6 and len(info.history) == 3
    assert after_step.tobytes() == expected.tobytes()  # momentum state was restored


def test_torn_checkpoint_is_ignored_for_the_last_good_one(tmp_path: Path, kit) -> None:
    # prepare: checkpoint every step, remember the weights at version 2
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        job = c.create_job(
            kit.SPEC64, kit.SGD, num_workers=2, total_steps=10, checkpoint_every=1, job_id="j2"
        )
        _, weights0 = c.pull_weights(job)
        ref = kit.Reference(c.layout(job), weights0, kit.SGD)
        _train(c, job, range(2), kit, ref)
        _, at_two = c.pull_weights(job, 2)
        _train(c, job, range(2, 3), kit, ref)
    newest = sorted((tmp_path / "j2").glob("ckpt-*.npz"))[-1]
    assert newest.name == "ckpt-000000000003.npz"
    # execute: tear the newest checkpoint and add a garbage one with a higher version
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (tmp_path / "j2" / "ckpt-000000000009.json").write_text('{"format": 1, "trunc')
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        version, weights = c.pull_weights("j2")
    # assert
    assert version == 2
    assert weights.tobytes() == at_two.tobytes()


def test_checkpoint_now_and_without_a_directory(tmp_path: Path, client, make_job, kit) -> None:
    # prepare
    job, *_ = make_job(num_workers=1)
    # execute
    with pytest.raises(GradfleetError) as err:
        client.checkpoint(job)
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        other = c.create_job(kit.SPEC64, kit.SGD, total_steps=3)
        result = c.checkpoint(other)
        info = c.get_job(other)
    # assert
    assert err.value.code.name == "FAILED_PRECONDITION"
    assert Path(result.path).is_file() and result.version == 0
    assert info.last_checkpoint_version == 0 and info.state == pb.JOB_STATE_RUNNING


def test_deleted_job_is_not_resumed(tmp_path: Path, kit) -> None:
    # prepare
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        job = c.create_job(kit.SPEC64, kit.SGD, total_steps=3)
        # execute
        c.delete_job(job)
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        jobs = c.list_jobs()
    # assert
    assert jobs == []


def test_push_retries_while_the_server_restarts(tmp_path: Path, kit) -> None:
    # prepare: a job on a server that then goes away; the same port comes back later
    with serve(port=0, checkpoint_dir=tmp_path) as first, ParameterServerClient(first.address) as c:
        job = c.create_job(kit.SPEC64, kit.SGD, num_workers=1, total_steps=3, job_id="r1")
        layout = c.layout(job)
        port = first.port
    result: dict[str, object] = {}
    client = ParameterServerClient(f"127.0.0.1:{port}", patience=60)
    started = threading.Event()

    def push() -> None:
        started.set()
        result["ack"] = client.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))

    pusher = threading.Thread(target=push)
    # execute
    pusher.start()
    started.wait()
    with serve(port=port, checkpoint_dir=tmp_path):
        pusher.join(timeout=120)
        version = client.get_job(job).version
    client.close()
    # assert
    assert result["ack"].outcome == pb.PUSH_OUTCOME_ACCEPTED  # type: ignore[attr-defined]
    assert version == 1


def test_unusable_newer_files_never_cost_a_new_job_its_fresh_checkpoints(
    tmp_path: Path, kit
) -> None:
    # prepare: a directory holding two unusable checkpoints at versions 40 and 50
    (tmp_path / "j3").mkdir()
    for version in (40, 50):
        (tmp_path / "j3" / f"ckpt-{version:012d}.json").write_text("{not json")
        (tmp_path / "j3" / f"ckpt-{version:012d}.npz").write_bytes(b"garbage")
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        # execute: a new job of that id trains 3 steps, checkpointing at every one
        job = c.create_job(
            kit.SPEC64, kit.SGD, num_workers=2, total_steps=10, checkpoint_every=1, job_id="j3"
        )
        _, weights0 = c.pull_weights(job)
        _train(c, job, range(3), kit, kit.Reference(c.layout(job), weights0, kit.SGD))
        written = Path(c.checkpoint(job).path)
        _, at_three = c.pull_weights(job, 3)
    names = sorted(p.name for p in (tmp_path / "j3").glob("ckpt-*.json"))
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        version, weights = c.pull_weights("j3")
    # assert: the newest good checkpoint and the one before it are kept, the unusable
    # files are left alone, and a restart resumes at version 3
    assert written.is_file() and written.name == "ckpt-000000000003.json"
    assert names == [
        "ckpt-000000000002.json",
        "ckpt-000000000003.json",
        "ckpt-000000000040.json",
        "ckpt-000000000050.json",
    ]
    assert version == 3 and weights.tobytes() == at_three.tobytes()


def test_one_failed_final_checkpoint_does_not_cost_the_other_jobs_theirs(
    tmp_path: Path, kit
) -> None:
    # prepare: two jobs one step in; job "a"'s checkpoints cannot be written (a file
    # stands where its directory would go)
    server = serve(port=0, checkpoint_dir=tmp_path)
    with server as running, ParameterServerClient(running.address) as c:
        for job in ("a", "b"):
            c.create_job(kit.SPEC64, kit.SGD, num_workers=1, total_steps=5, job_id=job)
            layout = c.layout(job)
            c.push_gradient(job, 0, 0, 1, 1.0, kit.gradient(layout, 0, 0))
        shutil.rmtree(tmp_path / "a", ignore_errors=True)
        (tmp_path / "a").write_bytes(b"")
        # execute: leaving the block stops the server, which checkpoints every job
    # assert: the stop did not raise, and job "b" was checkpointed at version 1
    assert (tmp_path / "b" / "ckpt-000000000001.json").is_file()
    assert (tmp_path / "a").read_bytes() == b""


def test_a_checkpoint_of_a_deleted_job_never_hides_the_new_job_of_that_id(
    tmp_path: Path, kit
) -> None:
    # prepare: job "j4" checkpointed at version 50 in state DELETED (a server wrote it
    # while the job was being deleted); a new "j4" then trains to version 3
    layout, weights = initial_weights(kit.SPEC64)
    settings = JobSettings.validate(JobSpec(json.dumps(kit.SPEC64), json.dumps(kit.SGD),
                                            num_workers=2, total_steps=99))  # fmt: skip
    deleted = dataclasses.replace(
        JobSnapshot.new("j4", settings.spec, layout, weights), version=50, state=JobState.DELETED
    )
    checkpoint.write_checkpoint(tmp_path, deleted)
    with (
        serve(port=0, checkpoint_dir=tmp_path) as server,
        ParameterServerClient(server.address) as c,
    ):
        assert c.list_jobs() == []  # not resumed
        job = c.create_job(
            kit.SPEC64, kit.SGD, num_workers=2, total_steps=10, checkpoint_every=1, job_id="j4"
        )
        _, weights0 = c.pull_weights(job)
        _train(c, job, range(3), kit, kit.Reference(c.layout(job), weights0, kit.SGD))
        _, at_three = c.pull_weights(job, 3)
    # execute: restart twice
    for _ in range(2):
        with (
            serve(port=0, checkpoint_dir=tmp_path) as server,
            ParameterServerClient(server.address) as c,
        ):
            version, weights = c.pull_weights("j4")
    # assert: the new job resumes at version 3 each time
    assert version == 3 and weights.tobytes() == at_three.tobytes()
