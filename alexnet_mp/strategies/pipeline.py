"""pipeline: the net cut by depth into N stages, one per rank (`torch.distributed.pipelining`), running the
global batch in M micro-batches: GPipe (every micro-batch's forward, then every backward) or 1F1B (one
forward, one backward, once the pipeline is full; fewer micro-batches' activations held). Every stage
sees every sample. Each micro-batch's loss is the mean over its samples and the schedule divides the
gradients by M (scale_grads), so the M micro-batches make up the global batch's mean.

At 2 ranks the stages are the conv trunk and the classifier: the cut that sends fewest activations
(9216 per image), though the trunk does 92% of the FLOPs. At more, the cut whose largest stage does
fewest forward FLOPs of the paper net (the owt net takes the same cuts). Each stage is a run of the
net's chain of layers under their own names, so checkpoints move between this layout and any other.

torch's PipelineStage is wrapped thinly (`MeteredStage`) for what the invariant and the ledger need:
each micro-batch's forward draws its own rows' dropout masks, the activations sent on and the gradients
sent back are counted, and the time between a stage's compute chunks is the time it waited (on a
transfer, or on the pipeline's bubble).
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from functools import cache
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from alexnet_mp.blocks import WHOLE, Block, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic, layer_costs
from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import POSITIVE_INT
from alexnet_mp.ledger import BACKWARD, FORWARD
from alexnet_mp.model import PAPER, AlexNet, Architecture, MaskDraw, build_model
from alexnet_mp.strategies.base import Layout
from alexnet_mp.strategies.costs import (
    COMMUNICATION,
    COMPUTE,
    OPTIMIZER,
    Costs,
    PartTimes,
    Span,
    new_traffic,
    split_by,
    step_end,
    unshared,
)
from alexnet_mp.strategies.options import Option

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
SCHEDULE = Option("schedule", "gpipe (every micro-batch's forward, then every backward) or 1f1b", "gpipe",
                  choices=tuple(SCHEDULES), compared=tuple(SCHEDULES))
MICROBATCHES = Option("microbatches", "micro-batches of the global batch, which it must divide", 1,
                      parse=POSITIVE_INT, label="M={}", compared=(1, 2, 4, 8), planned=4)
ACTIVATIONS = "activations"  # the ledger's link: a stage's outputs sent on, its inputs' gradients sent back
PASSES = {"F": FORWARD, "B": BACKWARD}  # a schedule's tasks, by the pass each runs


@cache
def chain() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The names of the net's chain of layers, and of its weight layers among them."""
    with torch.device("meta"):
        net = build_model("paper")
    return tuple(name for name, _ in net.named_children()), tuple(net.layers())


@cache
def stage_layers(stages: int) -> tuple[tuple[str, ...], ...]:
    """The net's chain of layers cut into `stages` runs, each a weight layer and the modules after it up to
    the next (flatten, ReLU, dropout)."""
    layers, weights = chain()
    flops = {cost.name: cost.flops for cost in layer_costs(PAPER)}
    if stages == 2:
        cuts = (weights.index("fc6"),)
    else:  # every way to cut the weight layers into `stages` runs; the one whose largest run is smallest
        cuts = min(itertools.combinations(range(1, len(weights)), stages - 1),
                   key=lambda cut: max(sum(flops[name] for name in weights[a:b])
                                       for a, b in zip((0, *cut), (*cut, len(weights)), strict=True)))
    starts = [layers.index(weights[cut]) for cut in (0, *cuts)]
    return tuple(layers[a:b] for a, b in zip(starts, (*starts[1:], len(layers)), strict=True))


def layer_of(key: str) -> str:
    return key.split(".")[0]


