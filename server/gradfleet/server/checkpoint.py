"""Atomic checkpoints: `<dir>/<job_id>/ckpt-<version>.npz` plus `ckpt-<version>.json`.

The `.npz` (weights and optimiser state, loaded with `allow_pickle=False`) is written
first, then the JSON metadata (spec, layout, version, counters, history); each goes to
a temporary file that is fsynced and renamed. The JSON is the commit marker: a
checkpoint counts only when both files load and agree, so a torn write is skipped in
favour of the previous good checkpoint, which is kept until a newer one is complete.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from google.protobuf import json_format

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout
from gradfleet.server.jobs import Counters, Job, StepResult

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_KEEP = 2  # good checkpoints kept per job
_OPT_PREFIX = "optimizer::"


@dataclass
class LoadedCheckpoint:
    job_id: str
    spec: pb.JobSpec
    layout: FlatLayout
    weights: np.ndarray
    optimizer_state: dict[str, np.ndarray]
    version: int
    state: int
    counters: Counters
    history: list[StepResult]
    created_at: float


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _atomic_write(path: Path, write: object) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)  # type: ignore[operator]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def write_checkpoint(root: Path, job: Job) -> Path:
    """Write the job's current state; call with `job.cond` held. Returns the JSON path."""
    job_dir = root / job.job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt-{job.version:012d}"
    arrays = {"weights": job.weights}
    for key, value in job.optimizer.state_dict().items():
        arrays[_OPT_PREFIX + key] = np.asarray(value)
    npz_path = job_dir / f"{stem}.npz"
    _atomic_write(npz_path, lambda f: np.savez(f, **arrays))
    meta = {
        "format": FORMAT_VERSION,
        "job_id": job.job_id,
        "version": job.version,
        "state": pb.JobState.Name(job.state),
        "spec": json_format.MessageToDict(job.spec, preserving_proto_field_name=True),
        "layout": job.layout.to_json(),
        "npz": npz_path.name,
        "npz_bytes": npz_path.stat().st_size,
        "created_at": job.created_at,
        "counters": {
            "received": job.counters.received,
            "accepted": job.counters.accepted,
            "duplicate": job.counters.duplicate,
            "dropped_late": job.counters.dropped_late,
            "rejected": job.counters.rejected,
        },
        "history": [vars(r) for r in job.history],
    }
    json_path = job_dir / f"{stem}.json"
    _atomic_write(json_path, lambda f: f.write(json.dumps(meta).encode()))
    job.last_checkpoint_version = job.version
    _prune(job_dir)
    log.info("checkpoint of job %s at version %d", job.job_id, job.version)
    return json_path


def _prune(job_dir: Path) -> None:
    metas = sorted(job_dir.glob("ckpt-*.json"), reverse=True)
    for old in metas[_KEEP:]:
        for path in (old, old.with_suffix(".npz")):
            with contextlib.suppress(OSError):
                path.unlink()


def _load_one(json_path: Path) -> LoadedCheckpoint:
    meta = json.loads(json_path.read_text())
    if meta.get("format") != FORMAT_VERSION:
        raise ValueError("unknown checkpoint format")
    npz_path = json_path.parent / meta["npz"]
    if npz_path.stat().st_size != meta["npz_bytes"]:
        raise ValueError("npz size does not match its metadata")
    layout = FlatLayout.from_json(meta["layout"])
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}  # reading checks each member's CRC
    weights = np.ascontiguousarray(arrays.pop("weights"), dtype=layout.dtype)
    if weights.shape != (layout.total_elements,):
        raise ValueError("weights do not match the layout")
    opt_state = {k[len(_OPT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_OPT_PREFIX)}
    spec = json_format.ParseDict(meta["spec"], pb.JobSpec())
    c = meta["counters"]
    counters = Counters(
        c["received"], c["accepted"], c["duplicate"], c["dropped_late"], dict(c["rejected"])
    )
    return LoadedCheckpoint(
        job_id=meta["job_id"],
        spec=spec,
        layout=layout,
        weights=weights,
        optimizer_state=opt_state,
        version=int(meta["version"]),
        state=pb.JobState.Value(meta["state"]),
        counters=counters,
        history=[StepResult(**r) for r in meta["history"]],
        created_at=float(meta["created_at"]),
    )


def load_latest(job_dir: Path) -> LoadedCheckpoint | None:
    """The newest checkpoint of a job that loads cleanly; torn ones are skipped."""
    for json_path in sorted(job_dir.glob("ckpt-*.json"), reverse=True):
        try:
            return _load_one(json_path)
        except Exception as exc:
            log.warning("skipping unreadable checkpoint %s: %s", json_path, exc)
    return None


def scan(root: Path) -> list[LoadedCheckpoint]:
    """The latest good checkpoint of every job under `root`."""
    if not root.is_dir():
        return []
    found = []
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        loaded = load_latest(job_dir)
        if loaded is not None:
            found.append(loaded)
    return found


def remove_job(root: Path, job_id: str) -> None:
    shutil.rmtree(root / job_id, ignore_errors=True)
