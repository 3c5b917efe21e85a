"""What a Ray run prints: gradfleet's own lines, none of Ray's, nothing at all with -qq."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.ray]
GRADFLEET = str(Path(sys.executable).with_name("gradfleet"))
JOB = (
    'name = "quiet"\ndataset = "iris"\nbatch_size = 16\nsteps = 60\nworkers = 2\n'
    "[model]\nsizes = [4, 8, 3]\n"
)


def train(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess:
    config = tmp_path / "job.toml"
    config.write_text(JOB)
    command = [GRADFLEET, *flags, "train", str(config), "--backend", "ray", "--no-progress"]
    command += ["--out", str(tmp_path / "run")]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)


def test_a_ray_run_shows_no_ray_warnings(tmp_path: Path) -> None:
    done = train(tmp_path)

    assert done.returncode == 0, done.stderr
    noise = ("Token authentication", "core_worker", "(raylet)", "constructor arguments")
    assert [line for line in done.stderr.splitlines() if any(n in line for n in noise)] == []
    assert all(line.startswith(("INFO ", "WARNING ")) for line in done.stderr.splitlines())


def test_twice_quiet_is_silent_but_for_the_result(tmp_path: Path) -> None:
    done = train(tmp_path, "-qq")

    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.startswith("trained quiet")
