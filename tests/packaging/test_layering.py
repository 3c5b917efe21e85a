"""One import direction (docs/architecture.md): nn <- proto <- server; nn <- proto <- worker
<- client. Checked on the source, so a wrong import fails here before it tangles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PARTS = ("nn", "proto", "server", "worker", "client")
ALLOWED = {
    "nn": {"nn"},
    "proto": {"proto"},
    "server": {"nn", "proto", "server"},
    "worker": {"nn", "proto", "worker"},
    "client": {"nn", "proto", "server", "worker", "client"},
}
NO_RAY = ("nn", "proto", "server")


def _imports(path: Path) -> set[str]:
    """Top-level module names and gradfleet parts that `path` imports."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            found.add(
                f"gradfleet.{parts[1]}" if parts[0] == "gradfleet" and len(parts) > 1 else parts[0]
            )
    return found


@pytest.mark.parametrize("part", PARTS)
def test_each_part_imports_only_what_lies_below_it(part: str) -> None:
    wrong = []
    for path in sorted((ROOT / part / "gradfleet" / part).rglob("*.py")):
        for name in _imports(path):
            imported = name.removeprefix("gradfleet.")
            if name.startswith("gradfleet.") and imported not in ALLOWED[part]:
                wrong.append(f"{path.relative_to(ROOT)} imports gradfleet.{imported}")
            if part in NO_RAY and name == "ray":
                wrong.append(f"{path.relative_to(ROOT)} imports ray")

    assert wrong == []


def test_ml_dtypes_is_imported_only_by_a_bf16_codec() -> None:
    """Its import costs every worker and server process about half a second of CPU."""
    script = (
        "import sys, numpy as np\n"
        "import gradfleet.server, gradfleet.worker.actor, gradfleet.client\n"
        "from gradfleet.proto.codecs import Codec\n"
        "grad = np.ones(8, np.float32)\n"
        "Codec.parse('fp16').encode(grad)\n"
        "print('ml_dtypes' in sys.modules)\n"
        "payload = Codec.parse('bf16').encode(grad)\n"
        "print('ml_dtypes' in sys.modules)\n"
        "print(Codec.parse('bf16').decode(payload, 8, np.dtype(np.float32)).tolist())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout.split("\n")
    assert out[:3] == ["False", "True", str([1.0] * 8)]
