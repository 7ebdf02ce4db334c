"""The cost model fed by a hardware profile: a layout's step walked over what the machine costs.

What a layout does per step comes from its `Costs` (strategies/costs.py): the share of each layer each part computes
and on how many images, the elements it sends on each link, which collective carries each and in calls of which
sizes, and how its parts' times make up the step (its timeline: each part's layers in order, waiting at each
collective for every part and for what of it does not run beside the compute; a pipeline's schedule simulated event
by event). What the machine costs comes from a `Hardware` profile (hardware.py): each layer's time at the share a
part holds, a gradient's addition to the one accumulated, the optimizer's step, each collective's time at the sizes
of its calls, and whether ranks share cores. A prediction is the first walked over the second.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import (
    PARAMETERS,
    LayerCost,
    RankWork,
    StepBlocks,
    Traffic,
    activation_bytes,
    heap_served_bytes,
    held_together,
    layer_costs,
    memory_bytes,
    parameters,
    step_blocks,
)
from alexnet_mp.hardware import Hardware
from alexnet_mp.ledger import BACKWARD, FORWARD
from alexnet_mp.malloc import LargeBlocks
from alexnet_mp.model import ARCHITECTURES
from alexnet_mp.speed import EAGER, Variant
from alexnet_mp.strategies import LAYOUTS
from alexnet_mp.strategies.costs import Costs, PartTimes, Span, busy_s, step_end

T = TypeVar("T")


@dataclass(frozen=True)
class StepFigures:
    """A step in the terms the cost model predicts: its time, rank 0's compute and communication wait, the
    bytes each rank sends, and the memory each rank's training takes (None where a record lacks it)."""

    step_s: float
    compute_s: float
    comm_s: float
    bytes_per_rank: list[float]
    memory_mb: list[float] | None


@dataclass(frozen=True)
class StepPrediction:
    step_s: float
    compute_s: list[float]  # per process: forward, backward and the optimizer's step, as its schedule runs them
    comm_s: list[float]  # per process: its collectives, latency and transfer
    bytes_per_rank: list[float]
    memory_bytes: list[float]  # per process: its tensors at their peak, and what the profile says it keeps beyond
    timeline: list[list[Span]]  # per process: what it does when in the step

    def figures(self) -> StepFigures:
        """In the record's terms, which times rank 0's step: its compute, and the rest of the step, which it spends
        blocked on its links or waiting for another rank."""
        return StepFigures(self.step_s, self.compute_s[0], self.step_s - self.compute_s[0], self.bytes_per_rank,
                           [memory / 2**20 for memory in self.memory_bytes])


@dataclass(frozen=True)
class PartPlan:
    """One part of a layout's step in the terms the model costs: its work, the parameters it holds by layer, the
    layers it computes, each one's passes and the gradients its backward adds into one held already, the blocks
    of its step, the layers whose parameters are DTensors, the elements it sends on each link, and the bytes of an
    element on each link."""

    work: RankWork
    held: dict[str, int]
    shared: list[LayerCost]
    passes: dict[str, int]
    additions: dict[str, int]
    blocks: StepBlocks
    dtensors: set[str]
    traffic: Traffic
    element_bytes: dict[str, int]

    def sent_bytes(self, links: Collection[str] | None = None) -> float:
        """The bytes it sends in a step on `links` (on every link where None)."""
        return sum(elements * self.element_bytes[link] for (link, _), elements in self.traffic.items()
                   if links is None or link in links)

    @property
    def added(self) -> set[str]:
        return {name for name, count in self.additions.items() if count}

    @property
    def foreach_parameters(self) -> int:
        """The parameters it holds as DTensors, which the optimizer steps foreach."""
        return sum(self.held[name] for name in self.dtensors)


@dataclass(frozen=True)
class ProcessMemory:
    """A process's tensors at their peak (`cost.memory_bytes`), of them its activations and what it gathers for a
    while (FSDP's whole units), and the bytes of the blocks it maps afresh after that peak."""

    tensors: float
    activations: float
    gathered: float
    mapped_later: float


