"""What a layout costs, apart from what it runs: which block of each of the whole net's tensors each of its
parts holds (`shard`: how it shards state, and so how checkpoints merge), what each part sees, computes and
sends in a step (`samples`, `work`, `traffic`: what `plan` predicts and the ledger is tested against), how
its parts' times make up a step (`timeline`) and how its schedule stretches one (`slots`, `exchange_rounds`).
All class methods from layer shapes alone, no process group: every layout's module has a `Costs` subclass,
named by its `Layout.costs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from alexnet_mp.blocks import Block, part_size
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import PARAMETERS, RankWork, Traffic, both_ways, held_shares, parameters
from alexnet_mp.ledger import BACKWARD, FORWARD, ring_all_reduce_elements
from alexnet_mp.links import Link
from alexnet_mp.model import ARCHITECTURES, FC_NAMES, Architecture

# Wherever fc6 and fc7 are split by units: fc7 reads every part's fc6 units, and fc8 (whole, on the first
# part, with the loss) every part's fc7 units.
FC_LINKS = (Link("fc7", 1), Link("fc8", 1, to_first=True))
# Where the convs are data parallel and the FC layers read every rank's samples: every rank's conv features,
# along the batch.
CONV_FEATURES = Link("fc6", 0)


@dataclass(frozen=True)
class Span:
    """A stretch of a part's predicted step: what it does (`name`, as a trace names it: "conv3 forward", "fc6-input
    forward") and of which kind (`category`: "compute", "optimizer" or "communication", a trace's categories) from
    `start_s` to `end_s` after the step began. What no span covers, the part idles."""

    name: str
    category: str
    start_s: float
    end_s: float


COMPUTE, OPTIMIZER, COMMUNICATION = "compute", "optimizer", "communication"
AT_THE_END = ""  # where `Costs.placed` puts what waits after the backward, before the optimizer's step
Op = tuple[str, str, float]  # name, category, seconds: a span of a part's step before its start is known


@dataclass(frozen=True)
class PartTimes:
    """What a part's step costs, in seconds: each of the net's layers forward and backward (in the order the forward
    runs them; nought where the part holds none of it), the optimizer's step with any copies the step makes beyond
    its layers', and the collectives of each of its (link, direction); and the parameters it holds of each layer."""

    layers: dict[str, tuple[float, float]]
    update_s: float
    comm: dict[tuple[str, str], float]
    parameters: dict[str, int]

    @property
    def forward_s(self) -> float:
        return sum(forward for forward, _ in self.layers.values())

    @property
    def layers_backward_s(self) -> float:
        return sum(backward for _, backward in self.layers.values())

    @property
    def backward_s(self) -> float:
        """Its backward pass and the optimizer's step after it."""
        return self.layers_backward_s + self.update_s

    @property
    def fc_s(self) -> float:
        """Its FC layers' forward and backward."""
        return sum(sum(self.layers[name]) for name in FC_NAMES if name in self.layers)

    @classmethod
    def together(cls, parts: list[PartTimes]) -> PartTimes:
        """Parts one process runs in turn: their layers' and steps' times added; their links are copies, no
        collective."""
        layers = {name: (sum(p.layers[name][0] for p in parts), sum(p.layers[name][1] for p in parts))
                  for name in parts[0].layers}
        return cls(layers, sum(p.update_s for p in parts), {},
                   {name: sum(p.parameters.get(name, 0) for p in parts) for name in parts[0].layers})


def step_end(timeline: list[list[Span]]) -> float:
    """Where a timeline of each part's spans ends: the step's length."""
    return max((span.end_s for spans in timeline for span in spans), default=0.0)


def busy_s(spans: list[Span]) -> float:
    """A part's seconds of compute in its spans, the optimizer's step among them."""
    return sum(span.end_s - span.start_s for span in spans if span.category != COMMUNICATION)


def unshared(busy: int) -> float:
    """Parts that share no cores: a part computes no slower for others computing beside it."""
    return 1.0


