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
