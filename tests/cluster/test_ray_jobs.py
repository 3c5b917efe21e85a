"""The real CLI path: ``ray start --head``, then ``gradfleet train`` submitted as a Ray job.

The head is started with ``ray start --head --block`` on free loopback ports and its own
temp dir, and stopped by sending SIGTERM to that one process (Ray then stops the
processes of that node). ``ray stop`` is not used: it kills every Ray process on the
machine by name, including other people's clusters. Ray's token auth is on
(``RAY_AUTH_MODE=token`` with a token of the test's own), as deploy/README.md asks.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

pytestmark = [pytest.mark.ray, pytest.mark.integration, pytest.mark.slow]

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FINISHED = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RayHead:
    """Where the Jobs API listens and the token it wants."""

    url: str
    token: str

    def jobs_client(self) -> JobSubmissionClient:
        return JobSubmissionClient(self.url, headers={"Authorization": f"Bearer {self.token}"})


def wait_for_jobs_api(head: RayHead, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"ray start exited with status {process.returncode}")
        try:
            head.jobs_client().list_jobs()
            return
        except Exception as exc:  # the dashboard is still starting
            logger.debug("Jobs API not ready: %s", exc)
            time.sleep(1)
    raise TimeoutError(f"the Ray Jobs API at {head.url} did not come up")


@pytest.fixture(scope="module")
def ray_head() -> Iterator[RayHead]:
    """A one-node Ray cluster started by ``ray start --head``; yields the Jobs API URL."""
    temp_dir = tempfile.mkdtemp(prefix="gfray-")  # short: Ray puts sockets in it
    dashboard_port = free_port()
    command = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={free_port()}",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--ray-client-server-port={free_port()}",
        "--num-cpus=2",
        f"--temp-dir={temp_dir}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # the job runs `gradfleet`
    head = RayHead(f"http://127.0.0.1:{dashboard_port}", secrets.token_hex(32))
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token}
    log = open(Path(temp_dir) / "ray-start.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_jobs_api(head, process, timeout=120)
        yield head
    except Exception:
        logger.error("ray start output:\n%s", (Path(temp_dir) / "ray-start.log").read_text())
        raise
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_gradfleet_train_submitted_as_a_ray_job_succeeds(ray_head: RayHead, tmp_path: Path) -> None:
    working_dir = tmp_path / "job"
    working_dir.mkdir()
    shutil.copy(REPO / "deploy" / "job.toml", working_dir / "job.toml")
    client = ray_head.jobs_client()

    job_id = client.submit_job(
        entrypoint=(
            "gradfleet train job.toml --backend ray --steps 60 --no-progress "
            f"--out {tmp_path / 'run'}"
        ),
        runtime_env={"working_dir": str(working_dir)},
    )
    deadline = time.monotonic() + 240
    while client.get_job_status(job_id) not in FINISHED and time.monotonic() < deadline:
        time.sleep(1)
    status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)

    assert status == JobStatus.SUCCEEDED, logs
    accuracy = re.search(
        r"trained digits-cluster .*for 60 steps on ray .*held-out accuracy ([\d.]+)%", logs
    )
    assert accuracy is not None, logs
    assert float(accuracy.group(1)) > 50.0
    assert (tmp_path / "run").is_dir()
