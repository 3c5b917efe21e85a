"""The wire codec: layouts, chunk framing and reassembly, including fuzzed input."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import (
    DATA_ALIGNMENT,
    MAX_UNKNOWN_FIELDS,
    ChunkAssembler,
    FlatLayout,
    WireError,
    as_bytes_view,
    decode_chunk_message,
    encode_chunk_message,
    iter_chunks,
    plan_chunk_bytes,
)


def test_layout_round_trips_through_proto_and_json() -> None:
    # prepare
    arrays = {"w": np.zeros((3, 4), np.float32), "b": np.zeros(4, np.float32)}
    # execute
    layout = FlatLayout.from_arrays(arrays)
    # assert
    assert FlatLayout.from_proto(layout.to_proto()) == layout
    assert FlatLayout.from_json(layout.to_json()) == layout
    assert layout.total_elements == 16 and layout.nbytes == 64
    assert [e.offset for e in layout.entries] == [0, 12]


def test_layout_with_a_hole_is_rejected() -> None:
    # prepare
    msg = pb.Layout(dtype=pb.DTYPE_FLOAT64)
    msg.tensors.add(name="a", shape=[2], offset=0)
    msg.tensors.add(name="b", shape=[2], offset=3)
    # execute / assert
    with pytest.raises(WireError, match="back to back"):
        FlatLayout.from_proto(msg)


def test_views_write_through_to_the_flat_buffer() -> None:
    # prepare
    layout = FlatLayout.from_arrays({"w": np.zeros((2, 2)), "b": np.zeros(2)})
    flat = layout.empty()
    flat[:] = 0
    # execute
    layout.views(flat)["b"][:] = 7.0
    # assert
    assert flat.tolist() == [0, 0, 0, 0, 7, 7]


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(allow_nan=False, width=32), min_size=1, max_size=300),
    chunk=st.integers(min_value=4, max_value=256),
    order=st.randoms(use_true_random=False),
)
def test_any_chunking_in_any_order_reassembles_exactly(values, chunk, order) -> None:
    # prepare
    src = np.array(values, dtype=np.float32)
    chunk -= chunk % 4
    messages = [
        encode_chunk_message(off, piece) for off, piece in iter_chunks(as_bytes_view(src), chunk)
    ]
    order.shuffle(messages)
    out = np.empty_like(src)
    assembler = ChunkAssembler(out)
    # execute
    for raw in messages:
        _, offset, data = decode_chunk_message(raw)
        assembler.add(offset, data)
    assembler.finish()
    # assert
    assert out.tobytes() == src.tobytes()


def test_scattered_tiny_chunks_merge_and_a_push_may_not_scatter_without_bound() -> None:
    # prepare: 4-byte chunks, every even one first, then the odd ones
    src = np.arange(2 * ChunkAssembler.MAX_RANGES, dtype=np.float32)
    order = [*range(0, src.size, 2), *range(1, src.size, 2)]
    out = np.empty_like(src)
    assembler = ChunkAssembler(out)
    # execute: all the even ones leave MAX_RANGES separate ranges; the odd ones join them
    for i in order:
        assembler.add(4 * i, src[i : i + 1].tobytes())
    assembler.finish()
    # assert: exact, merged into one range; one more scattered range is refused
    assert out.tobytes() == src.tobytes() and len(assembler._starts) == 1
    wider = ChunkAssembler(np.empty(2 * ChunkAssembler.MAX_RANGES + 2, dtype=np.float32))
    for i in range(0, 2 * ChunkAssembler.MAX_RANGES, 2):
        wider.add(4 * i, b"\0" * 4)
    with pytest.raises(WireError, match="separate byte ranges"):
        wider.add(4 * (2 * ChunkAssembler.MAX_RANGES), b"\0" * 4)
    with pytest.raises(WireError, match="overlaps"):
        wider.add(4 * 2, b"\0" * 8)


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=64))
def test_decoding_random_bytes_raises_only_wire_errors(raw: bytes) -> None:
    # execute / assert: either a parse or a WireError, never another exception
    try:
        _, offset, data = decode_chunk_message(raw)
    except WireError:
        return
    assert isinstance(offset, int) and data.nbytes <= len(raw)


@settings(max_examples=200, deadline=None)
@given(
    header=st.binary(max_size=300),
    offset=st.integers(min_value=0, max_value=1 << 62),
    data=st.binary(min_size=1, max_size=600),
)
def test_chunk_data_starts_16_byte_aligned_and_parses_as_protobuf(
    header: bytes, offset: int, data: bytes
) -> None:
    # execute
    message = encode_chunk_message(offset, data, header)
    _, got_offset, got_data = decode_chunk_message(message)
    parsed = pb.PullWeightsResponse.FromString(message) if not header else None
    # assert: the data ends the message and begins on a 16-byte boundary of it
    assert (len(message) - got_data.nbytes) % DATA_ALIGNMENT == 0
    assert bytes(got_data) == data and got_offset == offset
    if parsed is not None:  # any header bytes would have to be a valid WeightsHeader
        assert parsed.data == data and parsed.offset == offset


def test_received_gradient_floats_are_aligned() -> None:
    # prepare: a header whose length leaves the data unaligned without padding
    grad = np.arange(1000, dtype=np.float32)
    header = pb.PushHeader(job_id="j", worker=1, step=3, total_bytes=grad.nbytes)
    # execute: a received message is a fresh bytes object, as grpcio hands it over
    message = bytes(
        bytearray(encode_chunk_message(0, as_bytes_view(grad), header.SerializeToString()))
    )
    _, _, data = decode_chunk_message(message)
    # assert
    floats = np.frombuffer(data, dtype=np.float32)
    assert floats.flags.aligned and np.array_equal(floats, grad)


def test_small_payloads_go_as_one_message() -> None:
    # execute / assert
    assert plan_chunk_bytes(1000, 1 << 20, 4) == 1000
    assert plan_chunk_bytes(64 << 20, 1 << 20, 4) == 1 << 20
    assert plan_chunk_bytes(10_000, 1001, 8) == 1000


def test_unknown_fields_are_skipped_up_to_a_bound() -> None:
    # prepare: a chunk message followed by varint fields numbered 9 (unknown here)
    message = encode_chunk_message(8, np.ones(4, np.float32).tobytes())
    unknown = b"\x48\x01"  # field 9, varint 1
    # execute / assert: a few are skipped as protobuf allows; a flood is refused
    _, offset, data = decode_chunk_message(message + unknown * MAX_UNKNOWN_FIELDS)
    assert offset == 8 and data.nbytes == 16
    with pytest.raises(WireError, match="unknown fields"):
        decode_chunk_message(message + unknown * (MAX_UNKNOWN_FIELDS + 2))
