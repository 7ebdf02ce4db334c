"""data-parallel: a full replica per rank (DistributedDataParallel), each rank a contiguous slice of the
global batch, gradients averaged over the ranks (each rank's loss is the mean over its slice)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.cost import Traffic
from alexnet_mp.model import AlexNet, Architecture
from alexnet_mp.strategies.base import Layout
from alexnet_mp.strategies.costs import Costs, new_traffic, replicated_gradients_traffic


class DataParallelCosts(Costs):
    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        return WHOLE

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return part_size(batch, parts), part_size(batch, parts)

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        traffic = new_traffic()
        replicated_gradients_traffic(traffic, cls, arch, part, parts, batch, num_classes, replicas=parts)
        return traffic


class DataParallel(Layout):
    name = "data-parallel"
    costs = DataParallelCosts

    def parallelize(self, model: AlexNet) -> nn.Module:
        model = self.place(model)
        self.parts_held = [(self.rank, model)]
        return self.replicate(model, dist.group.WORLD if self.world_size > 1 else None, average=True, link="gradients")

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return self.image_rows(global_batch)

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        return dist.group.WORLD, self.world_size
