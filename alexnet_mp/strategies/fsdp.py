"""fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) over every rank. Each rank computes the whole net on
its slice of the global batch, as in data-parallel, but holds 1/N of every parameter, gradient and
momentum buffer: each layer is a unit whose parameters are all-gathered before its forward, freed after
it (reshard_after_forward) and all-gathered again before its backward, and whose gradients are
reduce-scattered (averaged: each rank's loss is the mean over its samples) as soon as they are computed.
Under --mixed-precision the units gather their parameters in bf16 (or fp16) and reduce gradients in
float32 (MixedPrecisionPolicy)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

from alexnet_mp.blocks import Block
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import RankWork, Traffic, both_ways
from alexnet_mp.errors import UsageError
from alexnet_mp.ledger import BACKWARD, FORWARD, Ledger
from alexnet_mp.malloc import mapped_afresh
from alexnet_mp.model import ARCHITECTURES, AlexNet, Architecture, full_shapes
from alexnet_mp.speed import COMPUTE_DTYPES
from alexnet_mp.strategies.base import Claim, bytes_on_rank_0
from alexnet_mp.strategies.costs import PartTimes, new_traffic, split_by
from alexnet_mp.strategies.data_parallel import DataParallel, DataParallelCosts

PARAMETERS, GRADIENTS = "parameters", "gradients"  # the ledger's links: all-gathers, and reduce-scatters


class Phase:
    """Whether the step is in its forward pass or its backward, for the ledger's direction of an all-gather."""

    direction = FORWARD


# Private bases: FSDP2's only hook on its collectives (set_custom_all_gather / set_custom_reduce_scatter take
# them); CommDebugMode sees FSDP's collectives too, but counts calls, not what they move.
class MeteredAllGather(DefaultAllGather):
    """FSDP2's all-gather of a unit's parameters, counted: each rank sends its shard to every other rank."""

    def __init__(self, ledger: Ledger, phase: Phase) -> None:
        super().__init__()
        self.ledger, self.phase = ledger, phase

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 async_op: bool = False) -> dist.Work | None:
        direction = self.phase.direction
        self.ledger.record(0, PARAMETERS, direction, input_tensor.numel() * (group.size() - 1),
                           input_tensor.element_size())
        with self.ledger.waiting(PARAMETERS, direction):  # the whole of it where synchronous (gloo, here)
            return super().__call__(output_tensor, input_tensor, group, async_op)


class MeteredReduceScatter(DefaultReduceScatter):
    """FSDP2's reduce-scatter of a unit's gradients, counted: each rank sends every other rank its part."""

    def __init__(self, ledger: Ledger) -> None:
        super().__init__()
        self.ledger = ledger

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: object, async_op: bool = False) -> dist.Work | None:
        self.ledger.record(0, GRADIENTS, BACKWARD, output_tensor.numel() * (group.size() - 1),
                           output_tensor.element_size())
        with self.ledger.waiting(GRADIENTS, BACKWARD):
            return super().__call__(output_tensor, input_tensor, group, op, async_op)


def unit_weights(arch: str, num_classes: int) -> dict[str, int]:
    """The elements of each unit's (each layer's) weight, the bulk of what a unit gathers."""
    return {key.removesuffix(".weight"): shape.numel() for key, shape in full_shapes(arch, num_classes).items()
            if key.endswith(".weight")}


def unit_peak(whole: int, after: int, shard: int) -> int:
    """The elements a rank holds at a unit's backward beyond its shards of the parameters and of the gradients from
    that unit on (what `cost.memory_bytes` counts there), given the unit's `whole` weight, the whole weight of the
    unit `after` it (whose backward ran before) and the unit's `shard` of it: the larger of two moments. In the
    unit's backward, its whole weight and gradient and the reduce-scatter input the unit after it left (FSDP keeps
    the latest one until the next unit's reduce-scatter), less its gradient's shard, not made yet. In its
    reduce-scatter, the input and gloo's copy of it (NCCL makes none)."""
    return 2 * whole + max(after - shard, 0)


