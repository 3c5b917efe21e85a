"""Datasets a job trains on: in-memory arrays and the file formats people bring.

Everything is checked before training starts, and a bad file is named with the row or
column that is wrong. Loading is offline: scikit-learn's bundled sets ship with it.
"""

from __future__ import annotations

import copy
import csv
import gzip
import logging
import math
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SKLEARN_SETS = ("digits", "iris", "wine", "breast_cancer")
_IDX_TYPES: dict[int, Any] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


@dataclass(repr=False)
class ArrayDataset:
    """Features and labels, split into a training part and a held-out part.

    With ``validation_split`` and no held-out rows given, the rows are shuffled with
    ``seed`` and the last ``validation_split`` of them held out (a warning names classes
    only one side has). ``standardize`` fits mean/std on the training part only
    (``stats``); the rows stay as they are, and the model a job trains applies them, so
    it takes raw rows when it is used later.
    """

    x: np.ndarray
    y: np.ndarray
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    validation_split: float = 0.0
    standardize: bool = False
    name: str = "arrays"
    num_classes: int | None = None
    stats: dict[str, np.ndarray] = field(default_factory=dict)
    seed: int = 0

    def __post_init__(self) -> None:
        self.x = _check_features(self.x, self.name)
        self.y = np.asarray(self.y)
        _check_rows(self.x, self.y, self.name)
        if self.x_val is None and self.validation_split:
            if not 0 < self.validation_split < 1:
                raise ValueError(
                    f"validation_split must be between 0 and 1, got {self.validation_split}"
                )
            cut = len(self.x) - max(1, round(len(self.x) * self.validation_split))
            if cut < 1:
                raise ValueError(
                    f"{self.name}: {len(self.x)} rows leave none to train on after a "
                    f"validation split of {self.validation_split}"
                )
            order = np.random.default_rng(self.seed).permutation(len(self.x))
            x, y = self.x[order], self.y[order]
            self.x, self.x_val = x[:cut], x[cut:]
            self.y, self.y_val = y[:cut], y[cut:]
            _warn_of_unshared_classes(self.y, self.y_val, self.name)
        if (self.x_val is None) != (self.y_val is None):
            raise ValueError(f"{self.name}: give validation features and labels together")
        if self.x_val is not None:
            self.x_val = _check_features(self.x_val, f"{self.name} (validation)")
            self.y_val = np.asarray(self.y_val)
            _check_rows(self.x_val, self.y_val, f"{self.name} (validation)")
            if self.x_val.shape[1] != self.x.shape[1]:
                raise ValueError(
                    f"{self.name}: validation rows have {self.x_val.shape[1]} features, "
                    f"training rows {self.x.shape[1]}"
                )
        if self.standardize and not self.stats:
            # a constant column's std comes out a rounding error above 0, not 0: dividing by
            # it would blow other values of that column up to ~1e14, so it keeps scale 1
            constant = self.x.max(axis=0) == self.x.min(axis=0)
            std = np.where(constant, 1.0, self.x.std(axis=0))
            self.stats = {"mean": self.x.mean(axis=0), "std": std}

    @property
    def num_features(self) -> int:
        return int(self.x.shape[1])

    @property
    def num_rows(self) -> int:
        return len(self.x)

    def classes(self) -> int:
        """The number of classes: given, or one more than the largest integer label."""
        if self.num_classes is not None:
            return self.num_classes
        labels = self.y if self.y_val is None else np.concatenate([self.y, self.y_val])
        return int(labels.max()) + 1 if labels.size else 0

    def check_labels(self, classes: int) -> None:
        """Labels must be integers 0..classes-1; name the first row that is not."""
        for part, labels in (("training", self.y), ("validation", self.y_val)):
            if labels is None:
                continue
            if labels.ndim != 1:
                raise ValueError(
                    f"{self.name}: {part} labels must be one integer per row, "
                    f"got shape {labels.shape}"
                )
            bad = np.flatnonzero((labels != np.round(labels)) | (labels < 0) | (labels >= classes))
            if bad.size:
                raise ValueError(
                    f"{self.name}: {part} label {labels[bad[0]].item()} in row {bad[0]} is not a "
                    f"class index 0..{classes - 1}"
                )

    def with_dtype(self, dtype: Any, integer_labels: bool = False) -> ArrayDataset:
        """This data with features in ``dtype`` (and labels as int64): a new dataset that
        shares every array already in that form, leaving this one as it is."""
        copied = copy.copy(self)
        copied.x = self.x.astype(dtype, copy=False)
        if self.x_val is not None:
            copied.x_val = self.x_val.astype(dtype, copy=False)
        if integer_labels:
            copied.y = self.y.astype(np.int64, copy=False)
            if self.y_val is not None:
                copied.y_val = self.y_val.astype(np.int64, copy=False)
        return copied

    def __repr__(self) -> str:
        held_out = 0 if self.x_val is None else len(self.x_val)
        return (
            f"ArrayDataset(name={self.name!r}, rows={self.num_rows}, "
            f"features={self.num_features}, held_out={held_out})"
        )


