"""tensor-parallel: the Megatron form of the 2014 paper's idea, on DTensor (`parallelize_module` over a 1-D
DeviceMesh of every rank). The conv layers are data parallel, as in the weird trick: replicated, each rank
its own slice of the batch, their gradients summed (DistributedDataParallel; each rank's loss term is
already its part of the global mean). fc6 is column-parallel: its input, every rank's conv features, is
all-gathered along the batch (Shard(0) to Replicate; backward: reduce-scatter), and each rank computes
1/N of its units for the whole global batch. fc7 is row-parallel: each rank multiplies its fc6 units by
its rows of fc7's inputs, and one all-reduce sums the partial outputs (backward: nothing moves). fc8 and
the loss are replicated: every rank holds fc7's whole output and computes the same logits, loss and fc8
gradients, so nothing else moves. Against the weird trick: one all-reduce of fc7's output instead of an
all-gather of fc6's units and a gather of fc7's to rank 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic
from alexnet_mp.ledger import FORWARD, Ledger, ring_all_reduce_elements
from alexnet_mp.model import AlexNet, Architecture
from alexnet_mp.strategies.base import Layout, check_fc_units_split, set_dropout_units
from alexnet_mp.strategies.costs import CONV_FEATURES, Costs, data_parallel_convs_traffic

# The collectives DTensor issues here, by kind: each happens at one place.
LINKS = {"all-gather": CONV_FEATURES.name, "reduce-scatter": CONV_FEATURES.name, "all-reduce": "fc7-output"}
# The layers DTensor splits (their parameters DTensors, fc7's bias a replicated one); the rest stay plain tensors.
PLAN = {"fc6": ColwiseParallel(input_layouts=Shard(0)), "fc7": RowwiseParallel()}


class TensorParallelCosts(Costs):
    @classmethod
    def collective(cls, link: str, direction: str) -> str:
        if link == LINKS["all-reduce"]:
            return "all-reduce"
        return "all-gather-single" if direction == FORWARD else "reduce-scatter-single"  # DTensor's, flat

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        layer, kind = key.split(".")
        if layer == "fc6":  # column-parallel: its output units, the rows of its weight and bias
            return (rows(shape[0], part, parts),)
        if (layer, kind) == ("fc7", "weight"):  # row-parallel: its input units, the columns of its weight
            return slice(0, shape[0]), rows(shape[1], part, parts)
        return WHOLE

    @classmethod
    def holds_dtensors(cls, layer: str) -> bool:
        return layer in PLAN

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return part_size(batch, parts), batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        traffic = data_parallel_convs_traffic(cls, arch, part, parts, batch, num_classes)
        traffic["fc7-output", FORWARD] += ring_all_reduce_elements(arch.fc_units[1] * batch, parts)
        return traffic


class TensorParallel(Layout):
    name = "tensor-parallel"
    costs = TensorParallelCosts

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        check_fc_units_split(cls.name, world_size, config)

    def parallelize(self, model: AlexNet) -> nn.Module:
        set_dropout_units(model, self.costs.shard, self.rank, self.world_size)
        model = self.place(model)
        mesh = DeviceMesh.from_group(dist.group.WORLD, self.device.type)
        # every rank built the same seeded net (as `replicate` relies on): each cuts its shards from its own copy,
        # with no scatter from rank 0, whose buffers for it would stay in rank 0's heap
        parallelize_module(model, mesh, PLAN, src_data_rank=None)
        model.relu6.inplace = model.relu7.inplace = False  # DTensor's local outputs are views autograd keeps whole
        self.collectives = FunctionalCollectives(self.ledger, LINKS, self.world_size)
        self.parts_held = [(self.rank, model)]
        fc = [name for name, _ in model.named_parameters() if name.startswith("fc")]
        return self.replicate(model, dist.group.WORLD, average=False, link="conv-gradients", local=fc)

    @contextmanager
    def counting(self, direction: str) -> Iterator[None]:
        self.collectives.direction = direction
        with self.collectives:
            yield

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)  # every rank computes the loss over the global batch, the same

    def dropout_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)  # the FC layers see every rank's samples


# DTensor redistributes through these ops; CommDebugMode counts them by kind, but neither the elements they move nor
# how long their wait blocks, which the ledger needs. TorchDispatchMode is torch's documented hook for ops.
_FUNCTIONAL = torch.ops._c10d_functional
_KINDS = {_FUNCTIONAL.all_gather_into_tensor: "all-gather", _FUNCTIONAL.reduce_scatter_tensor: "reduce-scatter",
          _FUNCTIONAL.all_reduce: "all-reduce"}


class FunctionalCollectives(TorchDispatchMode):
    """While on, counts into a ledger the functional collectives issued (DTensor's redistributions go through
    them), each under the link the layout names for its kind ("all-gather", "reduce-scatter", "all-reduce")
    and in `direction`, over a group of `size` ranks: elements sent as the links count them. A functional
    collective returns at once, its output wrapped as an AsyncCollectiveTensor; the op that first reads it waits
    for it, and that wait, timed here before the op runs, is the time its link waited. Like torch's
    CommDebugMode, which counts the same ops but not what they move."""

    def __init__(self, ledger: Ledger, links: dict[str, str], size: int) -> None:
        super().__init__()
        self.ledger, self.links, self.size = ledger, links, size
        self.direction = FORWARD
        # a collective's output not yet waited for, by where its data is (its wrapper aliases it), and its link
        self.in_flight: dict[int, str] = {}

    def sent(self, kind: str, tensor: Tensor) -> float:
        """Elements this rank sends in a collective of `kind` whose input is `tensor`."""
        if kind == "all-reduce":
            return ring_all_reduce_elements(tensor.numel(), self.size)
        shard = tensor.numel() if kind == "all-gather" else tensor.numel() // self.size
        return shard * (self.size - 1)

    def _waited(self, output: Tensor, wait: Callable[[], Any]) -> Any:
        with self.ledger.waiting(self.in_flight.pop(output.data_ptr(), "unnamed"), self.direction):
            return wait()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        packet, kwargs = func._overloadpacket, kwargs or {}
        if packet is _FUNCTIONAL.wait_tensor:
            return self._waited(args[0], lambda: func(*args, **kwargs))
        if not func.is_view:  # as AsyncCollectiveTensor waits: a view of a collective's output does not
            for arg in tree_flatten((args, kwargs))[0]:
                # a DTensor's op runs on its local part as it is held (to_local() would hand back another tensor)
                pending = arg._local_tensor if isinstance(arg, DTensor) else arg
                if isinstance(pending, AsyncCollectiveTensor) and not pending.completed:
                    self._waited(pending.elem, pending.trigger_wait)
        if packet not in _KINDS:
            return func(*args, **kwargs)
        kind, tensor = _KINDS[packet], args[0]
        link = self.links[kind]
        self.ledger.arrive(link, self.direction)
        self.ledger.record(0, link, self.direction, self.sent(kind, tensor), tensor.element_size())
        output = func(*args, **kwargs)
        self.in_flight[output.data_ptr()] = link
        return output
