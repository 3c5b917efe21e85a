"""A job's flat buffer split over S parameter servers: contiguous ranges balanced by bytes.

Shard s holds elements [bounds[s], bounds[s + 1]) of the model's flat buffer. A cut falls
between two tensors when one lies close to the even split, else inside a large tensor,
at a multiple of the chunk size. Each shard is an ordinary server whose job's layout
is its range: the tensors it holds whole keep their names and shapes, a tensor cut
across shards appears as a flat piece named ``name[start:stop]`` (element offsets within
that tensor). Optimisers and the sum act element by element, so S shards compute the
same numbers as one server, bit for bit.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass

from gradfleet.proto.v1 import parameter_server_pb2 as pb
from gradfleet.proto.wire import FlatLayout, TensorEntry, WireError

# A cut between tensors is taken when it is within this share of a shard's size from the
# even split; otherwise the cut goes inside a tensor, on a chunk boundary.
TENSOR_CUT_SLACK = 0.05


@dataclass(frozen=True)
class Partition:
    """Element bounds of S contiguous ranges: bounds[0] = 0 < ... < bounds[S] = total."""

    bounds: tuple[int, ...]

    def __post_init__(self) -> None:
        b = self.bounds
        if len(b) < 2 or b[0] != 0 or any(x >= y for x, y in itertools.pairwise(b)):
            raise WireError(
                "a partition is increasing element bounds from 0, one range per shard; "
                f"got {list(b)[:8]}"
            )

    @property
    def shards(self) -> int:
        return len(self.bounds) - 1

    @property
    def total_elements(self) -> int:
        return self.bounds[-1]

    def range(self, shard: int) -> tuple[int, int]:
        """[start, stop) elements of `shard`."""
        if not 0 <= shard < self.shards:
            raise WireError(f"shard {shard} is not one of the partition's {self.shards}")
        return self.bounds[shard], self.bounds[shard + 1]

    def to_proto(self, shard: int) -> pb.ShardInfo:
        return pb.ShardInfo(index=shard, count=self.shards, bounds=list(self.bounds))

    @classmethod
    def from_proto(cls, msg: pb.ShardInfo) -> tuple[Partition, int]:
        """(partition, this shard's index), checked."""
        partition = cls(tuple(int(b) for b in msg.bounds))
        if msg.count != partition.shards or not 0 <= msg.index < msg.count:
            raise WireError(
                f"shard {msg.index} of {msg.count} does not fit a partition of "
                f"{partition.shards} ranges"
            )
        return partition, int(msg.index)

    def layout(self, full: FlatLayout, shard: int) -> FlatLayout:
        """The layout of `shard`'s range of `full`: whole tensors and named pieces."""
        if full.total_elements != self.total_elements:
            raise WireError(
                f"the partition covers {self.total_elements} elements but the model has "
                f"{full.total_elements}"
            )
        start, stop = self.range(shard)
        entries, offset = [], 0
        for e in full.entries:
            lo, hi = max(start, e.offset), min(stop, e.offset + e.size)
            if lo >= hi:
                continue
            if (lo, hi) == (e.offset, e.offset + e.size):
                entries.append(TensorEntry(e.name, e.shape, offset))
            else:
                a, b = lo - e.offset, hi - e.offset
                entries.append(TensorEntry(f"{e.name}[{a}:{b}]", (hi - lo,), offset))
            offset += hi - lo
        return FlatLayout(full.dtype, tuple(entries))


def partition(layout: FlatLayout, shards: int, chunk_bytes: int) -> Partition:
    """`shards` contiguous ranges of `layout`'s flat buffer, balanced by bytes."""
    total = layout.total_elements
    if not 1 <= shards <= total:
        raise WireError(f"{total} elements cannot be split over {shards} shards")
    target = total / shards
    chunk = max(1, chunk_bytes // layout.dtype.itemsize)
    while chunk > 1 and chunk * 16 > target:  # shards of few chunks: finer cuts
        chunk //= 2
    tensor_cuts = [e.offset for e in layout.entries[1:]]
    bounds = [0]
    for s in range(1, shards):
        ideal = round(s * total / shards)
        cut = _nearest(tensor_cuts, ideal)
        if cut is None or abs(cut - ideal) > TENSOR_CUT_SLACK * target:
            cut = max(chunk, round(ideal / chunk) * chunk)  # inside a tensor, chunk-aligned
        cut = min(max(cut, bounds[-1] + 1), total - (shards - s))  # every range non-empty
        bounds.append(cut)
    bounds.append(total)
    return Partition(tuple(bounds))


def _nearest(sorted_values: list[int], target: int) -> int | None:
    i = bisect.bisect_left(sorted_values, target)
    near = sorted_values[max(0, i - 1) : i + 1]
    return min(near, key=lambda v: abs(v - target)) if near else None
