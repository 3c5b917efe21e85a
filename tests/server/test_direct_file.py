"""DirectFile writes exactly the bytes it is given, with and without O_DIRECT."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest

from gradfleet.server.direct_file import BLOCK, STAGING, DirectFile


def accepts_o_direct(directory: Path) -> bool:
    """Whether the filesystem of `directory` opens files with O_DIRECT."""
    if not hasattr(os, "O_DIRECT"):
        return False
    probe = directory / "probe"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_DIRECT, 0o600))
    except OSError:
        return False
    probe.unlink()
    return True


@pytest.mark.parametrize("direct", [True, False])
@pytest.mark.parametrize(
    "sizes",
    [
        [],
        [1],
        [BLOCK - 1, 1],
        [BLOCK, BLOCK + 1],
        [STAGING - 3, 7, STAGING + 5],
        [2 * STAGING],
    ],
)
def test_the_file_holds_exactly_the_bytes_written(
    tmp_path: Path, sizes: list[int], direct: bool
) -> None:
    rng = np.random.default_rng(len(sizes))
    pieces = [rng.integers(0, 256, size, dtype=np.uint8) for size in sizes]
    path = tmp_path / "out.bin"
    with DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), direct=direct) as f:
        for piece in pieces:
            assert f.write(piece.data) == piece.size
        f.sync()
        # O_DIRECT for files that filled the staging buffer; smaller ones are written whole
        filled = sum(sizes) >= STAGING
        assert f.direct == (direct and filled and accepts_o_direct(tmp_path))
    expected = b"".join(piece.tobytes() for piece in pieces)
    assert path.read_bytes() == expected


def test_any_buffer_is_written_as_its_raw_bytes(tmp_path: Path) -> None:
    weights = np.linspace(-1, 1, 3 * BLOCK + 5, dtype=np.float32)
    path = tmp_path / "weights.bin"
    with DirectFile(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)) as f:
        f.write(b"head")
        f.write(memoryview(weights))
        f.write(bytearray(b"tail"))
        f.sync()
    raw = path.read_bytes()
    assert raw[:4] == b"head" and raw[-4:] == b"tail"
    np.testing.assert_array_equal(np.frombuffer(raw[4:-4], dtype=np.float32), weights)


def test_a_failed_write_raises_its_own_error(tmp_path: Path) -> None:
    path = tmp_path / "read-only.bin"
    path.write_bytes(b"")
    with pytest.raises(OSError) as raised, DirectFile(os.open(path, os.O_RDONLY)) as f:
        f.write(bytes(STAGING))  # a full staging buffer goes to the disk at once
    assert raised.value.errno == errno.EBADF
