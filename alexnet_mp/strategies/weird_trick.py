"""weird-trick: the layout of Krizhevsky 2014, "One weird trick for parallelizing convolutional
neural networks". The conv layers are data parallel (replicated, each rank its own slice of the batch,
gradients summed); fc6 and fc7 are model parallel (rank r holds 1/N of their units) and see every
rank's samples; fc8 lives whole on rank 0 with the loss over the global batch, as in
cuda-convnet2's layers-imagenet-4gpu-data-model.cfg.

--exchange all            (scheme a) one all-gather of every rank's conv features;
--exchange one-at-a-time  (scheme b) rank j's features in round j; fc6 runs on each round as it
                          arrives, a rank's own round first, so the transfers overlap fc6's work;
--exchange slice          (scheme c) the j-th 1/N of every rank's features in round j, then as (b).
In (b) and (c) fc7 and fc8 then run once over the whole global batch, as in (a).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic, both_ways, parameters
from alexnet_mp.errors import UsageError
from alexnet_mp.links import BACKWARD, LinearOverRounds, Link, RoundExchange, ring_all_reduce_elements
from alexnet_mp.model import ARCHITECTURES, AlexNet, Architecture
from alexnet_mp.strategies.base import FC_LINKS, Strategy, fc_traffic, link_inputs, new_traffic, shard_layers

ALL = "all"  # scheme (a), the default
EXCHANGES = (ALL, *RoundExchange.SCHEMES)


class WeirdTrick(Strategy):
    name = "weird-trick"
    options = ("exchange",)
    compared = {"exchange": EXCHANGES}

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if config.exchange not in (None, *EXCHANGES):
            raise UsageError(f"--exchange {config.exchange} is not one of: {', '.join(EXCHANGES)}")
        if world_size < 2:
            raise UsageError("--mode weird-trick needs 2 or more processes; use --mode single for one")
        widths = ARCHITECTURES[config.arch].fc_units
        if any(width % world_size for width in widths):
            working = [n for n in (1, 2, 4, 8, 16, 32) if all(w % n == 0 for w in widths)]
            raise UsageError(f"--mode weird-trick splits fc6/fc7 ({widths[0]} units) into equal shards: "
                             f"{world_size} ranks do not divide them; use one of {working}")

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        # scheme (c) sends 1/N of every rank's slice per round
        return world_size ** 2 if config.exchange == "slice" else world_size

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        layer = key.split(".")[0]
        if layer == "fc8":
            return WHOLE if part == 0 else None
        if layer in ("fc6", "fc7"):
            return (rows(shape[0], part, parts),)
        return WHOLE

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return part_size(batch, parts), batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        """Every exchange scheme moves the same elements, only in a different order."""
        traffic = new_traffic()
        both_ways(traffic, "fc6-input", arch.feature_size * part_size(batch, parts) * (parts - 1))
        fc_traffic(traffic, arch, part, parts, batch)
        conv = parameters(cls.work(arch.name, part, parts, batch, num_classes), arch, num_classes, "conv")
        traffic["conv-gradients", BACKWARD] += ring_all_reduce_elements(conv, parts)
        return traffic

    def parallelize(self, model: AlexNet) -> nn.Module:
        group, scheme = dist.group.WORLD, self.config.exchange or ALL
        column = shard_layers(model, self.shard, self.rank, self.world_size)
        links = [Link("fc6", 0), *FC_LINKS] if scheme == ALL else list(FC_LINKS)
        if scheme != ALL:  # fc6 takes the exchange into its own forward, to work while it travels
            column.fc6 = LinearOverRounds(column.fc6, scheme, group, self.ledger, Link("fc6", 0).name)
        column = self.place(column)
        link_inputs(column, links, group, self.ledger)
        self.parts_held = [(self.rank, column)]
        fc_shards = [name for name, _ in column.named_parameters() if name.startswith("fc")]
        # The conv column is replicated; each rank's gradient is already its part of the global-mean loss's:
        # sum, don't average. The FC shards are this rank's own.
        return self.replicate(column, group, average=False, link="conv-gradients", local=fc_shards)

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.rank == 0 else slice(0, 0)

    def dropout_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)  # the FC layers see every rank's samples
