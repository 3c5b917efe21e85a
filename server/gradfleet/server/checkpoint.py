"""Atomic checkpoints: `<dir>/<job_id>/ckpt-<version>.npz` plus `ckpt-<version>.json`.

The `.npz` (weights, optimiser state and the step history as two arrays, loaded with
`allow_pickle=False`) is written first, then the JSON metadata (spec, layout, version,
counters, the `.npz`'s size and XXH3-128 digest, and a checksum of itself); each goes to a
temporary file that is fsynced, then both are renamed and the directory is fsynced once.
The JSON is the commit marker: a checkpoint counts only when both files load and agree,
so a torn write is skipped in favour of the previous good checkpoint, which is kept until
a newer one is complete. These functions do disk I/O and are called off the job's lock
(`CheckpointWriter`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO, Any

import numpy as np
import xxhash

from gradfleet.proto.wire import FlatLayout
from gradfleet.server import npzfile
from gradfleet.server.direct_file import DirectFile
from gradfleet.server.domain import Counters, Evaluation, JobSnapshot, JobState
from gradfleet.server.history import StepHistory
from gradfleet.server.membership import MembershipState
from gradfleet.server.settings import JobSpec

log = logging.getLogger(__name__)

# 4: the .npz checked by XXH3-128; 3 (SHA-256, history in the .npz) and 2 (history as JSON
# records) still load
FORMAT_VERSION = 4
_READABLE_FORMATS = (2, 3, 4)
_KEEP = 2  # good checkpoints kept per job
_OPT_PREFIX = "optimizer::"
_HISTORY_INTS, _HISTORY_FLOATS = "history::ints", "history::floats"
_STEM = re.compile(r"^ckpt-\d{12}$")
_HASH_BLOCK = 1 << 20
_STATE_NAMES = {state: f"JOB_STATE_{state.name}" for state in JobState}


class CheckpointError(ValueError):
    """A checkpoint file is incomplete, corrupted or not ours; the message says which."""


def _npz_digest_kind(fmt: int) -> tuple[str, Callable[[], Any]]:
    """The metadata key and the hash of a weights file's digest in checkpoint format `fmt`.
    XXH3-128 since format 4: it catches torn and corrupted files, which is all a checksum
    of the server's own files is for, at a tenth of SHA-256's CPU per checkpoint."""
    return ("npz_xxh3_128", xxhash.xxh3_128) if fmt >= 4 else ("npz_sha256", hashlib.sha256)


def _npz_digest(path: Path, fmt: int) -> str:
    """The digest of a weights file that a checkpoint of format `fmt` records."""
    digest = _npz_digest_kind(fmt)[1]()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _meta_checksum(meta: dict) -> str:
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it, so the digest
    and size are of exactly the file's bytes, without reading the file again."""

    def __init__(self, f: DirectFile) -> None:
        self._f = f
        self.digest = _npz_digest_kind(FORMAT_VERSION)[1]()
        self.size = 0

    def write(self, data: bytes | memoryview) -> int:
        self.digest.update(data)
        written = self._f.write(data)
        self.size += written
        return written


def _synced_temporary(path: Path, write: Callable[[IO[bytes]], Any]) -> tuple[str, _HashingWriter]:
    """A temporary file beside `path` holding what `write` wrote, on disk (fsynced);
    returns its name and the digest and size of its bytes."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with DirectFile(fd) as f:
            hashing = _HashingWriter(f)
            write(hashing)  # type: ignore[arg-type]
            f.sync()
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp, hashing


def write_checkpoint(
    root: Path, snap: JobSnapshot, keep: int = _KEEP
) -> tuple[Path, tuple[int, ...]]:
    """Write `snap` under `root`, keeping the `keep` newest checkpoints of its job (a
    shard of a job keeps more: see `Job`); returns the JSON path and the versions the
    job's directory then holds."""
    job_dir = root / snap.job_id
    job_dir.mkdir(parents=True, exist_ok=True)
    stem = f"ckpt-{snap.version:012d}"
    arrays: dict[str, Any] = {"weights": snap.weights}
    for key, value in snap.optimizer_state.items():
        arrays[_OPT_PREFIX + key] = np.asarray(value)
    arrays[_HISTORY_INTS], arrays[_HISTORY_FLOATS] = snap.history
    npz_path, json_path = job_dir / f"{stem}.npz", job_dir / f"{stem}.json"
    npz_tmp, npz = _synced_temporary(npz_path, lambda f: npzfile.save(f, arrays))
    try:
        meta = json.dumps(_metadata(snap, npz_path.name, npz)).encode()
        json_tmp, _ = _synced_temporary(json_path, lambda f: f.write(meta))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(npz_tmp)
        raise
    # both files are on disk before either name is, and one directory fsync makes both
    # names durable. Until then a crash may keep one rename without the other: a weights
    # file without its JSON is a leftover, a JSON without its weights file is refused, and
    # the previous checkpoint is not pruned yet.
    os.replace(npz_tmp, npz_path)
    os.replace(json_tmp, json_path)
    _fsync_dir(job_dir)
    held = _prune(job_dir, stem, keep)
    log.debug("checkpoint of job %s at version %d", snap.job_id, snap.version)
    return json_path, held