class Costs(ABC):
    @classmethod
    def collective(cls, link: str, direction: str) -> str:
        """Which collective carries `link` in `direction` (hardware.KINDS): replicated gradients are
        all-reduced, fc8's input gathered to the first part (its gradient scattered back), any other layer's
        input all-gathered (its gradient reduce-scattered)."""
        if link.endswith("gradients"):
            return "all-reduce"
        if link == FC_LINKS[1].name:
            return "gather" if direction == FORWARD else "scatter"
        return "all-gather" if direction == FORWARD else "reduce-scatter"

    @classmethod
    def element_bytes(cls, link: str, compute_dtype: torch.dtype) -> int:
        """The bytes of an element `link` carries in a step whose layers compute in `compute_dtype`: replicated or
        sharded gradients are of the float32 parameters (FSDP reduces in float32); anything else is what the
        layers compute or read (activations, their gradients, FSDP's parameters gathered to compute with)."""
        return PARAMETERS.itemsize if link.endswith("gradients") else compute_dtype.itemsize

    @classmethod
    def call_elements(cls, link: str, elements: float, world_size: int, config: TrainConfig,
                      parameters: Mapping[str, int]) -> list[float]:
        """The elements each collective that carries `link`'s `elements` in a step sends, each call costing its own
        size's time: one call, but where DDP's buckets split replicated gradients (each bucket its share,
        `ddp_buckets`, of the `parameters` a part holds of each layer) or a layout sends in equal rounds."""
        if link.endswith("gradients"):
            gradients = gradient_bytes(link, parameters)
            sizes = dict(gradients)
            return split_by(elements, [sum(sizes[name] for name in bucket) for bucket in ddp_buckets(gradients)])
        rounds = cls.exchange_rounds(world_size, config) if link == CONV_FEATURES.name else 0
        return split_by(elements, [1.0] * rounds)

    @classmethod
    def passes(cls, layer: str, world_size: int, config: TrainConfig) -> int:
        """In how many passes `layer` runs over a part's samples in a step, each paying what a pass costs
        whatever its images: one, but for a layout that runs it micro-batch by micro-batch or round by round."""
        return 1

    @classmethod
    def gradient_additions(cls, layer: str, world_size: int, config: TrainConfig, part_traffic: Traffic,
                           parameters: Mapping[str, int]) -> int:
        """How often a part adds `layer`'s weight gradient into one it holds already in a step (given its traffic
        and the `parameters` it holds of each layer): once for each pass after the first, and once more where DDP's
        buckets hold it (`bucketed_layers`: DDP copies each gradient into its bucket)."""
        return cls.passes(layer, world_size, config) - 1 + (layer in bucketed_layers(part_traffic, parameters))

    @classmethod
    def timeline(cls, parts: list[PartTimes], world_size: int, config: TrainConfig, blocking: bool,
                 sharing: Callable[[int], float] = unshared) -> list[list[Span]]:
        """Each part's step, op by op (`ops`): its layers' forwards, their backwards in reverse, the optimizer's step,
        and each collective where the step waits for it. Every part meets the others at each collective: it starts
        once the last part reaches it, and all leave once the longest part's share of it is done; a part that
        arrives early idles, and leaves the cores it shares (`sharing`) to those still computing."""
        links = list(dict.fromkeys(key for part in parts for key in part.comm))
        return met_at_collectives([cls.ops(part, links, world_size, config, blocking) for part in parts], sharing)

    @classmethod
    def ops(cls, part: PartTimes, links: list[tuple[str, str]], world_size: int, config: TrainConfig,
            blocking: bool) -> list[Op]:
        """A part's step as (name, category, seconds) in order: each of `links` (every part's, so that all parts
        list the same collectives) where `placed` puts it, for what of it does not run beside the compute
        (`beside_compute_s`). Where the backend's collectives run on the host (`blocking`: gloo), what runs beside
        the compute runs on its cores and stretches the backward."""
        beside = cls.beside_compute_s(part, world_size, config, blocking)
        at: dict[tuple[str, str, bool], list[Op]] = defaultdict(list)
        for link, direction in links:
            exposed = part.comm.get((link, direction), 0.0) - beside.get((link, direction), 0.0)
            for layer, before, share in cls.placed(link, direction, config):
                at[layer, direction, before].append((f"{link} {direction}", COMMUNICATION, share * exposed))
        backward = part.layers_backward_s
        stretch = 1 + sum(beside.values()) / backward if blocking and backward else 1.0
        ops = []
        for layer, (forward_s, _) in part.layers.items():
            ops += [*at.pop((layer, FORWARD, True), []), (f"{layer} forward", COMPUTE, forward_s),
                    *at.pop((layer, FORWARD, False), [])]
        for layer, (_, backward_s) in reversed(part.layers.items()):
            ops += [*at.pop((layer, BACKWARD, True), []), (f"{layer} backward", COMPUTE, stretch * backward_s),
                    *at.pop((layer, BACKWARD, False), [])]
        ops += [*at.pop((AT_THE_END, BACKWARD, True), []), ("optimizer step", OPTIMIZER, part.update_s)]
        if at:
            raise ValueError(f"links placed at no layer of the net: {sorted(at)}")
        return ops

    @classmethod
    def placed(cls, link: str, direction: str, config: TrainConfig) -> list[tuple[str, bool, float]]:
        """Where the step waits for `link`'s collectives in `direction`, as (layer, before, share): before or after
        that layer's forward (FORWARD) or backward (BACKWARD), for that share of them. A layer's input waits before
        its forward and its gradient after its backward, a layer's output after its forward and its gradient before
        its backward; replicated gradients wait at the backward's end, before the optimizer's step."""
        layer, _, end = link.rpartition("-")
        if end == "input":
            return [(layer, direction == FORWARD, 1.0)]
        if end == "output":
            return [(layer, direction != FORWARD, 1.0)]
        return [(AT_THE_END, True, 1.0)]

    @classmethod
    def beside_compute_s(cls, part: PartTimes, world_size: int, config: TrainConfig,
                         blocking: bool) -> dict[tuple[str, str], float]:
        """The seconds of each of a part's (link, direction) that run beside its compute, not in its way: the
        replicated gradients' reduction behind the backward pass (DDP reduces each bucket once the backward has
        filled it, on NCCL's streams or on gloo's own threads: `reduced_after_backward_s`); where collectives run
        beside the compute (NCCL), also the conv features' exchange in rounds behind the FC layers' work
        (`hidden_by_rounds`); over gloo the rounds' collectives block the host."""
        beside = {key: seconds - reduced_after_backward_s(key[0], seconds, part)
                  for key, seconds in part.comm.items() if key[0].endswith("gradients")}
        exchange = {key: seconds for key, seconds in part.comm.items() if key[0] == CONV_FEATURES.name}
        if blocking or not sum(exchange.values()):
            return beside
        hidden = hidden_by_rounds(cls.exchange_rounds(world_size, config), sum(exchange.values()), part.fc_s)
        return beside | {key: hidden * seconds / sum(exchange.values()) for key, seconds in exchange.items()}

    @classmethod
    def fresh_bytes(cls, arch: Architecture, num_classes: int) -> dict[tuple[str, str], float]:
        """Per (layer, direction), the bytes a part's step copies into blocks mapped afresh on a CPU
        (`malloc.mapped_afresh`) beside that pass, beyond the layers' own tensors, whose fresh pages the profile
        counts per pass (calibrate's `fresh_bytes`): none, but for a layout that copies large tensors of its own."""
        return {}

    @classmethod
    def holds_dtensors(cls, layer: str) -> bool:
        """Whether a part's parameters of `layer` are DTensors, which the optimizer steps with its foreach kernel
        (no fused one takes them, step.make_optimizer): no, but for a layout that distributes them with DTensor."""
        return False

    @classmethod
    def slots(cls, world_size: int, config: TrainConfig) -> float:
        """A step's length over its compute's, where the layout leaves ranks idle by design (a pipeline's
        bubble); 1 where it does not."""
        return 1.0

    @classmethod
    def exchange_rounds(cls, world_size: int, config: TrainConfig) -> int:
        """In how many rounds the conv features' exchange (`CONV_FEATURES`) travels, each round behind the FC layers'
        work on the round before; 0 where it is one exchange that the FC layers wait for."""
        return 0

    @classmethod
    def parts(cls, world_size: int) -> int:
        """How many parts the net is laid out in on `world_size` ranks: one per rank, unless a process holds
        several."""
        return world_size

    @classmethod
    @abstractmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        """The block of the whole net's tensor `key` (of `shape`) that `part` of `parts` holds; None if none."""

    @classmethod
    def writes(cls, key: str, shape: torch.Size, part: int, parts: int) -> bool:
        """Whether `part` holds a block of `key` that no lower part holds: replicas' blocks are saved once."""
        block = cls.shard(key, shape, part, parts)
        return block is not None and all(cls.shard(key, shape, lower, parts) != block for lower in range(part))

    @classmethod
    @abstractmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        """How many images of a global batch of `batch` the part's conv layers and its FC layers each see."""

    @classmethod
    @abstractmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        """Elements `part` sends in one training step, per (link, direction), from the layer shapes alone."""

    @classmethod
    def expected_traffic(cls, arch: str, world_size: int, batch: int, num_classes: int = 1000) -> list[Traffic]:
        """`traffic` of every part on `world_size` ranks: the count the links' ledger is tested against."""
        parts = cls.parts(world_size)
        return [{key: value for key, value in cls.traffic(ARCHITECTURES[arch], part, parts, batch,
                                                          num_classes).items() if value}
                for part in range(parts)]

    @classmethod
    def work(cls, arch: str, part: int, parts: int, batch: int, num_classes: int = 1000) -> RankWork:
        """What `part` computes in a step: its share of each layer, and the images its layers see."""
        return RankWork(held_shares(cls.shard, arch, part, parts, num_classes), *cls.samples(part, parts, batch))