class MeteredStage(PipelineStage):
    """torch's PipelineStage over this rank's run of layers, with the micro-batch's dropout draw set before each
    forward chunk, the tensors it sends counted, and the time between its compute chunks counted as waited: before
    a forward chunk, for its input; before a backward chunk, and after the last, for a gradient (or the drain)."""

    def __init__(self, module: nn.Module, pipeline: Pipeline) -> None:
        super().__init__(module, pipeline.rank, pipeline.world_size, pipeline.device, group=dist.group.WORLD)
        self.pipeline, self.ledger = pipeline, pipeline.ledger
        self.idle_since = self.ledger.clock.stamp()

    def forward_one_chunk(self, fwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self.pipeline.draw_for(fwd_chunk_id)
        self.waited(FORWARD)
        try:
            return super().forward_one_chunk(fwd_chunk_id, *args, **kwargs)
        finally:
            self.idle_since = self.ledger.clock.stamp()

    def backward_one_chunk(self, bwd_chunk_id: int, *args: Any, **kwargs: Any) -> Any:
        self.waited(BACKWARD)
        try:
            return super().backward_one_chunk(bwd_chunk_id, *args, **kwargs)
        finally:
            self.idle_since = self.ledger.clock.stamp()

    def get_fwd_send_ops(self, fwd_chunk_id: int) -> list[dist.P2POp]:
        return self.counted(super().get_fwd_send_ops(fwd_chunk_id), FORWARD)

    def get_bwd_send_ops(self, bwd_chunk_id: int) -> list[dist.P2POp]:
        return self.counted(super().get_bwd_send_ops(bwd_chunk_id), BACKWARD)

    def counted(self, ops: list[dist.P2POp], direction: str) -> list[dist.P2POp]:
        for op in ops:
            self.ledger.record(0, ACTIVATIONS, direction, op.tensor.numel(), op.tensor.element_size())
        return ops

    def waited(self, direction: str) -> None:
        self.ledger.arrive(ACTIVATIONS, direction)
        self.ledger.waited(ACTIVATIONS, direction, self.idle_since, self.ledger.clock.stamp())


def schedule_order(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple[str, int]]:
    """The order in which a stage runs its micro-batches' forwards ("F", m) and backwards ("B", m): GPipe every
    forward, then every backward; 1F1B as torch's Schedule1F1B, min(M, N - stage) forwards to fill the pipeline,
    then a backward and a forward in turn, then the backwards left."""
    if schedule == "gpipe":
        return [("F", m) for m in range(microbatches)] + [("B", m) for m in range(microbatches)]
    warmup = min(microbatches, stages - stage)
    order = [("F", m) for m in range(warmup)]
    for m in range(microbatches - warmup):
        order += [("B", m), ("F", warmup + m)]
    return order + [("B", m) for m in range(microbatches - warmup, microbatches)]


def simulated_schedule(schedule: str, forward_s: list[float], backward_s: list[float], send_forward_s: list[float],
                       send_backward_s: list[float], microbatches: int,
                       slowdown: Callable[[int], float] = unshared) -> list[list[Span]]:
    """Each stage's step, event by event: each stage runs its micro-batches in its schedule's order, a forward once
    the stage before has sent it its input, a backward once the stage after has sent it its gradient (each
    stage's figures are for the whole batch, at its own speed; a micro-batch takes 1/M of them). Stages that
    share cores each run `slowdown(k)` times slower while k of them compute at once. A stage's spans are its
    micro-batches' compute and, before any that had to wait, the wait for its input (the bubble, and the
    transfers), which the stage spends blocked on receiving it."""
    stages = len(forward_s)
    orders = [schedule_order(schedule, s, stages, microbatches) for s in range(stages)]
    done: dict[tuple[str, int, int], float] = {}
    position = [0] * stages
    left: list[float | None] = [None] * stages  # the running task's work left, at the stage's own speed
    started = [0.0] * stages
    free = [0.0] * stages  # since when each stage has had nothing to run
    timeline: list[list[Span]] = [[] for _ in range(stages)]

    def arrival(s: int) -> float | None:
        """When stage `s`'s next task has its input; None while the stage it waits for has not made it."""
        kind, m = orders[s][position[s]]
        if kind == "F":
            ready = 0.0 if s == 0 else done.get(("F", s - 1, m))
            return None if ready is None else ready + (send_forward_s[s - 1] / microbatches if s else 0.0)
        ready = done.get(("F", s, m)) if s == stages - 1 else done.get(("B", s + 1, m))
        return None if ready is None else ready + (send_backward_s[s + 1] / microbatches if s < stages - 1 else 0.0)

    now = 0.0
    while any(position[s] < len(orders[s]) for s in range(stages)):
        waiting = {s: arrival(s) for s in range(stages) if position[s] < len(orders[s]) and left[s] is None}
        for s, at in waiting.items():
            if at is not None and at <= now:
                kind = orders[s][position[s]][0]
                left[s] = (forward_s if kind == "F" else backward_s)[s] / microbatches
                started[s] = now
                if now > free[s]:
                    timeline[s].append(Span(f"{ACTIVATIONS} {PASSES[kind]}", COMMUNICATION, free[s], now))
        busy = [s for s in range(stages) if left[s] is not None]
        pace = slowdown(len(busy)) if busy else 1.0
        finish = min((left[s] * pace for s in busy), default=math.inf)
        start = min((at - now for s, at in waiting.items() if at is not None and left[s] is None), default=math.inf)
        if math.isinf(finish) and math.isinf(start):
            raise ValueError(f"the {schedule} schedule's order deadlocks")
        elapsed = min(finish, start)
        now += elapsed
        for s in busy:
            left[s] -= elapsed / pace
            if elapsed == finish and left[s] * pace <= 1e-12 * max(1.0, now):
                kind, m = orders[s][position[s]]
                done[kind, s, m], left[s], free[s] = now, None, now
                timeline[s].append(Span(f"micro-batch {m} {PASSES[kind]}", COMPUTE, started[s], now))
                position[s] += 1
    return timeline


def layer_by_layer(spans: list[Span], part: PartTimes) -> list[Span]:
    """A stage's spans with each micro-batch's compute cut into its layers', in the order it runs them, each its
    share of the pass: as a trace names them."""
    cut = []
    for span in spans:
        if span.category != COMPUTE:
            cut.append(span)
            continue
        backward = span.name.endswith(BACKWARD)
        layers = [(name, times[backward]) for name, times in part.layers.items() if times[backward]]
        total, start = sum(seconds for _, seconds in layers), span.start_s
        for name, seconds in reversed(layers) if backward else layers:
            end = start + (span.end_s - span.start_s) * seconds / total
            cut.append(Span(f"{name} {BACKWARD if backward else FORWARD}", COMPUTE, start, end))
            start = end
    return cut


class PipelineCosts(Costs):
    @classmethod
    def collective(cls, link: str, direction: str) -> str:
        return "send"

    @classmethod
    def call_elements(cls, link: str, elements: float, world_size: int, config: TrainConfig,
                      parameters: Mapping[str, int]) -> list[float]:
        return split_by(elements, [1.0] * MICROBATCHES.value(config.options))

    @classmethod
    def passes(cls, layer: str, world_size: int, config: TrainConfig) -> int:
        return MICROBATCHES.value(config.options)

    @classmethod
    def timeline(cls, parts: list[PartTimes], world_size: int, config: TrainConfig, blocking: bool,
                 sharing: Callable[[int], float] = unshared) -> list[list[Span]]:
        """The schedule simulated with each stage's own times (`simulated_schedule`), not (M + N - 1) / M. Stages
        that share cores are not all busy at once (the bubble): each runs at its own speed, slowed by how many
        compute beside it."""
        own = sharing(world_size)  # the times given are each stage's with every stage computing at once
        schedule = simulated_schedule(SCHEDULE.value(config.options), [part.forward_s / own for part in parts],
                                      [part.layers_backward_s / own for part in parts],
                                      [part.comm.get((ACTIVATIONS, FORWARD), 0.0) for part in parts],
                                      [part.comm.get((ACTIVATIONS, BACKWARD), 0.0) for part in parts],
                                      MICROBATCHES.value(config.options), sharing)
        timeline = []
        for spans, part in zip(schedule, parts, strict=True):
            done = step_end([spans])
            timeline.append([*layer_by_layer(spans, part),
                             Span("optimizer step", OPTIMIZER, done, done + part.update_s / own)])
        return timeline

    @classmethod
    def slots(cls, world_size: int, config: TrainConfig) -> float:
        """A step's length in micro-batch slots over the M of work: (M + N - 1) / M (GPipe and 1F1B alike)."""
        microbatches = MICROBATCHES.value(config.options)
        return (microbatches + world_size - 1) / microbatches

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        return WHOLE if layer_of(key) in stage_layers(parts)[part] else None

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return batch, batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        """A stage sends its output forward (all but the last) and its input's gradient back (all but the
        first): per image, the last layer's output of the stage before the cut."""
        outputs = {cost.name: math.prod(cost.block_shape) for cost in layer_costs(arch, num_classes)}

        def sent_at_cut(stage: int) -> int:
            return outputs[[name for name in stage_layers(parts)[stage] if name in outputs][-1]] * batch

        traffic = new_traffic()
        if part < parts - 1:
            traffic[ACTIVATIONS, FORWARD] += sent_at_cut(part)
        if part > 0:
            traffic[ACTIVATIONS, BACKWARD] += sent_at_cut(part - 1)
        return traffic


class Pipeline(Layout):
    name = "pipeline"
    costs = PipelineCosts
    options = (SCHEDULE, MICROBATCHES)

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        layers = len(chain()[1])
        if not 2 <= world_size <= layers:
            raise UsageError(f"--mode pipeline cuts the net into one stage per process, 2 to {layers} (its weight "
                             f"layers), not {world_size}")
        if SCHEDULE.value(config.options) == "1f1b" and MICROBATCHES.value(config.options) < world_size:
            raise UsageError(f"--schedule 1f1b fills the pipeline before its first backward: it needs --microbatches "
                             f"{world_size} or more on {world_size} stages; or use --schedule gpipe")

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        return MICROBATCHES.value(config.options)  # every stage sees the whole global batch, in M micro-batches

    def parallelize(self, model: AlexNet) -> nn.Module:
        self.microbatches = MICROBATCHES.value(self.config.options)
        stage = self.place(nn.Sequential(OrderedDict((name, getattr(model, name))
                                                     for name in stage_layers(self.world_size)[self.rank])))
        self.parts_held = [(self.rank, stage)]
        self.stage = MeteredStage(stage, self)
        self.schedule = SCHEDULES[SCHEDULE.value(self.config.options)](self.stage, n_microbatches=self.microbatches,
                                                                     loss_fn=self.scaled_loss, scale_grads=True)
        self.step, self.global_batch, self.loss_scale = 0, 0, 1.0
        return stage

    @property
    def first(self) -> bool:
        return self.rank == 0

    @property
    def last(self) -> bool:
        return self.rank == self.world_size - 1

    def image_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.first else slice(0, 0)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.last else slice(0, 0)

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        return dist.group.WORLD, 1  # the last stage holds the loss; the others add zeros

    def draw_for(self, microbatch: int) -> None:
        """The dropout masks of micro-batch `microbatch`: its rows of the global batch."""
        self.draw_masks(MaskDraw(self.config.seed, self.step, self.global_batch,
                                 rows(self.global_batch, microbatch, self.microbatches)))

    def scaled_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return self.loss(logits, labels) * self.loss_scale

    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        """Forward only (evaluation): the logits on the last stage, an empty tensor on the others."""
        self.step, self.global_batch = step, global_batch
        logits = self.schedule.eval(*((images,) if self.first else ()))
        return logits if self.last else images.new_empty(0)

    def forward_backward(self, images: Tensor, labels: Tensor, step: int, global_batch: int,
                         loss_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                         ) -> tuple[Tensor, Tensor]:
        self.step, self.global_batch, self.loss_scale = step, global_batch, loss_scale
        self.draw_for(0)  # torch's first step infers the stages' shapes by a forward of its own, outside the chunks
        losses: list[Tensor] = []
        self.stage.idle_since = self.ledger.clock.stamp()
        logits = self.schedule.step(*((images,) if self.first else ()), target=labels if self.last else None,
                                    losses=losses)
        self.stage.waited(BACKWARD)  # the drain: sends still travelling after the last chunk
        if not self.last:  # no loss here: a zero of the loss's dtype (the parameters'), which logging sums
            return images.new_empty(0), next(self.model.parameters()).new_zeros(())
        return logits.detach(), torch.stack(losses).detach().mean() / loss_scale
