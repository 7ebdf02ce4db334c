"""paper-split: the 2012 paper's layout. Tower r on rank r; the towers exchange maps only at
conv3's, fc6's and fc7's inputs (all-gather) and fc8's input (tower 1's fc7 to tower 0, where fc8
and the loss live). On 2M ranks: M replicas of the two-tower net (a data x tower grid), tower links
inside a replica, each tower's gradients averaged over the replicas. On one process: both towers
in it, on cuda:0 and cuda:1 when two GPUs are visible, the links local copies."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet_mp.errors import UsageError
from alexnet_mp.links import LocalLink, ProcessLink
from alexnet_mp.model import PAPER, Piece, rows
from alexnet_mp.strategies.base import Setup, Strategy, sharded_classifier
from alexnet_mp.strategies.mesh import grid

TOWERS = PAPER.towers


def tower_piece(index: int) -> Piece:
    return Piece(index, (index, TOWERS))


class PaperSplit(Strategy):
    name = "paper-split"

    @classmethod
    def check(cls, world_size: int, setup: Setup) -> None:
        super().check(world_size, setup)
        if setup.arch != "paper":
            raise UsageError(f"--mode paper-split needs --arch paper (the owt net has one column); "
                             f"use --mode data-parallel or weird-trick for --arch {setup.arch}")
        if world_size != 1 and world_size % TOWERS:
            raise UsageError(f"--mode paper-split runs on 1 process or an even number (2 towers x replicas), "
                             f"not {world_size}; try --num_processes 2 or 4")

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.replicas = max(1, self.world_size // TOWERS)
        self.replica, tower = divmod(self.rank, TOWERS)
        self.data_group: dist.ProcessGroup | None = None
        if self.world_size == 1:
            self.build([tower_piece(t) for t in range(TOWERS)], self._local_devices())
            self.link = LocalLink(self.ledger)
        else:
            tower_group, self.data_group = grid(self.replicas, TOWERS, setup.timeout)
            self.build([tower_piece(tower)], [setup.device])
            self.link = ProcessLink(tower_group, self.ledger)
        self.sync = self.replicate_gradients(list(self.parameters()), self.data_group, average=True,
                                             name="gradients")

    def _local_devices(self) -> list[torch.device]:
        device = self.setup.device
        if device.type == "cuda" and torch.cuda.device_count() >= TOWERS:
            return [torch.device("cuda", t) for t in range(TOWERS)]
        return [device] * TOWERS

    @property
    def holds_fc8(self) -> bool:
        return self.pieces[0][0].fc_shard[0] == 0

    def batch_multiple(self) -> int:
        return self.replicas

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.replica, self.replicas)

    def label_rows(self, global_batch: int) -> slice:
        return self.image_rows(global_batch) if self.holds_fc8 else slice(0, 0)

    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        towers = self.modules()
        maps = [images.to(tower.fc6.weight.device, non_blocking=True) for tower in towers]
        for k, stage in enumerate(towers[0].conv_stages()):
            if k:
                maps = self.link.gather(maps, 1, f"{PAPER.convs[stage[0]].name}-input")
            maps = [tower.run_convs(x, stage) for tower, x in zip(towers, maps, strict=True)]
        features = self.link.gather([x.flatten(1) for x in maps], 1, "fc6-input")
        dropout = self.dropout(step, global_batch, self.image_rows(global_batch))
        return sharded_classifier(towers, features, self.link, dropout)

    def after_backward(self) -> None:
        if self.sync is not None:
            self.sync.wait()

    def holds_distinct_shard(self) -> bool:
        return self.replica == 0

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        return self.data_group, self.replicas