def met_at_collectives(parts_ops: list[list[Op]], sharing: Callable[[int], float] = unshared) -> list[list[Span]]:
    """Each part's spans from its ops (`Costs.ops`), every part listing the same collectives in the same order: the
    parts compute their ops up to their next collective side by side (`computed_side_by_side`); the collective
    starts once every part has reached it and ends when the longest part's share of it does."""
    clock, timeline = 0.0, [[] for _ in parts_ops]
    for meeting in zip(*(up_to_each_collective(ops) for ops in parts_ops), strict=True):
        computed = computed_side_by_side([local for local, _ in meeting], clock, sharing)
        for spans, more in zip(timeline, computed, strict=True):
            spans += more
        clock = max([clock, *(spans[-1].end_s for spans in computed if spans)])
        collective = [op for _, op in meeting]
        if collective[0] is None:
            continue
        if len({op[0] for op in collective}) > 1:
            raise ValueError(f"parts meet at different collectives: {[op[0] for op in collective]}")
        end = clock + max(seconds for _, _, seconds in collective)
        for spans, (name, category, _) in zip(timeline, collective, strict=True):
            if end > clock:
                spans.append(Span(name, category, clock, end))
        clock = end
    return timeline


def computed_side_by_side(parts_ops: list[list[Op]], start: float,
                          sharing: Callable[[int], float] = unshared) -> list[list[Span]]:
    """Each part's spans from ops that it computes from `start`, beside the others', each op's seconds given at the
    pace of every part computing at once: parts that share cores each run `sharing(k)` times slower than alone while
    k of them compute, so a part left computing once the others are done speeds up. Ops of no time leave no span."""
    everyone = sharing(len(parts_ops))
    left = [[seconds / everyone for _, _, seconds in ops] for ops in parts_ops]  # each op's work, alone
    position, begun = [0] * len(parts_ops), [start] * len(parts_ops)
    timeline: list[list[Span]] = [[] for _ in parts_ops]
    now = start
    while True:
        for p, ops in enumerate(parts_ops):  # an op of no work is done where it begins
            while position[p] < len(ops) and left[p][position[p]] <= 0:
                position[p] += 1
        busy = [p for p, ops in enumerate(parts_ops) if position[p] < len(ops)]
        if not busy:
            return timeline
        pace = sharing(len(busy))
        elapsed = min(left[p][position[p]] for p in busy) * pace
        now += elapsed
        for p in busy:
            left[p][position[p]] -= elapsed / pace
            if left[p][position[p]] <= 1e-12 * max(1.0, now):
                name, category, _ = parts_ops[p][position[p]]
                timeline[p].append(Span(name, category, begun[p], now))
                position[p], begun[p] = position[p] + 1, now


