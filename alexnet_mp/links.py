"""The communication links between the parts of a layout.

Each link is a small autograd Function of (tensor, dim, group) whose name says its forward and its
backward (after Megatron-LM's tensor_parallel/mappings.py); tests/test_links.py proves each backward
against autograd on one device. Plain `dist.*` calls inside a forward pass pass no gradient back.
Hand-written rather than torch's: `_functional_collectives.all_gather_tensor_autograd` has the
all-gather's backward but is private and has no gather to one rank, and every collective here is counted
(ledger.py: a link counts into the ledger its caller names with `metered`). Parts held by one process (the
one-process paper split) exchange by `torch.cat` and `.to()`, whose autograd backward sums and splits exactly
as the collectives' do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

from alexnet_mp.ledger import BACKWARD, FORWARD, Meter, current_meter


def _group_size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


class AllGatherForwardReduceScatterBackward(Function):
    """Forward: every rank gets all ranks' tensors concatenated along `dim`.
    Backward: every rank computed a gradient for the whole concatenation; the true gradient of
    its own part is the sum over ranks of that part, i.e. a reduce-scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group, ctx.meter = dim, group, current_meter()
        size = _group_size(group)
        # collectives take dense row-major tensors: channels_last maps are copied (conv3's input is
        # the only 4-D link), and conv3's channels_last weight restores the layout
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        with ctx.meter.waiting(FORWARD):
            dist.all_gather(parts, x, group=group)
        ctx.meter.sent(FORWARD, x.numel() * (size - 1), x.element_size())
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        size = _group_size(ctx.group)
        chunks = [chunk.contiguous() for chunk in grad.chunk(size, ctx.dim)]
        mine = torch.empty_like(chunks[0])
        with ctx.meter.waiting(BACKWARD):
            dist.reduce_scatter(mine, chunks, group=ctx.group)
        ctx.meter.sent(BACKWARD, mine.numel() * (size - 1), mine.element_size())
        return mine, None, None


class GatherToFirstForwardScatterBackward(Function):
    """Forward: the group's first rank gets all ranks' tensors concatenated along `dim`; the others get
    an empty tensor (their backward starts from it). Backward: the first rank sends every rank the
    gradient of its part."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group, ctx.meter = dim, group, current_meter()
        ctx.shape, first = x.shape, _group_rank(group) == 0
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(_group_size(group))] if first else None
        with ctx.meter.waiting(FORWARD):
            dist.gather(x, parts, dst=dist.get_global_rank(group, 0), group=group)
        if first:
            return torch.cat(parts, dim)
        ctx.meter.sent(FORWARD, x.numel(), x.element_size())
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        size, first = _group_size(ctx.group), _group_rank(ctx.group) == 0
        mine = grad.new_empty(ctx.shape)
        chunks = [chunk.contiguous() for chunk in grad.chunk(size, ctx.dim)] if first else None
        with ctx.meter.waiting(BACKWARD):
            dist.scatter(mine, chunks, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
        if first:
            ctx.meter.sent(BACKWARD, mine.numel() * (size - 1), mine.element_size())
        return mine, None, None


def all_gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return AllGatherForwardReduceScatterBackward.apply(x, dim, group)


def gather_to_first(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return GatherToFirstForwardScatterBackward.apply(x, dim, group)


def _count_local(meter: Meter, sender: int, x: Tensor, receivers: int, backward_sender: int) -> None:
    """What a part held in this process would send: forward now, backward when x's gradient is computed."""
    count = x.numel() * receivers
    meter.sent(FORWARD, count, x.element_size(), part=sender)
    if x.requires_grad:
        x.register_hook(lambda grad: meter.sent(BACKWARD, count, grad.element_size(), part=backward_sender))


def all_gather_among(parts: list[Tensor], dim: int) -> list[Tensor]:
    """`all_gather` among parts one process holds: each gets every part's tensor, on its own device."""
    meter = current_meter()
    for part, x in enumerate(parts):
        _count_local(meter, part, x, len(parts) - 1, part)
    return [torch.cat([p.to(x.device) for p in parts], dim) for x in parts]


def gather_to_first_among(parts: list[Tensor], dim: int) -> list[Tensor]:
    """`gather_to_first` among parts one process holds: the first gets every part's tensor; the others send
    theirs and get an empty tensor, and the first part sends each its gradient back."""
    meter = current_meter()
    for part, x in enumerate(parts[1:], start=1):
        _count_local(meter, part, x, 1, 0)
    return [torch.cat([p.to(parts[0].device) for p in parts], dim), *(x.new_empty(0) for x in parts[1:])]


@dataclass(frozen=True)
class Link:
    """Where a layout's parts exchange a tensor: at the input of `layer`, along `dim`. Every part gets every
    part's tensor (an all-gather) or, `to_first`, the first part alone (a gather: fc8's input, where fc8 and
    the loss live on the first part)."""

    layer: str
    dim: int
    to_first: bool = False

    @property
    def name(self) -> str:
        return f"{self.layer}-input"

    def over(self, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        """Across the ranks of `group`, one part each."""
        return (gather_to_first if self.to_first else all_gather)(x, self.dim, group)

    def among(self, parts: list[Tensor]) -> list[Tensor]:
        """Among parts held by this process."""
        return (gather_to_first_among if self.to_first else all_gather_among)(parts, self.dim)