def _warn_of_unshared_classes(y: np.ndarray, y_val: np.ndarray, name: str) -> None:
    """Warn when a split leaves a class on one side only (integer labels)."""
    if y.ndim != 1 or (y.dtype.kind not in "iu" and not np.all(y == np.round(y))):
        return
    train, held = set(np.unique(y).tolist()), set(np.unique(y_val).tolist())
    if len(train | held) > 1000:
        return  # not class labels
    if held - train:
        logger.warning(
            "%s: held-out rows hold class(es) %s that no training row has",
            name,
            sorted(held - train)[:10],
        )
    if train - held:
        logger.warning(
            "%s: class(es) %s have no held-out rows, so accuracy says nothing about them",
            name,
            sorted(train - held)[:10],
        )


def _check_features(x: Any, name: str) -> np.ndarray:
    try:
        x = np.asarray(x, dtype=None)
    except ValueError as exc:  # ragged nested lists
        raise ValueError(
            f"{name}: features are ragged (rows of different lengths): {exc}"
        ) from None
    if x.dtype == object:
        raise ValueError(f"{name}: features are ragged or not numeric")
    if x.ndim != 2:
        raise ValueError(f"{name}: features must be a 2-D array (rows, features), got {x.shape}")
    if x.dtype.kind not in "fiub":
        raise ValueError(f"{name}: features must be numeric, got dtype {x.dtype}")
    if x.dtype.kind != "f":
        x = x.astype(np.float64)
    finite = np.isfinite(x)
    if not finite.all():
        row, column = np.argwhere(~finite)[0]
        raise ValueError(f"{name}: feature in row {row}, column {column} is {x[row, column]}")
    return x


