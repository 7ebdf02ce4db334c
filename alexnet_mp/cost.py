"""Analytic figures derived from the layer shapes alone: parameters, FLOPs and memory of the whole net or of
the share of it a rank holds, and the bookkeeping of traffic. What each layout sends is the layout's own
(`Layout.traffic`, built from these); `plan` turns both into predicted step times.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field

import torch

from alexnet_mp.ledger import BACKWARD, FORWARD
from alexnet_mp.malloc import FRESH_BLOCK_BYTES, LargeBlocks, mapped_afresh
from alexnet_mp.model import FC_NAMES, IMAGE_SIZE, Architecture, ConvSpec, build_model, conv_sides, full_shapes
from alexnet_mp.speed import EAGER, Variant

Traffic = dict[tuple[str, str], float]  # (link, direction) -> elements sent
PARAMETERS = IMAGES = torch.float32  # the dtype of the parameters, their gradients and momentum, and of the images


def both_ways(traffic: Traffic, link: str, elements: float) -> None:
    """A link whose backward sends what its forward did (an all-gather and its reduce-scatter)."""
    traffic[link, FORWARD] += elements
    traffic[link, BACKWARD] += elements


@dataclass(frozen=True)
class LayerCost:
    name: str
    output_shape: tuple[int, ...]  # per image, the conv's or matrix product's output
    block_shape: tuple[int, ...]  # per image, after the layer's ReLU, LRN and pool: the next layer's input
    parameters: int
    flops: int  # forward, per image: 2 per multiply-add of the conv or matrix product


def layer_costs(arch: Architecture, num_classes: int = 1000, shares: Mapping[str, float] | None = None,
                ) -> list[LayerCost]:
    """Per layer: output shape, parameters, forward FLOPs; of the whole net, or of the `shares` of each layer's
    output channels or units a part holds (a layer it holds none of is left out)."""
    with torch.device("meta"):
        net = build_model(arch.name, num_classes)
    layers = net.layers()
    sides = dict(zip([spec.name for spec in arch.convs], conv_sides(arch), strict=True))
    costs = []
    for name in arch.layer_names:
        share, layer = 1.0 if shares is None else shares[name], layers[name]
        if not share:
            continue
        outputs = round(layer.weight.shape[0] * share)
        multiply_adds = layer.weight[0].numel() * outputs
        if name in sides:
            side, block = sides[name]
            costs.append(LayerCost(name, (outputs, side, side), (outputs, block, block),
                                   round(share * _count(layer)), 2 * multiply_adds * side ** 2))
        else:
            costs.append(LayerCost(name, (outputs,), (outputs,), round(share * _count(layer)), 2 * multiply_adds))
    return costs


def _count(layer: torch.nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


@dataclass(frozen=True)
class RankWork:
    """What one rank of a layout computes in a step: the share of each layer's output channels or units it
    computes, how many images its conv layers and its fully connected layers each see, the share of each
    layer's parameters it holds (by default the share it computes), and, per layer, the elements it holds at that
    layer's backward beyond those and their gradients (FSDP's whole units, gathered and reduced)."""

    shares: Mapping[str, float]
    conv_samples: int
    fc_samples: int
    held: Mapping[str, float] | None = None
    gathered: Mapping[str, int] = field(default_factory=dict)

    @property
    def holds(self) -> Mapping[str, float]:
        return self.shares if self.held is None else self.held

    def samples(self, layer: str) -> int:
        return self.conv_samples if layer.startswith("conv") else self.fc_samples


def parameters(work: RankWork, arch: Architecture, num_classes: int = 1000, layers: str = "") -> int:
    """Parameters the rank holds, of the layers whose names start with `layers` (all by default)."""
    return sum(cost.parameters for cost in layer_costs(arch, num_classes, work.holds) if cost.name.startswith(layers))


def training_flops(work: RankWork, arch: Architecture, num_classes: int = 1000, layers: str = "") -> float:
    """FLOPs of one training step of a rank, in the layers whose names start with `layers` (all by default):
    forward plus a backward that costs twice the forward (one product for the input's gradient, one for the
    weights')."""
    return sum(3 * cost.flops * work.samples(cost.name) for cost in layer_costs(arch, num_classes, work.shares)
               if cost.name.startswith(layers))


# Live in a layer's backward besides what the forward kept, in tensors of its output's size: the gradients of its
# output and input, and for a layer with LRN its backward's own (the denominator, the scale, a window sum padded
# and summed: `model._ChannelLRN.backward`, in float32 at least), at their most; under autocast the LRN's backward
# also widens its maps and their gradient to float32. Compiled, a layer with LRN makes three float32 tensors of its
# output's size at most (its backward fused).
BACKWARD_TEMPORARIES = 2
LRN_BACKWARD_TEMPORARIES = 4
LRN_WIDENED = 2
COMPILED_LRN_BACKWARD_TEMPORARIES = 3
WIDE = torch.float32  # what LRN sums and scales in, and what the loss's softmax reads, whatever the layers compute in


def kept_for_backward(cost: LayerCost, spec: ConvSpec | None, variant: Variant = EAGER) -> list[int]:
    """The tensors, in bytes per image, that autograd keeps of a layer from its forward to its backward, the layer
    run as `variant` says, in its compute dtype. A conv layer: its ReLU'd output (the ReLU works in place, and the
    LRN keeps the same maps), the LRN's output (the pool's input), the pool's output and its int64 indices;
    compiled (one graph, whose partitioner keeps what is cheapest to keep and recomputes the rest): with LRN, the
    conv's output before its ReLU and the LRN's squares (float32), else the ReLU's mask (bool); and the pool's
    output and its int8 offsets, or else the ReLU's output. fc6 and fc7: the ReLU'd output, the dropout's mask (in
    the activations' dtype) and its output. fc8: its logits and their log-softmax (at least float32)."""
    out, block, size = math.prod(cost.output_shape), math.prod(cost.block_shape), variant.compute_dtype.itemsize
    if spec is not None and variant.speed.compiled:
        kept = [out * size, out * WIDE.itemsize] if spec.lrn else [out * torch.bool.itemsize]
        return kept + ([block * size, block * torch.int8.itemsize] if spec.pool else [out * size])
    if spec is not None:
        return ([out * size] + ([out * size] if spec.lrn else [])
                + ([block * size, block * torch.int64.itemsize] if spec.pool else []))
    if cost.name == FC_NAMES[-1]:
        return [out * size, out * torch.promote_types(variant.compute_dtype, WIDE).itemsize]
    return [out * size] * 3


def backward_temporaries(cost: LayerCost, spec: ConvSpec | None, variant: Variant = EAGER) -> list[int]:
    """The tensors, in bytes per image, a layer's backward makes beyond what its forward kept, the layer run as
    `variant` says."""
    out, dtype = math.prod(cost.output_shape), variant.compute_dtype
    if spec is None or not spec.lrn:
        return [out * dtype.itemsize] * BACKWARD_TEMPORARIES
    if variant.speed.compiled:
        return [out * WIDE.itemsize] * COMPILED_LRN_BACKWARD_TEMPORARIES
    widened = LRN_WIDENED if dtype.itemsize < WIDE.itemsize else 0
    return [out * WIDE.itemsize] * (LRN_BACKWARD_TEMPORARIES + widened)


def first_input_copy(arch: Architecture, held: Collection[str], dtype: torch.dtype = torch.float32) -> int:
    """Bytes per image of the copy of the images that the first conv reads and keeps, where a part holds it: the
    padded copy where its padding is uneven (F.pad's), in `dtype`; else autocast's copy of the images in `dtype`,
    where that is narrower than theirs; none otherwise."""
    first = arch.convs[0]
    if first.name not in held:
        return 0
    if isinstance(first.padding, tuple):
        return 3 * (IMAGE_SIZE + sum(first.padding[:2])) * (IMAGE_SIZE + sum(first.padding[2:])) * dtype.itemsize
    return 3 * IMAGE_SIZE ** 2 * dtype.itemsize if dtype != IMAGES else 0


def cast_weights(work: RankWork, held: Mapping[str, int], dtype: torch.dtype) -> dict[str, int]:
    """Per layer, the parameters (of `held`, by layer) autocast copies into `dtype` each step and keeps all step:
    those a part holds and does not gather (FSDP gathers them in `dtype` already); none in float32."""
    return {name: count for name, count in held.items() if name not in work.gathered} if dtype != PARAMETERS else {}


def activation_bytes(peak: Mapping[str, float]) -> float:
    """Of a peak by kind (`memory_bytes`), the activations: what autograd keeps, and the backward's temporaries."""
    return peak["activations"] + peak["temporaries"]


def held_together(peaks: list[dict[str, float]]) -> dict[str, float]:
    """The peak, by kind, of a process that runs parts layer by layer in turn (the paper split's towers on one
    device), from each part's peak (`memory_bytes`): every part's tensors, but the temporaries of one part's backward
    at a time."""
    return {kind: (max if kind == "temporaries" else sum)(peak[kind] for peak in peaks) for kind in peaks[0]}


def memory_bytes(work: RankWork, arch: Architecture, num_classes: int = 1000, variant: Variant = EAGER,
                 foreach: int = 0, added: Collection[str] = ()) -> dict[str, float]:
    """A part's memory at its peak, by kind, its layers run as `variant` says (in its compute dtype, `dtype` below):
    its weights and momentum (a float32 copy each of the parameters it holds); where `dtype` is narrower, autocast's
    copy in `dtype` of each weight it casts (those it holds and does not gather), which it keeps all step; and at its
    peak moment: in the backward, at the layer whose backward holds the most, the float32 gradients of the layers
    from the last down to it and of the `added` before it (each layer of `added` has its weight gradient added into
    one held all step: a later pass's into an earlier's, or DDP's copy into its bucket), the gradient its backward
    produces where it is one of `added` (held beside the one it goes into), the gradient of its weights' copy in
    `dtype` (cast into their float32 one), what it holds there beyond its parameters and their gradients
    (`RankWork.gathered`, at float32's bytes: FSDP gathers a unit's weight and makes its gradient in `dtype`, but
    reduces in float32, from a float32 copy of the gradient), the activations (the images, and what autograd still
    keeps of the forward from the first layer up to it) and that layer's backward temporaries; or in the
    optimizer's step, every gradient, the images, and the copy of the gradients of the `foreach` parameters the
    foreach kernel makes to add their weight decay (the fused kernel makes none)."""
    specs, dtype = {spec.name: spec for spec in arch.convs}, variant.compute_dtype
    costs = layer_costs(arch, num_classes, work.shares)
    held = {cost.name: cost.parameters for cost in layer_costs(arch, num_classes, work.holds)}
    kept = [sum(kept_for_backward(cost, specs.get(cost.name), variant)) * work.samples(cost.name) for cost in costs]
    images = (3 * IMAGE_SIZE ** 2 * IMAGES.itemsize + first_input_copy(arch, held, dtype)) * work.conv_samples
    added_held = [held.get(cost.name, 0) if cost.name in added else 0 for cost in costs]
    cast = cast_weights(work, held, dtype)
    backward = [{"gradients": (sum(held.get(cost.name, 0) for cost in costs[at:]) + sum(added_held[:at + 1]))
                 * PARAMETERS.itemsize,
                 "gradient_copy": cast.get(costs[at].name, 0) * dtype.itemsize,
                 "gathered": work.gathered.get(costs[at].name, 0) * PARAMETERS.itemsize,
                 "activations": images + sum(kept[:at + 1]),
                 "temporaries": sum(backward_temporaries(costs[at], specs.get(costs[at].name), variant))
                 * work.samples(costs[at].name), "optimizer": 0}
                for at in range(len(costs))]
    weights = sum(held.values()) * PARAMETERS.itemsize
    step = {"gradients": weights, "gradient_copy": 0, "gathered": 0, "activations": images, "temporaries": 0,
            "optimizer": foreach * PARAMETERS.itemsize}
    return {"weights": weights, "momentum": weights, "weight_copies": sum(cast.values()) * dtype.itemsize,
            **max([*backward, step], key=lambda kinds: sum(kinds.values()))}


HEAP_STEPS = 4  # steps walked: the heap grows over the first few and then holds its size


@dataclass(frozen=True)
class StepBlocks:
    """The blocks of a part's step, in bytes, as `memory_bytes` counts its tensors, each layer's a pass's (of
    `passes[layer]` over its samples): what each forward keeps for the backward, the temporaries each backward
    makes, each layer's weight gradient and output, and the images."""

    kept: dict[str, list[float]]
    temporaries: dict[str, list[float]]
    held: dict[str, float]  # the layer's parameters the part holds: its weights', momentum's and gradient's size
    output: dict[str, float]
    images: float
    copies: dict[str, float] = field(default_factory=dict)  # autocast's copy of the layer's weights, held all step

    def lasting_fresh_bytes(self) -> dict[tuple[str, str], float]:
        """Per (layer, direction), the bytes of these blocks of `malloc.FRESH_BLOCK_BYTES` and up that a pass
        allocates and that outlast it: forward, what it keeps and autocast's copy of its weights; backward, its
        weight gradient."""
        made = {FORWARD: {name: [*sizes, self.copies.get(name, 0.0)] for name, sizes in self.kept.items()},
                BACKWARD: {name: [self.held.get(name, 0.0)] for name in self.temporaries}}
        return {(name, direction): sum(size for size in sizes if mapped_afresh(size))
                for direction, by_layer in made.items() for name, sizes in by_layer.items()}

    def foreach_copies_mapped(self, foreach_layers: Collection[str]) -> float:
        """The bytes of the blocks mapped afresh among the copies of the gradients that the foreach kernel makes at
        the optimizer's step to add the weight decay, one a layer of `foreach_layers` (its weight's, which outweighs
        its bias)."""
        return sum(size for name, size in self.held.items() if name in foreach_layers and mapped_afresh(size))


def step_blocks(work: RankWork, arch: Architecture, num_classes: int, passes: Mapping[str, int],
                variant: Variant = EAGER) -> StepBlocks:
    """A part's step's blocks (`StepBlocks`), each layer's a pass's over its share of its samples, run as `variant`
    says (as `memory_bytes` counts them)."""
    specs, dtype = {spec.name: spec for spec in arch.convs}, variant.compute_dtype
    costs = layer_costs(arch, num_classes, work.shares)

    def sizes(per_image: list[int], cost: LayerCost) -> list[float]:
        return [size * work.samples(cost.name) / passes.get(cost.name, 1) for size in per_image]

    parameters = {cost.name: cost.parameters for cost in layer_costs(arch, num_classes, work.holds)}
    kept = {cost.name: sizes(kept_for_backward(cost, specs.get(cost.name), variant), cost) for cost in costs}
    padded = first_input_copy(arch, parameters, dtype)
    if padded:  # kept by the first conv, which the part then computes
        first = next(cost for cost in costs if cost.name == arch.convs[0].name)
        kept[first.name] += sizes([padded], first)
    temporaries = {cost.name: sizes(backward_temporaries(cost, specs.get(cost.name), variant), cost)
                   for cost in costs}
    outputs = {cost.name: sizes([math.prod(cost.output_shape) * dtype.itemsize], cost)[0] for cost in costs}
    copies = {name: count * dtype.itemsize for name, count in cast_weights(work, parameters, dtype).items()}
    return StepBlocks(kept, temporaries, {name: count * PARAMETERS.itemsize for name, count in parameters.items()},
                      outputs, 3 * IMAGE_SIZE ** 2 * work.conv_samples * IMAGES.itemsize, copies)


def heap_served_bytes(blocks: StepBlocks, added: Collection[str] = (),
                      transient: Mapping[tuple[str, str], LargeBlocks] | None = None) -> dict[tuple[str, str], float]:
    """Per (layer, direction), the bytes of the blocks of `malloc.FRESH_BLOCK_BYTES` and up that one of the layer's
    passes allocates which a steady process's heap serves (a free chunk fits them), so that their pages are mapped
    already. The step is walked block by block (`blocks`): each forward allocates what autograd keeps of it; each
    backward its weight gradient and its smaller temporaries, then frees the temporaries, what its forward kept, and
    the gradient where it is added into one held already (`added`); the rest of the gradients at the step's end. The
    large blocks a pass allocates and frees within it (`transient`, by (layer, direction), as measured: a backward's
    large temporaries, the kernels' own scratch) are walked as blocks of the layer's output, in turns of as many as
    it has live at once. The heap holds every smaller block, growing where its free room is short and never
    shrinking (`malloc.steady_malloc`), and serves a large block where its free room fits it, taken as one chunk:
    no fragmentation, the most it serves. Walked for a few steps, the heap's size carried over."""
    transient = transient or {}
    layers = list(blocks.kept)
    # the images, weights, momentum and the gradients added into stay all step; the heap holds the smaller of them
    resident = [blocks.images, *blocks.held.values(), *blocks.held.values(),
                *(blocks.held.get(name, 0.0) for name in added)]
    heap = 0.0
    for _ in range(HEAP_STEPS):
        walk = HeapWalk(heap, sum(size for size in resident if not mapped_afresh(size)))
        forward: dict[str, list[Allocation]] = {}
        copies = [walk.allocate(blocks.copies[name], (name, FORWARD)) for name in layers if blocks.copies.get(name)]
        for name in layers:
            forward[name] = [walk.allocate(size, (name, FORWARD)) for size in blocks.kept[name]]
            walk.pass_transient(transient.get((name, FORWARD)), blocks.output[name], (name, FORWARD))
        gradients: list[Allocation] = []
        for name in reversed(layers):
            gradient = [walk.allocate(blocks.held[name], (name, BACKWARD))] if blocks.held.get(name) else []
            made = [walk.allocate(size, (name, BACKWARD)) for size in blocks.temporaries[name]
                    if not mapped_afresh(size)]
            walk.pass_transient(transient.get((name, BACKWARD)), blocks.output[name], (name, BACKWARD))
            walk.free([*made, *forward[name], *(gradient if name in added else [])])
            gradients += [] if name in added else gradient
        walk.free([*gradients, *copies])
        heap = walk.heap
    return walk.served


@dataclass(frozen=True)
class Allocation:
    size: float
    in_heap: bool  # or mapped afresh


class HeapWalk:
    """A steady process's heap over one step (`heap_served_bytes`): its size, what it holds now, and the bytes of
    the large blocks it served, by (layer, direction)."""

    def __init__(self, heap: float, held: float) -> None:
        self.heap, self.used = max(heap, held), held
        self.served: dict[tuple[str, str], float] = defaultdict(float)

    def allocate(self, size: float, where: tuple[str, str]) -> Allocation:
        """A block of `size` allocated at `where`: a smaller one from the heap, grown to fit it where its free room
        is short; a large one from the heap where its free room fits it, otherwise mapped afresh."""
        if mapped_afresh(size):
            if self.heap - self.used < size:
                return Allocation(size, in_heap=False)
            self.served[where] += size
        self.used += size
        self.heap = max(self.heap, self.used)
        return Allocation(size, in_heap=True)

    def free(self, blocks: list[Allocation]) -> None:
        self.used -= sum(block.size for block in blocks if block.in_heap)

    def pass_transient(self, transient: LargeBlocks | None, output: float, where: tuple[str, str]) -> None:
        """The large blocks a pass at `where` allocates and frees within it (`transient`): as many blocks of its
        layer's `output` bytes (at least `malloc.FRESH_BLOCK_BYTES`) as they come to, one at least, in turns of as
        many as its bytes live at once come to, each turn held together and freed before the next."""
        if transient and transient.allocated:
            count = max(1, round(transient.allocated / max(output, FRESH_BLOCK_BYTES)))
            size = transient.allocated / count
            at_once = min(count, max(1, round(transient.at_once / size)))
            for first in range(0, count, at_once):
                self.free([self.allocate(size, where) for _ in range(min(at_once, count - first))])


def held_shares(shard: Callable[[str, torch.Size, int, int], tuple | None], arch: str, part: int, parts: int,
                num_classes: int = 1000) -> dict[str, float]:
    """The share of each layer's weight that `part` of `parts` holds, by `shard` (a layout's, or a tower's)."""
    shares = {}
    for key, shape in full_shapes(arch, num_classes).items():
        if key.endswith(".weight"):
            block = shard(key, shape, part, parts)
            held = 0 if block is None else torch.empty(shape, device="meta")[block].numel()
            shares[key.split(".")[0]] = held / shape.numel()
    return shares