def plan_parts(mode: str, arch: str, ranks: int, batch: int, num_classes: int = 1000,
               options: Mapping[str, Any] | None = None, variant: Variant = EAGER) -> list[PartPlan]:
    """Each part of `mode`'s step (with its `options`) on `ranks` ranks at global batch `batch`, run as `variant`
    says."""
    config = TrainConfig(mode=mode, arch=arch, batch_size=batch, num_classes=num_classes, options=dict(options or {}))
    costs: type[Costs] = LAYOUTS[mode].costs
    architecture, parts = ARCHITECTURES[arch], costs.parts(ranks)
    traffic = costs.expected_traffic(arch, ranks, batch, num_classes)
    plans = []
    for part in range(parts):
        work = costs.work(arch, part, parts, batch, num_classes)
        held = {cost.name: cost.parameters for cost in layer_costs(architecture, num_classes, work.holds)}
        shared = layer_costs(architecture, num_classes, work.shares)
        passes = {cost.name: costs.passes(cost.name, ranks, config) for cost in shared}
        additions = {cost.name: costs.gradient_additions(cost.name, ranks, config, traffic[part], held)
                     for cost in shared}
        plans.append(PartPlan(work, held, shared, passes, additions,
                              step_blocks(work, architecture, num_classes, passes, variant),
                              {name for name in held if costs.holds_dtensors(name)}, traffic[part],
                              {link: costs.element_bytes(link, variant.compute_dtype) for link, _ in traffic[part]}))
    return plans


def process_memory(mode: str, arch: str, ranks: int, batch: int, num_classes: int = 1000,
                   options: Mapping[str, Any] | None = None, variant: Variant = EAGER) -> list[ProcessMemory]:
    """Each process's memory at its peak (`ProcessMemory`) in `mode`'s step, run as `variant` says: a process that
    holds several parts (the paper split's towers on one device) holds each one's (`cost.held_together`)."""
    return _process_memory(plan_parts(mode, arch, ranks, batch, num_classes, options, variant), arch, num_classes,
                           ranks, variant)