def _check_rows(x: np.ndarray, y: np.ndarray, name: str) -> None:
    if y.ndim == 0:
        raise ValueError(f"{name}: labels must be an array with one entry per row")
    if y.dtype.kind not in "fiub":
        raise ValueError(f"{name}: labels must be numbers, got dtype {y.dtype}")
    if len(y) != len(x):
        raise ValueError(f"{name}: {len(x)} rows of features but {len(y)} labels")
    if len(x) == 0:
        raise ValueError(f"{name}: the dataset is empty")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (MNIST's format), raw or gzip-compressed, as an array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            magic = f.read(4)
            if len(magic) < 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in _IDX_TYPES:
                raise ValueError(f"{path}: not an IDX file (bad magic number)")
            dtype, ndim = np.dtype(_IDX_TYPES[magic[2]]), magic[3]
            dims = f.read(4 * ndim)
            if ndim < 1 or len(dims) < 4 * ndim:
                raise ValueError(f"{path}: IDX header is truncated or has no dimensions")
            shape = struct.unpack(f">{ndim}I", dims)
            expected = math.prod(shape) * dtype.itemsize
            # read only what the header promises (+1 byte to see that nothing follows): a
            # small compressed file cannot make us hold gigabytes it does not describe
            raw = f.read(expected + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise ValueError(f"{path}: cannot read IDX file: {exc}") from None
    if len(raw) > expected:
        raise ValueError(f"{path}: IDX data is longer than the {expected} bytes its header gives")
    if len(raw) < expected:
        raise ValueError(f"{path}: IDX data has {len(raw)} bytes, the header promises {expected}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def load_mnist(directory: str | Path, train_rows: int = 8000, kind: str = "t10k") -> ArrayDataset:
    """MNIST IDX files from ``directory``: the first ``train_rows`` train, the rest held out."""
    directory = Path(directory)
    images = read_idx(_first_existing(directory, f"{kind}-images-idx3-ubyte"))
    labels = read_idx(_first_existing(directory, f"{kind}-labels-idx1-ubyte"))
    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    y = labels.astype(np.int64)
    return ArrayDataset(
        x[:train_rows],
        y[:train_rows],
        x[train_rows:],
        y[train_rows:],
        name=f"mnist:{directory}",
        num_classes=10,
    )


def _first_existing(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.exists():
            return candidate
    raise ValueError(f"no {stem}(.gz) in {directory}")


def load_sklearn(
    name: str, validation_split: float = 0.2, standardize: bool = True, seed: int = 0
) -> ArrayDataset:
    """One of scikit-learn's bundled sets (offline), shuffled with ``seed``, standardised,
    the last part held out."""
    from sklearn import datasets as sk  # imported here: only these loaders need it

    if name not in SKLEARN_SETS:
        raise ValueError(f"unknown bundled dataset {name!r}: choose one of {SKLEARN_SETS}")
    bunch = getattr(sk, f"load_{name}")()
    x, y = np.asarray(bunch.data, dtype=np.float64), np.asarray(bunch.target, dtype=np.int64)
    return ArrayDataset(
        x, y, validation_split=validation_split, standardize=standardize, name=name, seed=seed
    )


def load_csv(path: str | Path, label_column: int | str = -1) -> tuple[np.ndarray, np.ndarray]:
    """A numeric CSV (optional header) as (features, labels); names the bad row or column."""
    path = Path(path)
    try:
        with open(path, newline="") as f:
            rows = [row for row in csv.reader(f) if row]
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc}") from None
    if not rows:
        raise ValueError(f"{path}: the file is empty")
    header: list[str] | None = None
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        header, rows = rows[0], rows[1:]
    width = len(header) if header else len(rows[0])
    if isinstance(label_column, str):
        if not header or label_column not in header:
            raise ValueError(f"{path}: no column named {label_column!r} in the header {header}")
        label_index = header.index(label_column)
    elif not -width <= label_column < width:
        raise ValueError(f"{path}: label_column {label_column} is outside its {width} columns")
    else:
        label_index = label_column % width
    values = np.empty((len(rows), width), dtype=np.float64)
    for number, row in enumerate(rows, start=2 if header else 1):
        if len(row) != width:
            raise ValueError(f"{path}: line {number} has {len(row)} columns, expected {width}")
        for column, cell in enumerate(row):
            try:
                values[number - (2 if header else 1), column] = float(cell)
            except ValueError:
                raise ValueError(
                    f"{path}: line {number}, column {column + 1} is not a number: {cell!r}"
                ) from None
    labels = values[:, label_index]
    return np.delete(values, label_index, axis=1), labels


def load_dataset(
    source: str | Path, validation_split: float = 0.2, seed: int = 0, **options: Any
) -> ArrayDataset:
    """A dataset by bundled name (digits, iris, wine, breast_cancer), MNIST dir, or file path.

    Files: ``.npz`` (arrays ``x``, ``y`` and optional ``x_val``, ``y_val``), ``.npy`` (pass
    ``labels=`` with the label file), ``.csv`` (``label_column=``), IDX (``labels=``).
    Every source gets the same defaults: features standardised (``standardize=False``
    turns it off; MNIST's pixels are scaled to [0, 1] instead), and, unless the source
    names its held-out rows, the rows shuffled with ``seed`` and the last
    ``validation_split`` held out.
    """
    text = str(source)
    if text in SKLEARN_SETS:
        _check_options(options, {"standardize"}, text)
        return load_sklearn(text, validation_split, options.get("standardize", True), seed)
    path = Path(text.removeprefix("mnist:"))
    if text.startswith("mnist:") or (path.is_dir() and any(path.glob("*-images-idx3-ubyte*"))):
        if options.pop("standardize", False):
            raise ValueError("MNIST is scaled to [0, 1]; it cannot be standardized as well")
        _check_options(options, {"train_rows", "kind"}, "an MNIST")
        return load_mnist(path, **options)
    if not path.exists():
        raise ValueError(
            f"no dataset at {text!r}: give a file path or one of the bundled sets {SKLEARN_SETS}"
        )
    suffixes = "".join(path.suffixes)
    if suffixes.endswith(".csv"):
        _check_options(options, {"standardize", "label_column"}, "a .csv")
    elif suffixes.endswith(".npz"):
        _check_options(options, {"standardize"}, "an .npz")
    else:
        _check_options(options, {"standardize", "labels"}, "an .npy or IDX")
    standardize = bool(options.pop("standardize", True))
    if suffixes.endswith(".npz"):
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {k: archive[k] for k in archive.files}
        except (OSError, ValueError, MemoryError, zlib.error) as exc:
            raise ValueError(f"{path}: not a readable .npz without pickles: {exc}") from None
        if "x" not in arrays or "y" not in arrays:
            raise ValueError(f"{path}: needs arrays named 'x' and 'y', found {sorted(arrays)}")
        return ArrayDataset(
            arrays["x"],
            arrays["y"],
            arrays.get("x_val"),
            arrays.get("y_val"),
            validation_split=0.0 if "x_val" in arrays else validation_split,
            standardize=standardize,
            name=str(path),
            seed=seed,
        )
    if suffixes.endswith(".csv"):
        x, y = load_csv(path, options.pop("label_column", -1))
    elif suffixes.endswith(".npy") or "idx" in path.name:
        label_path = options.pop("labels", None)
        if label_path is None:
            raise ValueError(f"{path}: features alone are not enough, pass labels=<file>")
        x = _load_array(path)
        y = _load_array(Path(label_path))
        if x.ndim < 1:
            raise ValueError(f"{path}: features must have one row per sample, got a scalar")
        x = x.reshape(len(x), -1)
    else:
        raise ValueError(f"{path}: unknown format; use .npz, .npy, .csv or IDX (.gz)")
    return ArrayDataset(
        x, y, validation_split=validation_split, standardize=standardize, name=str(path), seed=seed
    )


def _check_options(options: dict[str, Any], allowed: set[str], kind: str) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for {kind} dataset; allowed: {sorted(allowed)}"
        )


def _load_array(path: Path) -> np.ndarray:
    if "".join(path.suffixes).endswith(".npy"):
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError, MemoryError) as exc:
            raise ValueError(f"{path}: not a readable .npy without pickles: {exc}") from None
    return read_idx(path)
