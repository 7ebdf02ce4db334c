"""The cost model fed by a hardware profile: a layout's step walked over what the machine costs.

What a layout does per step comes from its `Costs` (strategies/costs.py): the share of each layer each part
computes and on how many images, the elements it sends on each link, which collective carries each and in
how many calls, and how its parts' times make up the step (the slowest part's sum; a pipeline's schedule
simulated tick by tick). What the machine costs comes from a `Hardware` profile (hardware.py): each layer's
time at the share a part holds, the optimizer's step, each collective's latency and bandwidth, and whether
ranks share cores. A prediction is the first walked over the second.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from alexnet_mp.cost import layer_costs, memory_bytes, parameters
from alexnet_mp.hardware import Hardware
from alexnet_mp.model import ARCHITECTURES
from alexnet_mp.strategies import LAYOUTS
from alexnet_mp.strategies.costs import Costs

BYTES_PER_ELEMENT = 4  # float32 on every link


@dataclass(frozen=True)
class StepPrediction:
    step_s: float
    compute_s: list[float]  # per part: forward, backward and the optimizer's step
    comm_s: list[float]  # per part: its collectives, latency and transfer
    bytes_per_rank: list[float]
    memory_bytes: list[float]  # per part: weights, gradients, momentum, gathered, activations


def predict_step(mode: str, arch: str, ranks: int, batch: int, hardware: Hardware, num_classes: int = 1000,
                 options: Mapping[str, Any] | None = None) -> StepPrediction:
    """The step of `mode` (with its `options`) on `ranks` ranks at global batch `batch`, on `hardware`."""
    from alexnet_mp.config import TrainConfig

    config = TrainConfig(mode=mode, arch=arch, batch_size=batch, num_classes=num_classes, options=dict(options or {}))
    costs: type[Costs] = LAYOUTS[mode].costs
    architecture, parts = ARCHITECTURES[arch], costs.parts(ranks)
    traffic = costs.expected_traffic(arch, ranks, batch, num_classes)
    forward, backward, comm, memory = [], [], [], []
    for part in range(parts):
        work = costs.work(arch, part, parts, batch, num_classes)
        layers = [tuple(seconds * work.samples(cost.name) for seconds in
                        hardware.layer_s(f"{arch}.{cost.name}", work.shares[cost.name], ranks, cost.flops))
                  for cost in layer_costs(architecture, num_classes, work.shares)]
        forward.append(sum(f for f, _ in layers))
        backward.append(sum(b for _, b in layers) + hardware.optimizer_s(parameters(work, architecture, num_classes),
                                                                          ranks))
        comm.append({(link, direction): hardware.collective(costs.collective(link, direction), ranks).seconds(
                         elements * BYTES_PER_ELEMENT, costs.calls(link, elements, ranks, config))
                     for (link, direction), elements in traffic[part].items()})
        memory.append(sum(memory_bytes(work, architecture, num_classes, BYTES_PER_ELEMENT).values()))
    step = costs.step_s(forward, backward, comm, ranks, config, blocking=hardware.backend == "gloo")
    return StepPrediction(step, [f + b for f, b in zip(forward, backward, strict=True)],
                          [sum(c.values()) for c in comm],
                          [BYTES_PER_ELEMENT * sum(t.values()) for t in traffic], memory)
