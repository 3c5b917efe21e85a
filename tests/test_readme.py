"""README.md stays true: two set-up commands, CI runs the second, the tour's examples work."""

from __future__ import annotations

import contextlib
import io
import re
import subprocess
from pathlib import Path

from gradfleet.worker.config import JobConfig

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_quick_start_has_exactly_two_commands() -> None:
    quick_start = README.split("## Quick start", 1)[1]
    first = re.search(r"```sh\n(.*?)```", quick_start, flags=re.S)

    assert first is not None
    commands = first.group(1).strip().splitlines()
    assert len(commands) == 2
    assert "gradfleet train" in commands[0]
    assert "pytest" in commands[1]


def test_ci_runs_the_readme_test_command_verbatim() -> None:
    extract = subprocess.run(
        ["bash", "-c", "grep -o 'awk .*README.md' .ci/run | head -1 | bash"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    script = (REPO / ".ci" / "run").read_text()

    assert extract[1] == blocks("sh")[0].strip().splitlines()[1]
    assert 'bash -c "$test_command"' in script
    assert script.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in script


def test_the_lecture_example_in_the_tour_runs() -> None:
    out = io.StringIO()

    with contextlib.redirect_stdout(out):
        exec(blocks("python")[0], {})

    table = out.getvalue()
    assert re.search(r"^y\s+z1 \+ z4\s+16\s+1$", table, flags=re.M)
    assert re.search(r"^x1\s+input\s+1\s+-4$", table, flags=re.M)


def test_the_job_file_in_the_tour_is_a_valid_job(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    path.write_text(blocks("toml")[0])

    job = JobConfig.from_toml(path)

    assert job.workers == 2
    assert job.rows_per_worker == 32