def up_to_each_collective(ops: list[Op]) -> list[tuple[list[Op], Op | None]]:
    """A part's ops cut after each collective: the ops before it, and it (None after the last)."""
    cut, local = [], []
    for op in ops:
        if op[1] == COMMUNICATION:
            cut.append((local, op))
            local = []
        else:
            local.append(op)
    return cut + [(local, None)]


# DDP's bucket caps, its defaults: the first bucket's, small so that the reduction starts early, and every other's.
DDP_BUCKET_CAPS = (2**20, 25 * 2**20)


def gradient_bytes(link: str, parameters: Mapping[str, int]) -> list[tuple[str, int]]:
    """The bytes of each layer's float32 gradients that a replicated-gradients link reduces (`conv-gradients`: the
    convs', `gradients`: every layer's), given the parameters a part holds of each layer in the net's order; in the
    order the backward makes them."""
    layers = link.removesuffix("gradients").removesuffix("-")
    return [(name, count * PARAMETERS.itemsize) for name, count in reversed(parameters.items())
            if name.startswith(layers) and count]


def bucketed_layers(part_traffic: Traffic, parameters: Mapping[str, int]) -> set[str]:
    """The layers whose gradients a part's replicated-gradients links reduce (given the `parameters` it holds of
    each): DDP's buckets hold them, and each gradient the backward produces is copied into its bucket."""
    return {name for (link, _), elements in part_traffic.items() if link.endswith("gradients") and elements
            for name, _ in gradient_bytes(link, parameters)}