def _metadata(snap: JobSnapshot, npz_name: str, npz: _HashingWriter) -> dict[str, Any]:
    """A checkpoint's JSON metadata, with the checksum of itself."""
    c = snap.counters
    meta = {
        "format": FORMAT_VERSION,
        "job_id": snap.job_id,
        "version": snap.version,
        "state": _STATE_NAMES[snap.state],
        "spec": snap.spec.to_json(),
        "layout": snap.layout.to_json(),
        "npz": npz_name,
        "npz_bytes": npz.size,
        _npz_digest_kind(FORMAT_VERSION)[0]: npz.digest.hexdigest(),
        "created_at": snap.created_at,
        "counters": {
            "received": c.received,
            "accepted": c.accepted,
            "duplicate": c.duplicate,
            "dropped_late": c.dropped_late,
            "rejected": dict(c.rejected),
            "dropped_removed": c.dropped_removed,
        },
    }
    if snap.membership is not None:
        meta["membership"] = snap.membership.to_json()
    if snap.evaluation is not None:
        meta["evaluation"] = {"step": snap.evaluation.step, "metrics": snap.evaluation.metrics}
    meta["checksum"] = _meta_checksum(meta)
    return meta


def _prune(job_dir: Path, current: str, keep: int) -> tuple[int, ...]:
    """Keep the checkpoint just written (stem `current`) and the `keep - 1` newest before
    it; drop older ones and leftovers of writes a crash cut short. Newer files (left by an
    earlier job of the same id that could not be resumed from them) stay for the
    operator. Returns the versions kept, oldest first."""
    names = os.listdir(job_dir)
    metas = sorted(n[:-5] for n in names if n.startswith("ckpt-") and n.endswith(".json"))
    older = [m for m in metas if m < current]
    kept = {current} | {m for m in metas if m > current}
    kept |= set(older[len(older) - (keep - 1) :])
    # one writer per job directory, so a weights file no kept checkpoint names, and a
    # temporary file, are leftovers
    doomed = []
    for name in names:
        stem, _, suffix = name.rpartition(".")
        ours = name.startswith("ckpt-") and suffix in ("json", "npz") and stem not in kept
        if ours or (name.startswith(".ckpt-") and suffix == "tmp"):
            doomed.append(name)
    # commit markers first: a crash part-way leaves leftovers, never a JSON whose weights
    # file is gone
    for name in sorted(doomed, key=lambda name: not name.endswith(".json")):
        with contextlib.suppress(OSError):
            os.unlink(job_dir / name)
    return _versions_of(kept)


def _load_one(json_path: Path) -> JobSnapshot:
    try:
        return _parse(json_path)
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError, AttributeError, zipfile.BadZipFile) as exc:
        raise CheckpointError(f"checkpoint {json_path} is unreadable: {exc}") from None


