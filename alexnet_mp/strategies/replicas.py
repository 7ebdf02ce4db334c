"""DistributedDataParallel's communication hook for the layouts that replicate a part of the net
(`Layout.replicate`): torch's own bucketed all-reduce, counted in the layout's ledger."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet_mp.ledger import BACKWARD, Ledger, ring_all_reduce_elements


class MeteredAllReduce:
    """The state of `all_reduce_hook`, DistributedDataParallel's communication hook here: each bucket of
    replicated gradients is averaged over the group (each rank's loss is the mean over its own samples) or
    summed (each rank's loss term is already its part of the global mean: the weird trick's conv column),
    all-reduced asynchronously as DDP's default hook does, and counted in a ledger as `link`: the elements a
    ring all-reduce sends, the moment the first bucket leaves (the link's arrival), and as the time blocked,
    how long the last bucket's reduction outlasted the backward pass that produced it. DDP waits for the
    reductions inside backward, where no caller can time the wait itself; `settle` records it after."""

    def __init__(self, group: dist.ProcessGroup, average: bool, ledger: Ledger, link: str) -> None:
        self.group, self.average, self.ledger, self.link = group, average, ledger, link
        self.size = dist.get_world_size(group)
        self.last_ready: Any = None  # the ledger clock's stamp where the last bucket left
        self.done: list[Any] = []  # its stamps where each bucket's reduction was done

    def reduce(self, buffer: Tensor) -> torch.futures.Future[Tensor]:
        if self.average:
            buffer.div_(self.size)
        self.ledger.arrive(self.link, BACKWARD)
        self.ledger.record(0, self.link, BACKWARD, ring_all_reduce_elements(buffer.numel(), self.size),
                           buffer.element_size())
        self.last_ready = self.ledger.clock.stamp()
        return dist.all_reduce(buffer, group=self.group, async_op=True).get_future().then(self._done)

    def _done(self, future: torch.futures.Future[list[Tensor]]) -> Tensor:
        self.done.append(self.ledger.clock.stamp())  # on a GPU, a callback's stream waits for the reduction
        return future.value()[0]

    def settle(self) -> None:
        """After a backward pass: the time it was blocked on its last reduction, into the ledger."""
        if self.last_ready is not None and self.done:
            self.ledger.waited(self.link, BACKWARD, self.last_ready, self.ledger.clock.latest(self.done))
        self.last_ready, self.done = None, []


def all_reduce_hook(state, bucket):  # unannotated: DDP compares annotations it finds with its own types
    """DistributedDataParallel's communication hook: `MeteredAllReduce.reduce` of the bucket's flat buffer."""
    return state.reduce(bucket.buffer())
