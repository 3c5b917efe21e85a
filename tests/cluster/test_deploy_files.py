"""deploy/ cannot silently rot: every file parses, names the Dockerfile's image, and every
``gradfleet`` command in it is one the CLI accepts.

Commands are collected from the Dockerfile (ENTRYPOINT + CMD), the YAML manifests (every
string, and container ``args`` behind the image's ENTRYPOINT), and the code blocks of
deploy/README.md (shell lines, ``docker run <image> ...``, and Python string literals).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from gradfleet.client import cli
from gradfleet.server import cli as server_cli
from gradfleet.server import serve
from gradfleet.worker.config import JobConfig

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
MANIFESTS = sorted(DEPLOY.rglob("*.yaml"))
SHELL_SEPARATORS = re.compile(r"&&|\|\||;|\|")


@dataclass
class Dockerfile:
    """The instructions of deploy/Dockerfile that the other files must agree with."""

    base: str
    image: str
    user: str
    entrypoint: list[str]
    cmd: list[str]
    healthcheck: list[str]
    ray_version: str
    runs: list[str]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined, comments dropped."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += " " + stripped.removesuffix("\\").strip()
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def read_dockerfile() -> Dockerfile:
    found: dict[str, list[str]] = {}
    for keyword, rest in dockerfile_instructions(DEPLOY / "Dockerfile"):
        found.setdefault(keyword, []).append(rest)
    labels = dict(token.split("=", 1) for label in found["LABEL"] for token in shlex.split(label))
    args = dict(arg.split("=", 1) for arg in found.get("ARG", []) if "=" in arg)
    health = found["HEALTHCHECK"][-1]
    return Dockerfile(
        base=found["FROM"][0],
        image=labels["org.opencontainers.image.ref.name"],
        user=found["USER"][-1],
        entrypoint=json.loads(found["ENTRYPOINT"][-1]),
        cmd=json.loads(found["CMD"][-1]),
        healthcheck=json.loads(health[health.index("CMD") + len("CMD") :]),
        ray_version=args["RAY_VERSION"],
        runs=found["RUN"],
    )


def yaml_documents(path: Path) -> list[Any]:
    return [document for document in yaml.safe_load_all(path.read_text()) if document]


def walk(node: Any) -> Iterator[tuple[str | None, Any]]:
    """Every (key, value) pair of a YAML tree; list items come with key None."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield None, item
            yield from walk(item)


def containers(document: Any) -> list[dict[str, Any]]:
    found = []
    for key, value in walk(document):
        if key == "containers":
            found += value
    return found


def commands_in_shell(text: str, image: str) -> list[list[str]]:
    """The argument lists given to ``gradfleet`` (or to the image) in shell text."""
    commands = []
    for line in text.replace("\\\n", " ").splitlines():
        for piece in SHELL_SEPARATORS.split(line):
            try:
                argv = shlex.split(piece, comments=True)
            except ValueError:  # not shell (e.g. a stray quote in prose)
                continue
            for index, token in enumerate(argv[:-1]):  # a bare word is a name, not a call
                if token.rsplit("/", 1)[-1] == "gradfleet" or (
                    token == image and argv[:2] == ["docker", "run"]
                ):
                    commands.append(argv[index + 1 :])
                    break
    return commands


def commands_in_python(text: str) -> list[list[str]]:
    literals = re.findall(r"[\"'](gradfleet\s[^\"']*)[\"']", text)
    return [shlex.split(literal)[1:] for literal in literals]


def readme_code_blocks() -> list[tuple[str, str]]:
    """(language, body) of every fenced code block in deploy/README.md."""
    text = (DEPLOY / "README.md").read_text()
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def all_gradfleet_commands(docker: Dockerfile) -> list[tuple[str, list[str]]]:
    """(source file, arguments after ``gradfleet``) for every command in deploy/."""
    found = [("Dockerfile", docker.cmd)]
    for path in MANIFESTS:
        for document in yaml_documents(path):
            for container in containers(document):
                if container.get("image") == docker.image and "args" in container:
                    found.append((path.name, [str(arg) for arg in container["args"]]))
            for _, value in walk(document):
                if isinstance(value, str):
                    found += [(path.name, argv) for argv in commands_in_shell(value, docker.image)]
    for language, body in readme_code_blocks():
        argvs = (
            commands_in_python(body)
            if language == "python"
            else commands_in_shell(body, docker.image)
        )
        found += [("README.md", argv) for argv in argvs]
    return found


