"""One distribution, one `gradfleet` namespace: the wheel, an install from it, editable mode."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import uuid
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("nn", "server", "worker", "client", "proto")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    return next(out.glob("gradfleet-*.whl"))


def test_wheel_holds_only_the_gradfleet_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()

    top_level = {name.split("/")[0] for name in names}
    packages = {name.split("/")[1] for name in names if name.startswith("gradfleet/")}

    assert top_level == {"gradfleet", wheel.name.split("-")[0] + "-0.1.0.dist-info"}
    assert packages == set(PARTS)
    assert "gradfleet/__init__.py" not in names  # PEP 420 namespace
    assert "gradfleet/proto/v1/parameter_server_pb2.py" in names
    assert "gradfleet/proto/v1/parameter_server.proto" in names
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("entry_points.txt")))
        .decode()
    )
    assert "gradfleet = gradfleet.client.cli:main" in entry_points


def test_a_fresh_environment_imports_every_part_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    env = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    python = env / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", site, str(wheel)],
        check=True,
    )
    # Dependencies (numpy, grpc, ...) come from this environment's site-packages, linked
    # one by one into a folder without anything of gradfleet's: not its editable-install
    # hooks, nor a `gradfleet/` folder an earlier non-editable install may have left.
    deps = tmp_path / "dependencies"
    deps.mkdir()
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        ours = entry.name.startswith(("gradfleet", "_gradfleet", "__editable__"))
        if not ours and entry.suffix != ".pth":
            (deps / entry.name).symlink_to(entry)
    Path(site, "dependencies.pth").write_text(f"{deps}\n")

    probe = subprocess.run(
        [
            str(python),
            "-c",
            "import gradfleet.nn, gradfleet.server, gradfleet.worker.config, gradfleet.client;"
            "print(gradfleet.nn.__file__); print(list(gradfleet.__path__))",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()

    assert probe[0].startswith(site)
    assert probe[1] == str([str(Path(site) / "gradfleet")])


def test_editable_install_sees_new_files_in_every_source_root() -> None:
    names = {part: f"_probe_{uuid.uuid4().hex}" for part in PARTS if part != "proto"}
    created = []
    try:
        for part, module in names.items():
            path = REPO / part / "gradfleet" / part / f"{module}.py"
            path.write_text(f"PART = {part!r}\n")
            created.append(path)
        code = ";".join(
            f"import gradfleet.{part}.{module} as m; assert m.PART == {part!r}"
            for part, module in names.items()
        )

        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    finally:
        for path in created:
            path.unlink()

    assert result.returncode == 0, result.stderr
