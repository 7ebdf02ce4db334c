"""data-parallel: a full replica per rank, each rank a contiguous slice of the global batch,
gradients averaged over the ranks (each rank's loss is the mean over its slice)."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from alexnet_mp.model import Piece, rows
from alexnet_mp.strategies.base import Setup, Strategy


class DataParallel(Strategy):
    name = "data-parallel"

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.build([Piece()], [setup.device])
        group = dist.group.WORLD if self.world_size > 1 else None
        self.sync = self.replicate_gradients(list(self.parameters()), group, average=True, name="gradients")

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    label_rows = image_rows

    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        (net,) = self.modules()
        return net(images, self.dropout(step, global_batch, self.image_rows(global_batch)))

    def after_backward(self) -> None:
        if self.sync is not None:
            self.sync.wait()

    def holds_distinct_shard(self) -> bool:
        return self.rank == 0

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        return dist.group.WORLD, self.world_size
