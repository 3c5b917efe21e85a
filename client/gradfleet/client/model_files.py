"""A trained model on disk: ``model.npz`` (weights, no pickle) beside ``model.json`` (spec).

The spec carries the model's preprocessing and what its outputs mean, so a loaded model
predicts from raw rows like the one that was saved.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from gradfleet.nn import MLP
from gradfleet.nn.mlp import parameter_count

FORMAT = "gradfleet.model/1"


def save_model(model: MLP, directory: str | Path, extra: dict | None = None) -> Path:
    """Write the weights and spec into ``directory``; returns the path of ``model.npz``.
    ``extra`` is stored beside the spec (the dataset, its held-out split, metrics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_path = directory / "model.npz"
    np.savez(weights_path, allow_pickle=False, **model.state_dict())
    meta = {"format": FORMAT, "spec": model.spec(), **(extra or {})}
    (directory / "model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return weights_path


def model_description(path: str | Path) -> dict:
    """The contents of a saved model's ``model.json`` (spec, dataset, final metrics, ...)."""
    return _paths_and_description(path)[2]


def _paths_and_description(path: str | Path) -> tuple[Path, Path, dict]:
    path = Path(path)
    weights_path = path / "model.npz" if path.is_dir() else path
    meta_path = weights_path.with_suffix(".json")
    if not weights_path.exists():
        raise ValueError(f"no model at {path}: expected a model directory or its model.npz")
    if not meta_path.exists():
        raise ValueError(f"{weights_path} is not a gradfleet model: {meta_path.name} is missing")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{meta_path} is not a gradfleet model description: {exc}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path} is not a gradfleet model description ({FORMAT})")
    return weights_path, meta_path, meta


def load_model(path: str | Path) -> MLP:
    """Load a model saved by ``save_model`` from its directory or its ``model.npz``."""
    weights_path, meta_path, meta = _paths_and_description(path)
    spec = dict(meta.get("spec") or {})
    if "preprocessing" in meta and "preprocessing" not in spec:  # stored beside the spec
        spec["preprocessing"] = meta["preprocessing"]
    try:
        with np.load(weights_path, allow_pickle=False) as archive:
            weights = {name: archive[name] for name in archive.files}
    except (OSError, ValueError, MemoryError, zipfile.BadZipFile) as exc:
        raise ValueError(f"{weights_path} is not a readable weights file: {exc}") from None
    # the spec must describe these weights before a model of its size is built
    stored = sum(int(w.size) for w in weights.values())
    if _spec_parameters(spec, meta_path) != stored:
        raise ValueError(f"{meta_path}: its spec does not describe the {stored} stored weights")
    try:
        model = MLP.from_spec(spec)
    except (TypeError, OverflowError, ValueError) as exc:
        raise ValueError(f"{meta_path}: the model spec is invalid: {exc}") from None
    model.load_state_dict(weights)
    return model


def _spec_parameters(spec: object, source: Path) -> int:
    """How many parameters an MLP spec describes (sum of a*b + b over its layers)."""
    try:
        sizes = [int(n) for n in spec["sizes"]]  # type: ignore[index]
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ValueError(f"{source}: the model spec needs 'sizes', a list of integers") from None
    return parameter_count(sizes)
