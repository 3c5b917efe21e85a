"""Checkpoint files that are truncated, bit-flipped, tampered with or carry a pickle.

Each is refused with a `CheckpointError` naming the file and the problem, before the
`.npz` is opened when a checksum or length disagrees, and never unpickled; a restarted
server then falls back to the previous good checkpoint.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradfleet.proto.client import ParameterServerClient
from gradfleet.server import checkpoint, serve

pytestmark = pytest.mark.integration

SPEC = {"type": "MLP", "sizes": [6, 8, 3], "activation": "relu", "dtype": "float64", "seed": 0}
SGD = {"name": "sgd", "lr": 0.1, "momentum": 0.9}


@pytest.fixture(scope="module")
def good_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A checkpoint directory holding job "ck" at versions 1 and 2 (momentum state too)."""
    root = tmp_path_factory.mktemp("ckpt")
    with serve(port=0, checkpoint_dir=root) as server, ParameterServerClient(server.address) as ps:
        job_id = ps.create_job(SPEC, SGD, num_workers=1, total_steps=10, job_id="ck")
        _, weights = ps.pull_weights(job_id, 0)
        for step in range(2):
            ps.push_gradient(job_id, 0, step, 1, 0.5, np.full_like(weights, 0.01 * (step + 1)))
            ps.checkpoint(job_id)
    yield root / "ck"


def newest(job_dir: Path) -> tuple[Path, Path]:
    meta = sorted(job_dir.glob("ckpt-*.json"))[-1]
    return meta, meta.with_suffix(".npz")


def examples() -> settings:
    import os

    return settings(
        max_examples=int(os.environ.get("GRADFLEET_FUZZ_EXAMPLES", "300")),
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )


def damaged_copy(job_dir: Path, which: str, damage: object) -> Path:
    """A copy of the job directory whose newest .json or .npz went through `damage`."""
    out = Path(tempfile.mkdtemp(prefix="ck-")) / "ck"
    shutil.copytree(job_dir, out)
    meta, npz = newest(out)
    target = meta if which == "json" else npz
    target.write_bytes(damage(target.read_bytes()))  # type: ignore[operator]
    return out


@examples()
@given(which=st.sampled_from(["json", "npz"]), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_checkpoint_is_refused(good_checkpoints: Path, which: str, cut: float) -> None:
    damaged = damaged_copy(good_checkpoints, which, lambda data: data[: int(len(data) * cut)])
    try:
        meta, _ = newest(damaged)
        with pytest.raises(checkpoint.CheckpointError, match=meta.name):
            checkpoint._load_one(meta)
        fallback = checkpoint.load_latest(damaged)
    finally:
        shutil.rmtree(damaged.parent)

    assert fallback is not None and fallback.version == 1


@examples()
@given(
    which=st.sampled_from(["json", "npz"]),
    position=st.floats(0.0, 1.0, exclude_max=True),
    bit=st.integers(0, 7),
)
def test_bit_flipped_checkpoint_is_refused(
    good_checkpoints: Path, which: str, position: float, bit: int
) -> None:
    def flip(data: bytes) -> bytes:
        i = int(len(data) * position)
        return data[:i] + bytes([data[i] ^ (1 << bit)]) + data[i + 1 :]

    damaged = damaged_copy(good_checkpoints, which, flip)
    try:
        meta, _ = newest(damaged)
        with pytest.raises(checkpoint.CheckpointError, match=meta.name):
            checkpoint._load_one(meta)
        fallback = checkpoint.load_latest(damaged)
    finally:
        shutil.rmtree(damaged.parent)

    assert fallback is not None and fallback.version == 1


class Payload:
    """Unpickling this object would create `path` (the proof of a pickle being run)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))


def reseal(meta_path: Path, **changes: object) -> None:
    """Rewrite the metadata the way a forger would: matching sizes and checksums."""
    meta = json.loads(meta_path.read_text())
    meta.update(changes)
    npz = meta_path.parent / str(meta["npz"])
    if npz.exists():
        meta["npz_bytes"] = npz.stat().st_size
        meta["npz_xxh3_128"] = xxhash.xxh3_128(npz.read_bytes()).hexdigest()
    meta["checksum"] = checkpoint._meta_checksum(meta)
    meta_path.write_text(json.dumps(meta))


def test_pickled_object_array_is_refused_and_never_unpickled(
    good_checkpoints: Path, tmp_path: Path
) -> None:
    job_dir = tmp_path / "ck"
    shutil.copytree(good_checkpoints, job_dir)
    meta, npz = newest(job_dir)
    marker = tmp_path / "unpickled"
    with np.load(npz) as data:
        arrays = {k: data[k] for k in data.files}
    arrays["weights"] = np.array([Payload(marker)], dtype=object)
    with open(npz, "wb") as f:
        np.savez(f, **arrays)  # allow_pickle on save: the object array is a pickle
    unsealed = tmp_path / "unsealed" / "ck"
    shutil.copytree(job_dir, unsealed)
    reseal(meta)  # the forger also fixed size and checksum: only allow_pickle=False is left

    with pytest.raises(checkpoint.CheckpointError, match=r"bytes, expected|checksum"):
        checkpoint._load_one(newest(unsealed)[0])
    with pytest.raises(checkpoint.CheckpointError, match=r"[Oo]bject arrays|pickle"):
        checkpoint._load_one(meta)
    assert not marker.exists()


def test_metadata_naming_another_file_or_job_is_refused(
    good_checkpoints: Path, tmp_path: Path
) -> None:
    job_dir = tmp_path / "ck"
    shutil.copytree(good_checkpoints, job_dir)
    meta, _ = newest(job_dir)
    problems = []
    for changes in ({"npz": "../elsewhere/ckpt-000000000002.npz"}, {"job_id": "../../x"}):
        shutil.copy(good_checkpoints / meta.name, meta)
        reseal(meta, **changes)
        with pytest.raises(checkpoint.CheckpointError) as err:
            checkpoint._load_one(meta)
        problems.append(str(err.value))

    assert "unexpected weights file" in problems[0]
    assert "job id does not match" in problems[1]


def test_server_resumes_the_last_good_checkpoint_and_says_why(
    good_checkpoints: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "root"
    shutil.copytree(good_checkpoints, root / "ck")
    meta, npz = newest(root / "ck")
    data = bytearray(npz.read_bytes())
    data[len(data) // 2] ^= 0x10
    npz.write_bytes(bytes(data))
    shutil.copytree(good_checkpoints, root / "lost")
    for path in (root / "lost").glob("ckpt-*.json"):
        path.write_text("{torn")

    with (
        caplog.at_level(logging.WARNING, logger="gradfleet.server"),
        serve(port=0, checkpoint_dir=root) as server,
        ParameterServerClient(server.address) as ps,
    ):
        jobs = {info.job_id: info.version for info in ps.list_jobs()}

    messages = " ".join(r.getMessage() for r in caplog.records)
    assert jobs == {"ck": 1}
    assert f"{meta.name} is refused: the checksum of {npz.name} does not match" in messages
    assert "job lost is not resumed" in messages
