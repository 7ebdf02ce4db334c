"""paper-split: the 2012 paper's layout. Tower r on rank r; the towers exchange maps only at the inputs
of the conv layers that read both towers (conv3), of fc6 and fc7 (all-gather) and of fc8 (tower 1's fc7
units to tower 0, where fc8 and the loss live). On 2M ranks: M replicas of the two-tower net (a data x
tower grid), tower links inside a replica, each tower's gradients averaged over its replicas. On one
process: both towers in it, in lockstep, on cuda:0 and cuda:1 when two GPUs are visible, the links
local copies."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alexnet_mp.blocks import Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic, both_ways
from alexnet_mp.errors import UsageError
from alexnet_mp.ledger import Ledger, metered
from alexnet_mp.links import Link
from alexnet_mp.model import ARCHITECTURES, PAPER, AlexNet, Architecture, conv_output_sides, tower_block
from alexnet_mp.strategies.base import Claim, Layout, link_inputs, shard_layers
from alexnet_mp.strategies.costs import FC_LINKS, Costs, fc_traffic, new_traffic, replicated_gradients_traffic
from alexnet_mp.strategies.mesh import grid
from alexnet_mp.strategies.single import REFERENCE_STEP

TOWERS = PAPER.towers


def tower_links(arch: Architecture) -> list[Link]:
    """Where the towers exchange maps: every conv layer that reads both towers' maps (groups=1 in the one-device
    net), fc6 (every tower's conv5 maps), then the FC layers' links."""
    shared = [Link(spec.name, 1) for spec in arch.convs[1:] if not spec.own_tower_only]
    return [*shared, Link("fc6", 1), *FC_LINKS]


def take_tower(model: AlexNet, index: int) -> AlexNet:
    """Tower `index` of the 2012 net, cut from the whole net in place: its half of every conv layer's maps and of
    fc6's and fc7's units, and fc8 on tower 0. What a rank of the paper split holds; its links are the layout's."""
    return shard_layers(model, PaperSplitCosts.shard, index, TOWERS)


class LockstepTowers(nn.Module):
    """Both towers in one process, as cuda-convnet ran them (one process, two GPUs): each layer runs on each
    tower in turn, and a layer that reads every tower's outputs gets them through its link among the towers.
    The towers are the net's chain of layers, sharded; only the links say where they meet."""

    def __init__(self, towers: list[AlexNet], links: list[Link], ledger: Ledger) -> None:
        super().__init__()
        self.towers = nn.ModuleList(towers)
        self.links = {link.layer: link for link in links}
        self.ledger = ledger

    def forward(self, images: Tensor) -> Tensor:
        maps = [images.to(next(tower.parameters()).device, non_blocking=True) for tower in self.towers]
        for name in dict(self.towers[0].named_children()):
            if name in self.links:
                with metered(self.ledger, self.links[name].name):
                    maps = self.links[name].among(maps)
            maps = [getattr(tower, name)(x) for tower, x in zip(self.towers, maps, strict=True)]
        return maps[0]


class PaperSplitCosts(Costs):
    @classmethod
    def parts(cls, world_size: int) -> int:
        return max(world_size, TOWERS)

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        return tower_block(key, shape, part % TOWERS)  # replicas of a tower hold the same

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        replica_batch = part_size(batch, parts // TOWERS)
        return replica_batch, replica_batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        replicas, tower = parts // TOWERS, part % TOWERS
        samples = part_size(batch, replicas)
        traffic = new_traffic()
        sides = conv_output_sides(arch)
        for i, spec in enumerate(arch.convs[1:], start=1):
            if not spec.own_tower_only:  # a link brings every tower's maps to this conv
                maps = arch.convs[i - 1].out_channels // TOWERS * sides[i - 1] ** 2
                both_ways(traffic, f"{spec.name}-input", maps * samples * (TOWERS - 1))
        both_ways(traffic, "fc6-input", arch.feature_size // TOWERS * samples * (TOWERS - 1))
        fc_traffic(traffic, arch, tower, TOWERS, samples)
        replicated_gradients_traffic(traffic, cls, arch, part, parts, batch, num_classes, replicas)
        return traffic


class PaperSplit(Layout):
    name = "paper-split"
    costs = PaperSplitCosts

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if ARCHITECTURES[config.arch].towers != TOWERS:
            raise UsageError(f"--mode paper-split needs --arch paper or paper-debug (two towers); the {config.arch} "
                             f"net has one column: use --mode data-parallel or weird-trick for it")
        if world_size != 1 and world_size % TOWERS:
            raise UsageError(f"--mode paper-split runs on 1 process or an even number (2 towers x replicas), "
                             f"not {world_size}; try --num_processes 2 or 4")

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        return cls.costs.parts(world_size) // TOWERS  # the replicas

    @classmethod
    def claims(cls, ranks: int) -> list[Claim]:
        if ranks == 1:
            return [Claim("paper-split in 1 process (towers as separate convs) vs single (grouped convs)",
                          cls.run_name(1), REFERENCE_STEP)]
        if ranks == TOWERS:
            return [Claim("paper-split on 2 ranks vs single on the same cores", cls.run_name(ranks), REFERENCE_STEP,
                          0.95, lambda ours, _: f"links blocked {1000 * ours.comm_wait_s:.1f} ms/step")]
        return []

    @property
    def replicas(self) -> int:
        return self.costs.parts(self.world_size) // TOWERS

    @property
    def replica(self) -> int:
        return self.rank // TOWERS

    def parallelize(self, model: AlexNet) -> nn.Module:
        links = tower_links(model.arch)
        self.data_group: dist.ProcessGroup | None = None
        if self.world_size == 1:
            wholes = [copy.deepcopy(model) for _ in range(TOWERS - 1)] + [model]
            towers = [self.place(take_tower(whole, t), device)
                      for t, (whole, device) in enumerate(zip(wholes, self._local_devices(), strict=True))]
            self.parts_held = list(enumerate(towers))
            return LockstepTowers(towers, links, self.ledger)
        tower_group, self.data_group = grid(self.replicas, TOWERS, self.timeout)
        tower = self.place(shard_layers(model, self.costs.shard, self.rank, self.world_size))
        link_inputs(tower, links, tower_group, self.ledger)
        self.parts_held = [(self.rank, tower)]
        # DDP over the replicas of this tower (a column of the grid), never over the world: there it would
        # average tower 0's gradients with tower 1's, which have the same shapes
        return self.replicate(tower, self.data_group, average=True, link="gradients")

    def _local_devices(self) -> list[torch.device]:
        if self.device.type == "cuda" and torch.cuda.device_count() >= TOWERS:
            return [torch.device("cuda", t) for t in range(TOWERS)]
        return [self.device] * TOWERS

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.replica, self.replicas)

    def label_rows(self, global_batch: int) -> slice:
        holds_fc8 = self.world_size == 1 or self.rank % TOWERS == 0
        return self.image_rows(global_batch) if holds_fc8 else slice(0, 0)

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        return self.data_group, self.replicas