def check_gradfleet_argv(argv: list[str]) -> None:
    """Parse ``gradfleet <argv>`` as the CLI would; raise ValueError if it is rejected."""
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
            if argv[:1] == ["server"]:
                server_cli.build_parser().parse_args(argv[1:])
            else:
                cli.build_parser().parse_args(argv)
    except SystemExit as exc:
        if exc.code:
            raise ValueError(errors.getvalue().strip().splitlines()[-1]) from None


def test_dockerfile_builds_a_non_root_gradfleet_image() -> None:
    docker = read_dockerfile()

    assert docker.base.split(":")[0] in {"python", "rayproject/ray"}
    assert docker.user not in {"root", "0"}
    assert docker.entrypoint == ["gradfleet"]
    assert docker.cmd[0] == "server"
    assert any('".[all]"' in run for run in docker.runs)
    assert docker.image.endswith(":" + project_version())


def project_version() -> str:
    with open(REPO / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f)["project"]["version"])


def test_healthcheck_command_reports_a_real_server_healthy() -> None:
    docker = read_dockerfile()
    command = [sys.executable if docker.healthcheck[0] == "python" else docker.healthcheck[0]]
    command += docker.healthcheck[1:]

    with serve(host="127.0.0.1", port=0) as server:
        env = os.environ | {"GRADFLEET_HEALTH_ADDRESS": server.address}
        healthy = subprocess.run(command, env=env, capture_output=True, timeout=60)
    stopped = subprocess.run(command, env=env, capture_output=True, timeout=60)

    assert healthy.returncode == 0, healthy.stderr.decode()
    assert stopped.returncode != 0


def test_manifests_parse_and_use_the_dockerfile_image() -> None:
    docker = read_dockerfile()
    expected = {
        "ray-cluster.yaml",
        "raycluster.yaml",
        "rayjob.yaml",
        "server.yaml",
    }

    images = {
        path.name: {
            value
            for document in yaml_documents(path)
            for key, value in walk(document)
            if key == "image"
        }
        for path in MANIFESTS
    }

    assert set(images) == expected
    assert all(found == {docker.image} for found in images.values()), images


def test_kubernetes_containers_keep_the_image_entrypoint() -> None:
    docker = read_dockerfile()
    server = [c for d in yaml_documents(DEPLOY / "k8s" / "server.yaml") for c in containers(d)]
    cluster = yaml_documents(DEPLOY / "kuberay" / "raycluster.yaml")[0]
    job = yaml_documents(DEPLOY / "kuberay" / "rayjob.yaml")[0]

    assert [c.get("command") for c in server] == [None]
    assert server[0]["args"][0] == "server"
    assert cluster["spec"]["rayVersion"] == docker.ray_version
    assert shlex.split(job["spec"]["entrypoint"])[0] == docker.entrypoint[0]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster["metadata"]["name"]


def test_every_gradfleet_command_in_deploy_is_accepted_by_the_cli() -> None:
    docker = read_dockerfile()

    commands = all_gradfleet_commands(docker)
    rejected = []
    for source, argv in commands:
        try:
            check_gradfleet_argv(argv)
        except ValueError as exc:
            rejected.append(f"{source}: gradfleet {shlex.join(argv)}: {exc}")

    assert rejected == []
    sources = {source for source, _ in commands}
    assert {"Dockerfile", "server.yaml", "rayjob.yaml", "README.md"} <= sources
    assert any(argv[:1] == ["train"] and "--backend" in argv for _, argv in commands)


def test_command_check_rejects_unknown_arguments() -> None:
    with pytest.raises(ValueError, match="unrecognized arguments"):
        check_gradfleet_argv(["train", "job.toml", "--no-such-flag"])
    with pytest.raises(ValueError, match="unrecognized arguments"):
        check_gradfleet_argv(["server", "--bind", "0.0.0.0"])


def test_example_job_config_is_valid() -> None:
    job = JobConfig.from_toml(DEPLOY / "job.toml")

    assert job.workers >= 2
    assert job.checkpoint_every > 0
