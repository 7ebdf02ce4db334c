"""`train --trace`: a timeline of a few steps after warm-up on every rank, as a Chrome trace (OUTPUT/trace.json,
one process per rank; Perfetto and chrome://tracing open it).

Spans, by the host's clock (`time.perf_counter`, placed on the wall clock so that the ranks of one host line
up): each weight layer's forward (its module's forward hooks) and backward (from the moment its output's
gradient is wanted, a hook on that output's autograd node, to the moment its weight's gradient is accumulated);
each link's wait, as the ledger times it; the data wait; the optimizer's step. On a GPU the host's clock reads
when the host queued the work, not when the device ran it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from alexnet_mp.strategies import Layout

WARM_UP, TRACED = 2, 3  # steps after the run's first left out, then the steps traced
COMPUTE, COMMUNICATION, DATA, OPTIMIZER = "compute", "communication", "data", "optimizer"
TRACE = "trace.json"


@dataclass
class Tracer:
    rank: int
    spans: list[tuple[str, str, float, float]] = field(default_factory=list)  # name, category, start, end
    active: bool = False
    offset: float = field(default_factory=lambda: time.time() - time.perf_counter())  # perf_counter to wall clock

    def add(self, name: str, category: str, start: float, end: float) -> None:
        if self.active and end > start:
            self.spans.append((name, category, start + self.offset, end + self.offset))

    @contextmanager
    def region(self, name: str, category: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, category, started, time.perf_counter())

    def tracing(self, step: int, first: int) -> bool:
        """Whether `step` (of a run that started at `first`) is one of those traced; turns tracing on or off."""
        self.active = first + WARM_UP <= step < first + WARM_UP + TRACED
        return self.active

    def watch(self, layout: Layout, optimizer: torch.optim.Optimizer) -> None:
        """Hooks on this rank's weight layers, its ledger and its optimizer."""
        for _, part in layout.parts_held:
            for name, module in part.named_children():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    self._watch_layer(name, module)
        layout.ledger.observer = lambda link, direction, start, end: self.add(
            f"{link} {direction}", COMMUNICATION, start, end)
        started: list[float] = []
        optimizer.register_step_pre_hook(lambda *_: started.append(time.perf_counter()))
        optimizer.register_step_post_hook(lambda *_: self.add("optimizer step", OPTIMIZER, started.pop(),
                                                               time.perf_counter()))

    def _watch_layer(self, name: str, layer: nn.Module) -> None:
        forward_started: list[float] = []
        backward_started: list[float] = []

        def before(module: nn.Module, args: Any) -> None:
            forward_started.append(time.perf_counter())

        def after(module: nn.Module, args: Any, output: Any) -> None:
            self.add(f"{name} forward", COMPUTE, forward_started.pop(), time.perf_counter())
            if self.active and isinstance(output, torch.Tensor) and output.grad_fn is not None:
                output.grad_fn.register_prehook(lambda grads: backward_started.append(time.perf_counter()))

        def accumulated(param: torch.Tensor) -> None:
            if backward_started:
                self.add(f"{name} backward", COMPUTE, backward_started.pop(), time.perf_counter())

        layer.register_forward_pre_hook(before)
        layer.register_forward_hook(after)
        weight = getattr(layer, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.requires_grad:
            weight.register_post_accumulate_grad_hook(accumulated)

    def events(self) -> list[dict[str, Any]]:
        """This rank's spans as Chrome trace events: compute, data and the optimizer on one row, communication on
        another."""
        meta = [{"ph": "M", "name": "process_name", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        return meta + [{"name": name, "cat": category, "ph": "X", "pid": self.rank,
                        "tid": 1 if category == COMMUNICATION else 0, "ts": start * 1e6, "dur": (end - start) * 1e6}
                       for name, category, start, end in self.spans]


def write_trace(tracer: Tracer, output: Path, main: bool) -> Path | None:
    """Every rank's events, gathered to the main process, which writes OUTPUT/trace.json."""
    events = tracer.events()
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, events)
        events = [event for rank_events in gathered for event in rank_events]
    if not main:
        return None
    (output / TRACE).write_text(json.dumps({"traceEvents": events, "displayTimeUnit": "ms"}) + "\n")
    return output / TRACE
