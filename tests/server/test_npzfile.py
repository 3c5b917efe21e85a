"""`npzfile.save` writes archives that `np.load` and `zipfile` read and check."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gradfleet.server import npzfile

ARRAYS = {
    "weights": np.linspace(-1, 1, 1001, dtype=np.float32),
    "optimizer::momentum/W0": np.arange(12, dtype=np.float64).reshape(3, 4),
    "optimizer::steps": np.asarray(7, dtype=np.int64),
    "history::ints": np.zeros((0, 3), dtype=np.int64),
    "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,  # not C-contiguous
    "flags": np.array([True, False, True]),
}


def saved(tmp_path: Path, arrays: dict[str, np.ndarray]) -> Path:
    path = tmp_path / "arrays.npz"
    with open(path, "wb") as f:
        npzfile.save(f, arrays)
    return path


def test_np_load_gives_back_every_array_with_its_dtype_and_shape(tmp_path: Path) -> None:
    # execute
    path = saved(tmp_path, ARRAYS)

    # assert
    with np.load(path, allow_pickle=False) as loaded:
        assert sorted(loaded.files) == sorted(ARRAYS)
        for name, array in ARRAYS.items():
            assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
            np.testing.assert_array_equal(loaded[name], array)


def test_the_archive_matches_np_savez_member_for_member(tmp_path: Path) -> None:
    # prepare
    reference = io.BytesIO()  # what np.savez makes of the same arrays in C order
    np.savez(reference, **{name: array.copy(order="C") for name, array in ARRAYS.items()})

    # execute
    ours = zipfile.ZipFile(saved(tmp_path, ARRAYS))
    theirs = zipfile.ZipFile(reference)

    # assert
    assert ours.testzip() is None  # every member's CRC-32 checks out
    assert ours.namelist() == theirs.namelist()
    for name in theirs.namelist():
        assert ours.read(name) == theirs.read(name)
        assert ours.getinfo(name).CRC == theirs.getinfo(name).CRC
        assert ours.getinfo(name).compress_type == zipfile.ZIP_STORED


def test_a_changed_byte_of_data_fails_the_crc_check(tmp_path: Path) -> None:
    # prepare
    path = saved(tmp_path, {"weights": np.ones(4096, dtype=np.float64)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    # execute / assert
    with (
        np.load(path, allow_pickle=False) as loaded,
        pytest.raises(zipfile.BadZipFile, match="CRC"),
    ):
        loaded["weights"]


def test_arrays_of_python_objects_are_refused_before_anything_is_written() -> None:
    # prepare
    out = io.BytesIO()

    # execute / assert
    with pytest.raises(ValueError, match="Python objects"):
        npzfile.save(out, {"objects": np.array([1, "two"], dtype=object)})
    assert out.getvalue() == b""
