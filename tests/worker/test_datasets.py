"""Dataset loaders and the checks that reject bad data before training starts."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from gradfleet.nn import MLP
from gradfleet.worker.datasets import (
    SKLEARN_SETS,
    ArrayDataset,
    load_dataset,
    load_mnist,
    read_idx,
)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> None:
    codes = {np.dtype(np.uint8): 0x08, np.dtype(">f4"): 0x0D}
    header = bytes([0, 0, codes[array.dtype], array.ndim]) + struct.pack(
        f">{array.ndim}i", *array.shape
    )
    data = header + array.tobytes()
    path.write_bytes(gzip.compress(data) if compress else data)


@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("images.idx.gz" if compress else "images.idx")
    write_idx(path, images, compress)

    loaded = read_idx(path)

    np.testing.assert_array_equal(loaded, images)


def test_idx_with_a_wrong_byte_count_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "short.idx"
    path.write_bytes(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 10) + b"\x00" * 9)

    with pytest.raises(ValueError, match="9 bytes, the header promises 10"):
        read_idx(path)


def test_the_real_mnist_split(mnist_dir: Path) -> None:
    data = load_mnist(mnist_dir)

    assert data.x.shape == (8000, 784)
    assert data.x_val is not None and data.x_val.shape == (2000, 784)
    assert data.x.dtype == np.float32
    assert data.x.min() >= 0.0 and data.x.max() <= 1.0
    assert set(np.unique(data.y)) == set(range(10))


@pytest.mark.parametrize("name", SKLEARN_SETS)
def test_bundled_sets_load_offline_and_standardise_on_training_rows(name: str) -> None:
    raw = load_dataset(name, standardize=False)

    data = load_dataset(name)

    assert data.x_val is not None and len(data.x_val) > 0
    np.testing.assert_array_equal(data.x, raw.x)  # the rows stay raw: the model scales them
    np.testing.assert_allclose(data.stats["mean"], raw.x.mean(axis=0))  # training rows only
    assert not raw.stats


def test_npz_npy_and_csv_sources(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((20, 3))
    y = np.arange(20) % 2
    np.savez(tmp_path / "d.npz", x=x, y=y)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.savetxt(
        tmp_path / "d.csv",
        np.column_stack([x, y]),
        delimiter=",",
        header="a,b,c,label",
        comments="",
    )

    raw = {"validation_split": 0.25, "standardize": False, "seed": 3}
    sources = [
        load_dataset(tmp_path / "d.npz", **raw),
        load_dataset(tmp_path / "x.npy", labels=tmp_path / "y.npy", **raw),
        load_dataset(tmp_path / "d.csv", label_column="label", **raw),
    ]

    order = np.random.default_rng(3).permutation(20)  # shuffled with the seed, then split
    for data in sources:
        np.testing.assert_allclose(data.x, x[order][:15])
        np.testing.assert_array_equal(data.y, y[order][:15])
        np.testing.assert_array_equal(data.y_val, y[order][15:])


def test_every_source_is_standardised_and_split_after_shuffling_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # prepare: the digits as a CSV, sorted by class, as people export them
    digits = load_dataset("digits", standardize=False, validation_split=0.0001)
    x = np.concatenate([digits.x, digits.x_val])
    y = np.concatenate([digits.y, digits.y_val])
    order = np.argsort(y, kind="stable")
    np.savetxt(tmp_path / "sorted.csv", np.column_stack([x[order], y[order]]), delimiter=",")
    # execute
    data = load_dataset(tmp_path / "sorted.csv")
    with caplog.at_level("WARNING"):
        load_dataset(tmp_path / "sorted.csv", seed=0, validation_split=0.005)
    # assert: standardised on its training rows; every class on both sides of the split
    np.testing.assert_allclose(data.stats["mean"], data.x.mean(axis=0))
    assert set(data.y_val.tolist()) == set(range(10)) == set(data.y.tolist())
    assert any("no held-out rows" in message for message in caplog.messages)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("1,2,0\n3,4\n", "line 2 has 2 columns, expected 3"),
        ("1,2,0\n3,x,1\n", "line 2, column 2 is not a number"),
        ("1,2,0\n3,nan,1\n", "row 1, column 1 is nan"),
    ],
)
def test_bad_csv_names_the_line_or_column(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)

    with pytest.raises(ValueError, match=message) as caught:
        load_dataset(path, validation_split=0.0)

    assert "bad.csv" in str(caught.value)


def test_labels_outside_the_classes_name_the_row() -> None:
    data = ArrayDataset(np.zeros((4, 2)), np.array([0, 1, 5, 1]))

    with pytest.raises(ValueError, match=r"label 5 in row 2 is not a class index 0\.\.2"):
        data.check_labels(3)


def test_ragged_rows_are_refused() -> None:
    with pytest.raises(ValueError, match="ragged"):
        ArrayDataset([[1.0, 2.0], [3.0]], [0, 1])


def test_unknown_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no dataset at"):
        load_dataset(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="unknown format"):
        (tmp_path / "data.parquet").write_text("x")
        load_dataset(tmp_path / "data.parquet")


def test_idx_longer_than_its_header_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    # 300 MiB of zeros behind a header that promises 10 bytes: a few hundred KiB gzipped
    path = tmp_path / "bomb-idx1-ubyte.gz"
    header = bytes([0, 0, 0x08, 1]) + struct.pack(">i", 10)
    with gzip.open(path, "wb") as f:
        f.write(header)
        for _ in range(300):
            f.write(bytes(1 << 20))

    with pytest.raises(ValueError, match="longer than the 10 bytes its header gives"):
        read_idx(path)


def test_a_constant_training_column_keeps_its_scale() -> None:
    # 1.7 is not exact in binary: its std over 100 rows is ~1e-15, not 0
    rng = np.random.default_rng(0)
    x = np.column_stack([rng.standard_normal(100), np.full(100, 1.7)])
    x_val = np.array([[0.0, 1.8]])

    data = ArrayDataset(x, np.zeros(100), x_val, np.zeros(1), standardize=True)
    model = MLP([2, 1], dtype="float64", preprocessing=data.stats)
    model.flat[...] = [0.0, 1.0, 0.0]  # the output is the second input, as the model sees it

    assert data.stats["std"][1] == 1.0
    np.testing.assert_allclose(model.logits(x_val)[0, 0], 0.1)


def _bad_files(tmp_path: Path) -> dict[str, tuple[str, dict]]:
    np.save(tmp_path / "scalar.npy", np.float64(3.0))
    np.save(tmp_path / "labels.npy", np.zeros(3))
    np.savez(tmp_path / "no_y_val.npz", x=np.zeros((4, 2)), y=np.zeros(4), x_val=np.zeros((2, 2)))
    np.savez(tmp_path / "text_labels.npz", x=np.zeros((4, 2)), y=np.array(list("abab")))
    good = gzip.compress(bytes([0, 0, 0x08, 1]) + struct.pack(">i", 4) + bytes(4))
    (tmp_path / "corrupt-idx1-ubyte.gz").write_bytes(good[:12] + b"\xff" * 8 + good[20:])
    huge = tmp_path / "huge.npy"
    np.save(huge, np.zeros(4))
    huge.write_bytes(huge.read_bytes().replace(b"(4,)", b"(10**15,)".replace(b"**", b"00")))
    return {
        "scalar features": (str(tmp_path / "scalar.npy"), {"labels": tmp_path / "labels.npy"}),
        "x_val without y_val": (str(tmp_path / "no_y_val.npz"), {}),
        "text labels": (str(tmp_path / "text_labels.npz"), {}),
        "corrupt gzip": (
            str(tmp_path / "corrupt-idx1-ubyte.gz"),
            {"labels": tmp_path / "labels.npy"},
        ),
        "header promising petabytes": (str(huge), {"labels": tmp_path / "labels.npy"}),
    }


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("scalar features", "one row per sample"),
        ("x_val without y_val", "validation features and labels together"),
        ("text labels", "labels must be numbers"),
        ("corrupt gzip", "IDX file"),
        ("header promising petabytes", "not a readable .npy"),
    ],
)
def test_broken_files_are_one_value_error(tmp_path: Path, case: str, message: str) -> None:
    source, options = _bad_files(tmp_path)[case]

    with pytest.raises(ValueError, match=message):
        load_dataset(source, **options)


def test_a_split_that_leaves_no_training_rows_is_refused() -> None:
    with pytest.raises(ValueError, match="leave none to train on"):
        ArrayDataset(np.ones((1, 2)), np.zeros(1), validation_split=0.2)
