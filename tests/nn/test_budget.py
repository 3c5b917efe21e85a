"""A line budget for the NumPy core, as tinygrad keeps one: small and readable stays so."""

from __future__ import annotations

from pathlib import Path

NN = Path(__file__).resolve().parents[2] / "nn" / "gradfleet" / "nn"
BUDGET = 1870  # lines of gradfleet.nn, docstrings and comments included


def test_the_core_stays_within_its_line_budget() -> None:
    lines = sum(len(path.read_text().splitlines()) for path in NN.glob("*.py"))

    assert lines <= BUDGET, f"gradfleet.nn has {lines} lines, over its budget of {BUDGET}"


def test_the_core_imports_nothing_of_ours_and_no_io() -> None:
    forbidden = (
        "gradfleet.server",
        "gradfleet.worker",
        "gradfleet.client",
        "gradfleet.proto",
        "import grpc",
        "import ray",
        "open(",
    )

    offenders = [
        f"{path.name}: {word}"
        for path in NN.glob("*.py")
        for word in forbidden
        if word in path.read_text()
    ]

    assert offenders == []