def _process_memory(plans: list[PartPlan], arch: str, num_classes: int, ranks: int,
                    variant: Variant) -> list[ProcessMemory]:
    architecture = ARCHITECTURES[arch]
    processes = []
    for held in _by_process(plans, len(plans) // ranks):
        kinds = held_together([memory_bytes(plan.work, architecture, num_classes, variant, plan.foreach_parameters,
                                            plan.added) for plan in held])
        # where the peak is the backward's, the foreach kernel's copies map afresh at the optimizer's step after it
        later = 0.0 if kinds["optimizer"] else sum(plan.blocks.foreach_copies_mapped(plan.dtensors) for plan in held)
        processes.append(ProcessMemory(sum(kinds.values()), activation_bytes(kinds),
                                       kinds["gathered"], later))
    return processes


def _by_process(parts: list[T], together: int) -> list[list[T]]:
    """`parts` in the groups of `together` that one process holds, in order."""
    return [parts[first:first + together] for first in range(0, len(parts), together)]


def predict_step(mode: str, arch: str, ranks: int, batch: int, hardware: Hardware, num_classes: int = 1000,
                 options: Mapping[str, Any] | None = None) -> StepPrediction:
    """The step of `mode` (with its `options`) on `ranks` ranks at global batch `batch`, on `hardware`, in the
    precision its layers ran in. A process that holds several parts (the paper split's towers on one device) runs
    them in turn, and their links are copies within it, not collectives."""
    config = TrainConfig(mode=mode, arch=arch, batch_size=batch, num_classes=num_classes, options=dict(options or {}))
    costs: type[Costs] = LAYOUTS[mode].costs
    architecture = ARCHITECTURES[arch]
    plans = plan_parts(mode, arch, ranks, batch, num_classes, options, hardware.variant)
    together = len(plans) // ranks
    fresh = costs.fresh_bytes(architecture, num_classes)
    times = []
    for plan in plans:
        work, held = plan.work, plan.held
        served = _heap_served(hardware, arch, ranks, work, plan.blocks, plan.passes, plan.added)
        layers = {}
        for cost in plan.shared:
            forward, backward = hardware.layer_s(
                f"{arch}.{cost.name}", work.shares[cost.name], ranks, cost.flops, work.samples(cost.name),
                plan.passes[cost.name],
                {direction: served[cost.name, direction] for direction in (FORWARD, BACKWARD)})
            accumulate = hardware.accumulate_s(
                plan.additions[cost.name] * held.get(cost.name, 0) * PARAMETERS.itemsize, ranks)
            copied = {direction: hardware.fresh_copy_s(fresh.get((cost.name, direction), 0.0), ranks)
                      for direction in (FORWARD, BACKWARD)}
            layers[cost.name] = forward + copied[FORWARD], backward + accumulate + copied[BACKWARD]
        foreach = plan.foreach_parameters
        update = hardware.optimizer_s(parameters(work, architecture, num_classes) - foreach, foreach, ranks)
        comm = {} if together > 1 else {
            (link, direction): sum(hardware.collective(costs.collective(link, direction), ranks).seconds(
                call * plan.element_bytes[link]) for call in costs.call_elements(link, elements, ranks, config, held))
            for (link, direction), elements in plan.traffic.items()}
        times.append(PartTimes({name: layers.get(name, (0.0, 0.0)) for name in architecture.layer_names}, update,
                               comm, held))
    sent = [plan.sent_bytes() for plan in plans]
    if together > 1:
        times = [PartTimes.together(held) for held in _by_process(times, together)]
        sent = [sum(held) for held in _by_process(sent, together)]
    memory = [hardware.resident_bytes(process.tensors, process.activations, process.gathered, ranks,
                                      process.mapped_later)
              for process in _process_memory(plans, arch, num_classes, ranks, hardware.variant)]
    timeline = costs.timeline(times, ranks, config, blocking=hardware.backend == "gloo", sharing=hardware.sharing)
    return StepPrediction(step_end(timeline), [busy_s(spans) for spans in timeline],
                          [sum(part.comm.values()) for part in times], sent, memory, timeline)


def predict_run(mode: str, arch: str, ranks: int, batch: int, hardware: Hardware, num_classes: int,
                options: Mapping[str, Any], ran: Variant) -> StepPrediction:
    """A measured run's step, `predict_step`'s, where `hardware`'s layers ran as the run did (`ran`); refused in one
    line (UsageError) otherwise, as where the profile lacks what the step needs."""
    hardware.check_times(ran)
    return predict_step(mode, arch, ranks, batch, hardware, num_classes, options)


def _heap_served(hardware: Hardware, arch: str, ranks: int, work: RankWork, blocks: StepBlocks,
                 passes: Mapping[str, int], added: set[str]) -> dict[tuple[str, str], float]:
    """Per (layer, direction), the bytes of a pass's large blocks its heap serves (`cost.heap_served_bytes`): those
    the memory model has outlast the pass, and as the blocks it frees within it, what the profile measured it to map
    afresh beyond them, in all and at once (the lasting blocks are live at its peak)."""
    lasting = blocks.lasting_fresh_bytes()
    transient = {(name, direction): LargeBlocks(*(max(measured - lasting.get((name, direction), 0.0), 0.0)
                                                  for measured in (fresh.allocated, fresh.at_once)))
                 for name in blocks.kept
                 for direction, fresh in hardware.fresh_blocks(f"{arch}.{name}", work.shares[name], ranks,
                                                              work.samples(name), passes[name]).items()}
    return heap_served_bytes(blocks, added, transient)


def relative_error(predicted: float, measured: float) -> float | None:
    return predicted / measured - 1 if measured else None


@dataclass(frozen=True)
class Held:
    """A prediction held to its measurement: one run's step, both ways, and each figure's relative error (bytes
    and memory: of the rank with the most); and the predicted step's timeline, each process's spans."""

    run: str
    measured: StepFigures
    predicted: StepFigures
    timeline: list[list[Span]]

    @property
    def error(self) -> dict[str, float | None]:
        measured, predicted = self.measured, self.predicted
        return {"step_s": relative_error(predicted.step_s, measured.step_s),
                "compute_s": relative_error(predicted.compute_s, measured.compute_s),
                "comm_s": relative_error(predicted.comm_s, measured.comm_s),
                "bytes_per_rank": relative_error(max(predicted.bytes_per_rank), max(measured.bytes_per_rank)),
                "memory_mb": relative_error(max(predicted.memory_mb), max(measured.memory_mb))
                if predicted.memory_mb and measured.memory_mb else None}

    @property
    def busiest_idle_share(self) -> float:
        """The share of the predicted step that the rank computing most of it spends not computing."""
        return min(1 - busy_s(spans) / self.predicted.step_s for spans in self.timeline)

    def to_json(self) -> dict[str, Any]:
        return {"run": self.run, "measured": asdict(self.measured), "predicted": asdict(self.predicted),
                "error": self.error,
                "predicted_timeline": [[asdict(span) for span in spans] for spans in self.timeline]}


def disordered(runs: list[tuple[str, float, float]], margin: float = 0.15,
               launches: Mapping[str, list[float]] | None = None) -> list[str]:
    """Of (run, measured step, predicted step): the pairs whose measured order the prediction reverses, where
    their measurements differ by more than `margin` (closer ones are within the noise of a short run). Where the
    runs were measured in several launches (`launches`: each run's step in each, in launch order), a pair says
    how many launches measured its two runs the other way round: a reversal they disagree on is the machine's."""
    wrong = []
    for i, a in enumerate(runs):
        for b in runs[i + 1:]:
            (faster, fast_measured, fast_predicted), (slower, slow_measured, slow_predicted) = sorted(
                (a, b), key=lambda run: run[1])
            if slow_measured > (1 + margin) * fast_measured and fast_predicted > slow_predicted:
                each = [(launches or {}).get(run, []) for run in (faster, slower)]
                paired = list(zip(*each, strict=True)) if len(each[0]) == len(each[1]) else []  # a launch failed
                flipped = sum(fast >= slow for fast, slow in paired)
                wrong.append(f"{faster} measured faster than {slower}, predicted slower"
                             + (f" ({flipped} of {len(paired)} launches measured it slower)" if flipped else ""))
    return wrong


def order_said(runs: list[tuple[str, float, float]], launches: Mapping[str, list[float]] | None = None) -> str:
    """Whether the predicted order of (run, measured step, predicted step) is the measured one, in words."""
    wrong = disordered(runs, launches=launches)
    return "as measured" if not wrong else "reversed: " + "; ".join(wrong)


def held_table(held: list[Held]) -> list[list[str]]:
    """A row per run: each figure measured, predicted, and the error (`HELD_HEADER`)."""
    def cell(measured: float, predicted: float, error: float | None, scale: float, digits: int = 0) -> str:
        said = f"{scale * measured:,.{digits}f} / {scale * predicted:,.{digits}f}"
        return said if error is None else f"{said} ({error:+.0%})"

    rows = []
    for h in held:
        m, p, e = h.measured, h.predicted, h.error
        memory = cell(max(m.memory_mb), max(p.memory_mb), e["memory_mb"], 1) if m.memory_mb and p.memory_mb else "-"
        rows.append([h.run, cell(m.step_s, p.step_s, e["step_s"], 1000, 1),
                     cell(m.compute_s, p.compute_s, e["compute_s"], 1000, 1),
                     cell(m.comm_s, p.comm_s, e["comm_s"], 1000, 1),
                     cell(max(m.bytes_per_rank), max(p.bytes_per_rank), e["bytes_per_rank"], 1e-6, 1), memory])
    return rows


# Rank 0's, as the record times it: compute, its step less the time it waited on its links; comm, that wait (its
# collectives, and any wait for another rank or stage, as the predicted timeline places them)
HELD_HEADER = ["run (measured / predicted (error))", "step ms", "rank 0: compute ms", "rank 0: comm wait ms",
               "MB sent by the busiest rank", "training MiB, the largest rank"]


def held_said(held: list[Held], launches: Mapping[str, list[float]] | None = None) -> str:
    """The median and largest step error, and whether the predicted order of the layouts is the measured one (with
    each run's step in each launch, where it was launched several times)."""
    errors = sorted(abs(h.error["step_s"]) for h in held)
    return (f"median |step error| {errors[len(errors) // 2]:.0%}, largest {errors[-1]:.0%}; order of the layouts "
            + order_said([(h.run, h.measured.step_s, h.predicted.step_s) for h in held], launches))