def _parse(json_path: Path) -> JobSnapshot:
    def bad(problem: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {json_path} is refused: {problem}")

    raw = json_path.read_bytes()
    try:
        meta = json.loads(raw)
    except ValueError:
        raise bad("its metadata is not valid JSON (a torn or corrupted write)") from None
    if not isinstance(meta, dict):
        raise bad("its metadata is not a JSON object")
    if meta.get("format") not in _READABLE_FORMATS:
        raise bad(
            f"unknown checkpoint format {meta.get('format')!r}, expected one of "
            f"{list(_READABLE_FORMATS)}"
        )
    # the checksum covers the values; the byte comparison also catches a change that
    # parses to the same values (e.g. a 17th digit of a float), as written files round-trip
    if meta.get("checksum") != _meta_checksum(meta) or json.dumps(meta).encode() != raw:
        raise bad("the metadata checksum does not match (the file was altered or corrupted)")
    stem = json_path.stem
    if not _STEM.match(stem) or meta.get("npz") != f"{stem}.npz":
        raise bad("it names an unexpected weights file")
    if meta.get("job_id") != json_path.parent.name:
        raise bad("its job id does not match its directory")
    npz_path = json_path.with_suffix(".npz")
    if npz_path.stat().st_size != meta["npz_bytes"]:
        raise bad(
            f"{npz_path.name} has {npz_path.stat().st_size} bytes, expected {meta['npz_bytes']}"
        )
    key, _ = _npz_digest_kind(meta["format"])
    if _npz_digest(npz_path, meta["format"]) != meta.get(key):
        raise bad(f"the checksum of {npz_path.name} does not match (corrupted or replaced)")
    layout = FlatLayout.from_json(meta["layout"])
    with np.load(npz_path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}  # reading checks each member's CRC too
    weights = np.ascontiguousarray(arrays.pop("weights"), dtype=layout.dtype)
    if weights.shape != (layout.total_elements,):
        raise bad("the weights do not match the layout")
    opt_state = {k[len(_OPT_PREFIX) :]: v for k, v in arrays.items() if k.startswith(_OPT_PREFIX)}
    if meta["format"] == 2:
        history = StepHistory.from_records(meta["history"])
    else:
        history = StepHistory(arrays[_HISTORY_INTS], arrays[_HISTORY_FLOATS])
    states = {name: state for state, name in _STATE_NAMES.items()}
    if meta["state"] not in states:
        raise bad(f"unknown job state {meta['state']!r}")
    evaluation = None
    if "evaluation" in meta:
        found = meta["evaluation"]
        metrics = {str(k): float(v) for k, v in dict(found["metrics"]).items()}
        evaluation = Evaluation(int(found["step"]), metrics)
    c = meta["counters"]
    counters = Counters(
        int(c["received"]),
        int(c["accepted"]),
        int(c["duplicate"]),
        int(c["dropped_late"]),
        {str(k): int(v) for k, v in dict(c["rejected"]).items()},
        int(c.get("dropped_removed", 0)),
    )
    membership = None
    if "membership" in meta:
        membership = MembershipState.from_json(meta["membership"])
    return JobSnapshot(
        job_id=meta["job_id"],
        spec=JobSpec.from_json(meta["spec"]),
        layout=layout,
        weights=weights,
        optimizer_state=opt_state,
        version=int(meta["version"]),
        state=states[meta["state"]],
        counters=counters,
        history=history.arrays(),
        created_at=float(meta["created_at"]),
        evaluation=evaluation,
        membership=membership,
    )


def versions(job_dir: Path) -> tuple[int, ...]:
    """The versions `job_dir` holds checkpoints of, oldest first (not yet checked)."""
    return _versions_of(p.stem for p in job_dir.glob("ckpt-*.json"))


def _versions_of(stems: Iterable[str]) -> tuple[int, ...]:
    """The versions of the checkpoint stems among `stems`, oldest first."""
    return tuple(sorted(int(stem[5:]) for stem in stems if _STEM.match(stem)))


def load_version(job_dir: Path, version: int) -> JobSnapshot:
    """The checkpoint of exactly `version`, checked; CheckpointError if it is unusable."""
    path = job_dir / f"ckpt-{version:012d}.json"
    if not path.exists():
        raise CheckpointError(f"there is no checkpoint of version {version} in {job_dir}")
    return _load_one(path)


def remove_newer(job_dir: Path, version: int) -> None:
    """Delete the checkpoints of versions after `version` (a timeline given up)."""
    for newer in [v for v in versions(job_dir) if v > version]:
        for suffix in (".json", ".npz"):
            with contextlib.suppress(OSError):
                (job_dir / f"ckpt-{newer:012d}{suffix}").unlink()


def load_latest(job_dir: Path) -> JobSnapshot | None:
    """The newest checkpoint of a job that loads cleanly and can be resumed; torn ones,
    and ones of a job that was being deleted, are skipped."""
    for json_path in sorted(job_dir.glob("ckpt-*.json"), reverse=True):
        try:
            loaded = _load_one(json_path)
        except CheckpointError as exc:
            log.warning("%s; trying an older one", exc)
            continue
        if loaded.state is JobState.DELETED:
            log.warning("%s belongs to a deleted job; trying an older one", json_path)
            continue
        return loaded
    return None


def scan(root: Path) -> list[JobSnapshot]:
    """The latest good checkpoint of every job under `root`."""
    if not root.is_dir():
        return []
    found = []
    for job_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        loaded = load_latest(job_dir)
        if loaded is not None:
            found.append(loaded)
        elif any(job_dir.glob("ckpt-*.json")):
            log.error(
                "job %s is not resumed: none of its checkpoints in %s is usable (see the "
                "warnings above); restore a good checkpoint there or delete the directory",
                job_dir.name,
                job_dir,
            )
    return found


def remove_job(root: Path, job_id: str) -> None:
    shutil.rmtree(root / job_id, ignore_errors=True)
