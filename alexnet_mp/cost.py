"""Analytic figures derived from the layer shapes alone: what each rank sends per step, per link.

`expected_traffic` is the count the links' ledger is tested against, and the count the cost model
uses to predict what cannot be run here.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from alexnet_mp.links import BACKWARD, FORWARD, ring_all_reduce_elements
from alexnet_mp.model import (
    ARCHITECTURES,
    FC_NAMES,
    IMAGE_SIZE,
    AlexNet,
    Architecture,
    Piece,
    conv_output_sides,
    conv_sides,
    part_size,
)

Traffic = dict[tuple[str, str], float]  # (link, direction) -> elements sent


def parameter_counts(arch: Architecture, num_classes: int, piece: Piece) -> tuple[int, int]:
    """(conv parameters, all parameters) of one piece, from shapes alone."""
    with torch.device("meta"):
        module = AlexNet(arch, num_classes, piece)
    conv = sum(p.numel() for name, p in module.named_parameters() if name.startswith("conv"))
    return conv, sum(p.numel() for p in module.parameters())


def _both_ways(traffic: Traffic, link: str, elements: float) -> None:
    traffic[link, FORWARD] += elements
    traffic[link, BACKWARD] += elements


def _sharded_fc(traffic: Traffic, arch: Architecture, shard: int, shards: int, samples: int) -> None:
    """fc7's input gathered from every shard; fc7's outputs gathered to shard 0 for fc8."""
    fc6_part, fc7_part = (part_size(units, shards) for units in arch.fc_units)
    _both_ways(traffic, "fc7-input", fc6_part * samples * (shards - 1))
    if shard == 0:
        traffic["fc8-input", BACKWARD] += fc7_part * samples * (shards - 1)
    else:
        traffic["fc8-input", FORWARD] += fc7_part * samples


def _paper_split(arch: Architecture, rank: int, world_size: int, batch: int, num_classes: int) -> Traffic:
    towers = arch.towers
    replicas = max(1, world_size // towers)
    samples = part_size(batch, replicas)
    tower = rank % towers
    traffic: Traffic = defaultdict(float)
    sides = conv_output_sides(arch)
    for i, spec in enumerate(arch.convs[1:], start=1):
        if not spec.own_tower_only:  # a link brings every tower's maps to this conv
            maps = arch.convs[i - 1].out_channels // towers * sides[i - 1] ** 2
            _both_ways(traffic, f"{spec.name}-input", maps * samples * (towers - 1))
    _both_ways(traffic, "fc6-input", arch.feature_size // towers * samples * (towers - 1))
    _sharded_fc(traffic, arch, tower, towers, samples)
    if replicas > 1:
        _, params = parameter_counts(arch, num_classes, Piece(tower, (tower, towers)))
        traffic["gradients", BACKWARD] += ring_all_reduce_elements(params, replicas)
    return traffic


def _data_parallel(arch: Architecture, rank: int, world_size: int, batch: int, num_classes: int) -> Traffic:
    traffic: Traffic = defaultdict(float)
    if world_size > 1:
        _, params = parameter_counts(arch, num_classes, Piece())
        traffic["gradients", BACKWARD] += ring_all_reduce_elements(params, world_size)
    return traffic


def _weird_trick(arch: Architecture, rank: int, world_size: int, batch: int, num_classes: int) -> Traffic:
    traffic: Traffic = defaultdict(float)
    own = part_size(batch, world_size)
    _both_ways(traffic, "fc6-input", arch.feature_size * own * (world_size - 1))
    _sharded_fc(traffic, arch, rank, world_size, batch)
    conv, _ = parameter_counts(arch, num_classes, Piece(None, (rank, world_size)))
    traffic["conv-gradients", BACKWARD] += ring_all_reduce_elements(conv, world_size)
    return traffic


_TRAFFIC = {"single": _data_parallel, "data-parallel": _data_parallel, "paper-split": _paper_split,
            "weird-trick": _weird_trick}


def expected_traffic(mode: str, arch: str, world_size: int, batch: int, num_classes: int = 1000) -> list[Traffic]:
    """Elements each rank sends in one training step, per (link, direction), rank by rank. The
    one-process paper split counts per tower, as if each tower were a rank. Every weird-trick
    exchange scheme moves the same elements, only in a different order."""
    pieces = ARCHITECTURES[arch].towers if mode == "paper-split" and world_size == 1 else world_size
    count = _TRAFFIC[mode]
    return [{key: value for key, value in count(ARCHITECTURES[arch], rank, max(world_size, pieces), batch,
                                                  num_classes).items() if value}
            for rank in range(pieces)]


@dataclass(frozen=True)
class LayerCost:
    name: str
    output_shape: tuple[int, ...]  # per image, the conv's or matrix product's output
    block_shape: tuple[int, ...]  # per image, after the layer's ReLU, LRN and pool: the next layer's input
    parameters: int
    flops: int  # forward, per image: 2 per multiply-add of the conv or matrix product


def layer_costs(arch: Architecture, num_classes: int = 1000, piece: Piece | None = None) -> list[LayerCost]:
    """Per layer of a piece (default: the whole net): output shape, parameters, forward FLOPs."""
    with torch.device("meta"):
        module = AlexNet(arch, num_classes, piece)
    costs = []
    for spec, (side, block) in zip(arch.convs, conv_sides(arch), strict=True):
        conv = getattr(module, spec.name)
        multiply_adds = conv.weight[0].numel() * conv.out_channels * side ** 2
        costs.append(LayerCost(spec.name, (conv.out_channels, side, side), (conv.out_channels, block, block),
                               _count(conv), 2 * multiply_adds))
    for name in FC_NAMES:
        layer = getattr(module, name)
        if layer is not None:
            shape = (layer.out_features,)
            costs.append(LayerCost(name, shape, shape, _count(layer), 2 * layer.weight.numel()))
    return costs


def _count(layer: torch.nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@dataclass(frozen=True)
class RankWork:
    """What one rank of a layout computes in a step: its piece of the net, and how many images its
    conv layers and its fully connected layers each see."""

    piece: Piece
    conv_samples: int
    fc_samples: int


def rank_work(mode: str, arch: str, rank: int, world_size: int, batch: int) -> RankWork:
    """The same division of work the strategies make (tested against them via the ledger's bytes)."""
    if mode in ("single", "data-parallel"):
        samples = part_size(batch, world_size)
        return RankWork(Piece(), samples, samples)
    if mode == "paper-split":
        towers = ARCHITECTURES[arch].towers
        samples = part_size(batch, max(1, world_size // towers))
        tower = rank % towers
        return RankWork(Piece(tower, (tower, towers)), samples, samples)
    if mode == "weird-trick":
        return RankWork(Piece(None, (rank, world_size)), part_size(batch, world_size), batch)
    raise ValueError(f"no cost model for mode {mode!r}")


def training_flops(work: RankWork, arch: str, num_classes: int = 1000) -> float:
    """FLOPs of one training step of a rank: forward plus a backward that costs twice the forward
    (one product for the input's gradient, one for the weights')."""
    return sum(3 * cost.flops * (work.conv_samples if cost.name.startswith("conv") else work.fc_samples)
               for cost in layer_costs(ARCHITECTURES[arch], num_classes, work.piece))


def memory_bytes(work: RankWork, arch: str, num_classes: int = 1000, bytes_per_element: int = 4,
                 ) -> dict[str, float]:
    """A rank's memory for training, by kind: weights, their gradients and the momentum (one copy
    each of the rank's parameters), and the activations autograd keeps at this batch (roughly: each
    layer's output and its block's output, plus the input images)."""
    architecture = ARCHITECTURES[arch]
    _, params = parameter_counts(architecture, num_classes, work.piece)
    activations = 3 * IMAGE_SIZE ** 2 * work.conv_samples
    for cost in layer_costs(architecture, num_classes, work.piece):
        samples = work.conv_samples if cost.name.startswith("conv") else work.fc_samples
        activations += (math.prod(cost.output_shape) + math.prod(cost.block_shape)) * samples
    weights = params * bytes_per_element
    return {"weights": weights, "gradients": weights, "momentum": weights,
            "activations": activations * bytes_per_element}