class FSDPCosts(DataParallelCosts):
    @classmethod
    def collective(cls, link: str, direction: str) -> str:
        return "all-gather-single" if link == PARAMETERS else "reduce-scatter-single"  # FSDP2's flat buffers

    @classmethod
    def call_elements(cls, link: str, elements: float, world_size: int, config: TrainConfig,
                      parameters: Mapping[str, int]) -> list[float]:
        """One call per layer unit, each direction, each its unit's share of the parameters: fc6's is most of them."""
        return split_by(elements, list(parameters.values()))

    @classmethod
    def beside_compute_s(cls, part: PartTimes, world_size: int, config: TrainConfig,
                         blocking: bool) -> dict[tuple[str, str], float]:
        """Where collectives run beside the compute (NCCL), FSDP prefetches: each unit's all-gather runs during the
        unit before's compute, so a pass waits for its first unit's gather (a unit's share, on average) and for
        whatever of its gathers the pass's compute cannot cover; the backward's reduce-scatters share that cover.
        Over gloo each collective blocks the host."""
        if blocking:
            return {}
        units = len(ARCHITECTURES[config.arch].layer_names)
        gathers, in_backward = part.comm.get((PARAMETERS, FORWARD), 0.0), part.comm.get((PARAMETERS, BACKWARD), 0.0)
        reduces = part.comm.get((GRADIENTS, BACKWARD), 0.0)
        covered = in_backward + reduces - max(in_backward / units, in_backward + reduces - part.backward_s)
        return {(PARAMETERS, FORWARD): gathers - max(gathers / units, gathers - part.forward_s),
                **{key: covered * part.comm.get(key, 0.0) / (in_backward + reduces)
                   for key in ((PARAMETERS, BACKWARD), (GRADIENTS, BACKWARD)) if in_backward + reduces}}

    @classmethod
    def placed(cls, link: str, direction: str, config: TrainConfig) -> list[tuple[str, bool, float]]:
        """Unit by unit, each its weight's share: its parameters gathered before its forward and again before its
        backward, its gradients reduce-scattered after its backward."""
        weights = unit_weights(config.arch, config.num_classes)
        return [(layer, link == PARAMETERS, weight / sum(weights.values())) for layer, weight in weights.items()]

    @classmethod
    def holds_dtensors(cls, layer: str) -> bool:
        return True  # fully_shard makes every parameter a DTensor sharded along dim 0

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        """The rows `torch.chunk` gives a part, as fully_shard splits dim 0: ceil(rows / parts) each, the last
        part fewer (or none)."""
        size = -(-shape[0] // parts)
        start = min(part * size, shape[0])
        return (slice(start, min(start + size, shape[0])),)

    @classmethod
    def work(cls, arch: str, part: int, parts: int, batch: int, num_classes: int = 1000) -> RankWork:
        """Every layer computed whole (on this rank's samples), 1/N of it held, and its whole unit held at its
        backward (`unit_peak`)."""
        held = super().work(arch, part, parts, batch, num_classes)
        weights = unit_weights(arch, num_classes)
        after = [*list(weights.values())[1:], 0]
        return RankWork(dict.fromkeys(held.shares, 1.0), held.conv_samples, held.fc_samples, held=held.shares,
                        gathered={name: unit_peak(whole, later, round(held.shares[name] * whole))
                                  for (name, whole), later in zip(weights.items(), after, strict=True)})

    @classmethod
    def gradient_additions(cls, layer: str, world_size: int, config: TrainConfig, part_traffic: Traffic,
                           parameters: Mapping[str, int]) -> int:
        """None: no bucket holds a gradient; each unit's whole gradient is reduce-scattered into a new shard."""
        return cls.passes(layer, world_size, config) - 1

    @classmethod
    def fresh_bytes(cls, arch: Architecture, num_classes: int) -> dict[tuple[str, str], float]:
        """Each unit a block mapped afresh (`malloc.mapped_afresh`), three times a step: copied into its unsharded
        parameters from its gathers, before its forward and again before its backward, and its gradient into the
        reduce-scatter's input after its backward. The all-gather's and reduce-scatter's outputs are fresh inside the
        collectives' calibrated time (calibrate times the flat forms into fresh tensors), the whole gradient among the
        layer's own blocks (calibrate's `fresh_bytes`)."""
        weights = unit_weights(arch.name, num_classes)
        units = {name: elements * torch.float32.itemsize for name, elements in weights.items()}
        return {key: copies * unit for name, unit in units.items() if mapped_afresh(unit)
                for key, copies in (((name, FORWARD), 1), ((name, BACKWARD), 2))}

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        """Per step, every unit's parameters all-gathered twice (forward, and again for backward) and its
        gradients reduce-scattered once; a shard is ceil(rows / N) rows, padded to it where N does not divide
        them, and each rank sends its shard to each of the N-1 others."""
        traffic = new_traffic()
        shapes = full_shapes(arch.name, num_classes).values()
        shards = sum(-(-shape[0] // parts) * shape[1:].numel() for shape in shapes)
        both_ways(traffic, PARAMETERS, shards * (parts - 1))
        traffic[GRADIENTS, BACKWARD] += shards * (parts - 1)
        return traffic


class FSDP(DataParallel):
    """data-parallel's rows and loss, its state sharded."""

    name = "fsdp"
    costs = FSDPCosts

    @classmethod
    def claims(cls, ranks: int) -> list[Claim]:
        def detail(ours: Any, theirs: Any) -> str:
            return (f"peak MiB per rank (largest) {max(ours.peak_memory_mb):.0f} vs {max(theirs.peak_memory_mb):.0f}; "
                    f"{bytes_on_rank_0(ours, theirs)}")

        if ranks == 1:
            return []
        return [Claim(f"fsdp vs data-parallel at {ranks} ranks: speed (memory and bytes in the detail)",
                      cls.run_name(ranks), DataParallel.run_name(ranks), detail=detail)]

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if world_size < 2:
            raise UsageError("--mode fsdp shards the net over 2 or more processes; use --mode single for one")

    def parallelize(self, model: AlexNet) -> nn.Module:
        model = self.place(model)
        self.parts_held = [(self.rank, model)]
        mesh = DeviceMesh.from_group(dist.group.WORLD, self.device.type)
        precision = COMPUTE_DTYPES.get(self.config.mixed_precision)  # None for "no": float32 throughout
        policy = MixedPrecisionPolicy(param_dtype=precision, reduce_dtype=torch.float32 if precision else None)
        self.phase = Phase()
        for layer in model.layers().values():
            fully_shard(layer, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
            layer.set_custom_all_gather(MeteredAllGather(self.ledger, self.phase))
            layer.set_custom_reduce_scatter(MeteredReduceScatter(self.ledger))
        return fully_shard(model, mesh=mesh, reshard_after_forward=True, mp_policy=policy)

    @contextmanager
    def counting(self, direction: str) -> Iterator[None]:
        self.phase.direction = direction
        yield
