"""Blocks of the whole net's tensors: how a layout's parts hold state, and how their states merge.

A part of a layout holds, of each of the whole net's parameters, one block (a slice per leading
dimension: a tower's output channels, a shard's units) or none. So converting between layouts is
slicing and placing, exactly: a checkpoint stores each part's blocks, and any layout takes its own
out of the whole tensors they make up.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor

Block = tuple[slice, ...]  # one slice per leading dimension of the whole tensor; the rest are whole
WHOLE: Block = ()


def part_size(total: int, count: int) -> int:
    if total % count:
        raise ValueError(f"{total} does not split into {count} equal parts")
    return total // count


def rows(total: int, index: int, count: int) -> slice:
    """The contiguous block of `total` rows (channels, units, samples) that part `index` of `count` holds."""
    size = part_size(total, count)
    return slice(index * size, (index + 1) * size)


def local(tensor: Tensor) -> Tensor:
    """The values this rank holds of a tensor: a DTensor's local shard (a view: writing it writes the
    DTensor), any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def as_ranges(block: Block, shape: torch.Size) -> list[tuple[int, int]]:
    """(start, stop) in every dimension of a tensor of `shape`."""
    return [s.indices(size)[:2] for s, size in zip(block, shape, strict=False)] + [(0, n) for n in shape[len(block):]]


def copy_overlap(target: Tensor, target_block: Block, source: Tensor, source_block: Block, shape: torch.Size) -> None:
    """Into `target` (block `target_block` of a whole tensor of `shape`), the values of `source` (block
    `source_block` of it) where the two blocks overlap."""
    overlap = [(max(a, c), min(b, d)) for (a, b), (c, d) in zip(as_ranges(target_block, shape),
                                                                  as_ranges(source_block, shape), strict=True)]
    if any(start >= stop for start, stop in overlap):
        return
    into = tuple(slice(start - a, stop - a) for (start, stop), (a, _) in zip(overlap, as_ranges(target_block, shape),
                                                                          strict=True))
    out_of = tuple(slice(start - c, stop - c) for (start, stop), (c, _) in zip(overlap, as_ranges(source_block, shape),
                                                                            strict=True))
    target[into] = source[out_of]


def block_as_offsets(block: Block, shape: torch.Size) -> tuple[tuple[int, int], ...]:
    """(start, stop) per leading dimension: a block as plain numbers, for a file."""
    return tuple(s.indices(size)[:2] for s, size in zip(block, shape, strict=False))


def offsets_as_block(offsets: Iterable[tuple[int, int]]) -> Block:
    return tuple(slice(start, stop) for start, stop in offsets)


def merge(blocks: Iterable[tuple[str, Block, Tensor]], shapes: Mapping[str, torch.Size]) -> dict[str, Tensor]:
    """The whole tensors (of `shapes`) that (key, block, tensor) triples make up together. A block held by several
    parts (replicas) may come more than once: they hold the same values. A key no block covers is left out."""
    whole: dict[str, Tensor] = {}
    for key, block, tensor in blocks:
        if key not in whole:
            whole[key] = tensor.new_empty(shapes[key])
        whole[key][block] = tensor
    return whole
