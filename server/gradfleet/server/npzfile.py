"""Write `.npz` files (an uncompressed zip of `.npy` members) from arrays in place.

`np.savez` copies each array into a bytes object and the standard library's zip writer
computes each member's CRC-32 with zlib; for a checkpoint of many megabytes those two
passes are most of its CPU. Here each member's CRC-32 comes from ISA-L (about five times
zlib's speed on x86-64) before it is written, so the header carries it and the data goes
from the array's memory to the file once, through a stream that need not seek. Every
member uses ZIP64 sizes, so one layout serves members of any size; `np.load` and `zipfile`
read the result and check each CRC as usual.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Mapping
from typing import IO

import numpy as np
from isal import isal_zlib

_VERSION = 45  # ZIP64: the version a reader needs, and the one that made the file
_UNIX = 3
_DOS_DATE = (1 << 5) | 1  # 1980-01-01, the date `zipfile` gives a member without one
_UNKNOWN = 0xFFFFFFFF  # a 32-bit field whose value is in the ZIP64 extra field
_ZIP64_EXTRA = 0x0001
_MODE = 0o600 << 16  # rw for the owner, as `zipfile` writes a member made from data
_LOCAL = struct.Struct("<4s2B4HL2L2H")
_CENTRAL = struct.Struct("<4s4B4HL2L5H2L")
_LOCAL_SIZES = struct.Struct("<2H2Q")  # id, length, size, compressed size
_CENTRAL_SIZES = struct.Struct("<2H3Q")  # ..., and the local header's offset
_END64 = struct.Struct("<4sQ2H2L4Q")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END = struct.Struct("<4s4H2LH")


def _npy_header(array: np.ndarray) -> bytes:
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.getvalue()


def save(f: IO[bytes], arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` to `f` as an `.npz` (member `name.npy` per array, no pickle)."""
    offset, entries = 0, []
    for name, value in arrays.items():
        array = np.asarray(value)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} holds Python objects; only plain data is saved")
        filename, head = f"{name}.npy".encode(), _npy_header(array)
        data = array.reshape(-1).view(np.uint8).data
        crc = isal_zlib.crc32(data, isal_zlib.crc32(head))
        size = len(head) + data.nbytes
        local = _LOCAL.pack(
            b"PK\x03\x04", _VERSION, 0, 0, 0, 0, _DOS_DATE, crc, _UNKNOWN, _UNKNOWN,
            len(filename), _LOCAL_SIZES.size,
        )  # fmt: skip
        f.write(local + filename + _LOCAL_SIZES.pack(_ZIP64_EXTRA, 16, size, size) + head)
        f.write(data)
        entries.append((filename, crc, size, offset))
        offset += _LOCAL.size + len(filename) + _LOCAL_SIZES.size + size
    directory = bytearray()
    for filename, crc, size, at in entries:
        directory += _CENTRAL.pack(
            b"PK\x01\x02", _VERSION, _UNIX, _VERSION, 0, 0, 0, 0, _DOS_DATE, crc, _UNKNOWN,
            _UNKNOWN, len(filename), _CENTRAL_SIZES.size, 0, 0, 0, _MODE, _UNKNOWN,
        )  # fmt: skip
        directory += filename + _CENTRAL_SIZES.pack(_ZIP64_EXTRA, 24, size, size, at)
    end64_at = offset + len(directory)
    n = len(entries)
    directory += _END64.pack(
        b"PK\x06\x06", _END64.size - 12, _VERSION, _VERSION, 0, 0, n, n, len(directory), offset
    )
    directory += _END64_LOCATOR.pack(b"PK\x06\x07", 0, end64_at, 1)
    directory += _END.pack(b"PK\x05\x06", 0, 0, 0xFFFF, 0xFFFF, _UNKNOWN, _UNKNOWN, 0)
    f.write(directory)
