"""A toy layout, whole in this one module as every layout is: each rank runs the convs on its slice of the
global batch (replicated, their gradients summed), sends its conv features to the first rank through a real
link, and the first rank alone holds the FC layers and the loss. Its option asks each rank's slice to split
into equal parts: an option with a check of its own. tests/toy_train.py is the one registry line."""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic, parameters
from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import POSITIVE_INT
from alexnet_mp.ledger import BACKWARD, FORWARD, metered, ring_all_reduce_elements
from alexnet_mp.links import Link
from alexnet_mp.model import AlexNet, Architecture
from alexnet_mp.strategies import Layout, Option
from alexnet_mp.strategies.base import shard_layers
from alexnet_mp.strategies.costs import Costs, new_traffic

SLICES = Option("toy_slices", "equal parts each rank's share of the global batch must split into", 1,
                parse=POSITIVE_INT, label="{} slices", compared=(1, 2))
FEATURES = Link("fc6", 0, to_first=True)  # every rank's conv features, along the batch, to the first rank


class FeaturesToFirst(nn.Module):
    def __init__(self, layout: Layout) -> None:
        super().__init__()
        self.layout = layout

    def forward(self, features: Tensor) -> Tensor:
        with metered(self.layout.ledger, FEATURES.name):
            return FEATURES.over(features, dist.group.WORLD)


class ConvsApartCosts(Costs):
    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        return WHOLE if key.startswith("conv") or part == 0 else None

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return part_size(batch, parts), batch if part == 0 else 0

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        traffic = new_traffic()
        features = arch.feature_size * part_size(batch, parts)
        if part == 0:
            traffic[FEATURES.name, BACKWARD] += features * (parts - 1)  # each rank's features' gradient
        else:
            traffic[FEATURES.name, FORWARD] += features
        conv = parameters(cls.work(arch.name, part, parts, batch, num_classes), arch, num_classes, "conv")
        traffic["conv-gradients", BACKWARD] += ring_all_reduce_elements(conv, parts)
        return traffic


class ConvsApart(Layout):
    name = "toy-convs-apart"
    options = (SLICES,)
    costs = ConvsApartCosts

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if world_size < 2:
            raise UsageError(f"--mode {cls.name} needs 2 or more processes")

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        return world_size * SLICES.value(config.options)

    def parallelize(self, model: AlexNet) -> nn.Module:
        column = self.place(shard_layers(model, self.costs.shard, self.rank, self.world_size))
        self.parts_held = [(self.rank, column)]
        names = list(column._modules)
        convs, head = (nn.Sequential(OrderedDict((name, column.get_submodule(name)) for name in chosen))
                       for chosen in (names[:names.index("fc6")], names[names.index("fc6"):]))
        convs = self.replicate(convs, dist.group.WORLD, average=False, link="conv-gradients")
        return nn.Sequential(OrderedDict(convs=convs, features=FeaturesToFirst(self),
                                         head=head if self.rank == 0 else nn.Identity()))

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.rank == 0 else slice(0, 0)

    def dropout_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)