def ddp_buckets(gradients: list[tuple[str, int]]) -> list[list[str]]:
    """The layers whose gradients (bytes, in the order the backward makes them) DDP reduces together: as DDP
    rebuilds its buckets after the first step, in that order, each closing once it holds at least its cap
    (`DDP_BUCKET_CAPS`). A layer's weight and bias go in one bucket: no bias here tips a bucket over its cap."""
    buckets, bucket, size = [], [], 0
    for name, nbytes in gradients:
        bucket, size = [*bucket, name], size + nbytes
        if size >= DDP_BUCKET_CAPS[min(len(buckets), 1)]:
            buckets, bucket, size = [*buckets, bucket], [], 0
    return buckets + ([bucket] if bucket else [])


def split_by(elements: float, weights: list[float]) -> list[float]:
    """`elements` in one call per weight, each its weight's share; in one call where there are none."""
    total = sum(weights)
    return [elements * weight / total for weight in weights] if total else [elements]


def reduced_after_backward_s(link: str, seconds: float, part: PartTimes) -> float:
    """How long DDP's reduction of a part's replicated gradients (`seconds` in all on `link`) goes on after its
    backward: each bucket's share starts once the backward has made the bucket's last gradient and the bucket
    before is reduced, one after another in the order they fill."""
    gradients = gradient_bytes(link, part.parameters)
    total = sum(nbytes for _, nbytes in gradients)
    if not total:
        return seconds
    made, clock = {}, 0.0
    for name, (_, backward_s) in reversed(part.layers.items()):
        clock += backward_s
        made[name] = clock
    reduced, sizes = 0.0, dict(gradients)
    for bucket in ddp_buckets(gradients):
        reduced = max(reduced, made[bucket[-1]]) + seconds * sum(sizes[name] for name in bucket) / total
    return max(0.0, reduced - clock)


def hidden_by_rounds(rounds: int, transfer_s: float, work_s: float) -> float:
    """The seconds of an exchange in `rounds` rounds (of `transfer_s` in all) hidden behind the work each round
    feeds (`work_s` in all): each round's work runs after its transfer and beside the next one, so the rounds take
    T/R + (R - 1) max(T, F) / R + F/R instead of T + F, hiding (R - 1) / R of the shorter; none where the exchange
    is one (`rounds` 0)."""
    return (rounds - 1) / rounds * min(transfer_s, work_s) if rounds else 0.0


def data_parallel_convs_traffic(costs: type[Costs], arch: Architecture, part: int, parts: int, batch: int,
                                num_classes: int) -> Traffic:
    """What a layout whose convs are data parallel and whose FC layers read every rank's samples sends for its
    convs: its conv features all-gathered along the batch (their gradients reduce-scattered back), and the
    replicated convs' gradients all-reduced. The layout adds its FC layers' own links."""
    traffic = new_traffic()
    both_ways(traffic, CONV_FEATURES.name, arch.feature_size * part_size(batch, parts) * (parts - 1))
    conv = parameters(costs.work(arch.name, part, parts, batch, num_classes), arch, num_classes, "conv")
    traffic["conv-gradients", BACKWARD] += ring_all_reduce_elements(conv, parts)
    return traffic


def replicated_gradients_traffic(traffic: Traffic, costs: type[Costs], arch: Architecture, part: int, parts: int,
                                 batch: int, num_classes: int, replicas: int) -> None:
    """What all-reducing the gradients of every parameter a part holds sends, over a ring of the `replicas` parts
    that hold the same ones; nothing where the part is the only one."""
    if replicas > 1:
        held = parameters(costs.work(arch.name, part, parts, batch, num_classes), arch, num_classes)
        traffic["gradients", BACKWARD] += ring_all_reduce_elements(held, replicas)


def fc_traffic(traffic: Traffic, arch: Architecture, shard: int, shards: int, samples: int) -> None:
    """What `FC_LINKS` send for `samples` images: fc7's input gathered from every shard, fc7's outputs
    gathered to shard 0 for fc8 (and their gradients back)."""
    fc6_part, fc7_part = (part_size(units, shards) for units in arch.fc_units)
    both_ways(traffic, "fc7-input", fc6_part * samples * (shards - 1))
    if shard == 0:
        traffic["fc8-input", BACKWARD] += fc7_part * samples * (shards - 1)
    else:
        traffic["fc8-input", FORWARD] += fc7_part * samples


def new_traffic() -> Traffic:
    return defaultdict(float)
