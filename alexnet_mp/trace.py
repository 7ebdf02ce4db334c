"""`train --trace`: a timeline of a few steps after warm-up on every rank, as a Chrome trace (OUTPUT/trace.json,
one process per rank; Perfetto and chrome://tracing open it).

Spans, by the clock of the device the rank computes on (timing.py: CUDA events on the stream that runs the work on a
GPU, the host's perf counter on a CPU), placed on the wall clock so that the ranks of one host line up: each weight
layer's forward (its module's forward hooks, each before any a layout put there) and backward (from the moment its
output's gradient is ready, a hook on that output before any a layout put there, to the moment its parameters'
gradients are accumulated and the hooks on their accumulation have run: DDP's copies into its buckets); each link's
wait, as the ledger times it (on a GPU, how long the stream stalled on it), cut out of any span it falls in; the
data wait (the host's); the optimizer's step.
A process that drives two GPUs (the one-process split) is timed on its first device's stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.graph import get_gradient_edge

from alexnet_mp.strategies import Layout
from alexnet_mp.timing import Clock, HostClock

WARM_UP, TRACED = 2, 3  # steps after the run's first left out, then the steps traced
COMPUTE, COMMUNICATION, DATA, OPTIMIZER = "compute", "communication", "data", "optimizer"
TRACE = "trace.json"


@dataclass
class Tracer:
    rank: int
    clock: Clock = field(default_factory=HostClock)  # the ledger's, whose waits it is told of
    spans: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # name, category, start, end: the clock's
    host_spans: list[tuple[str, str, float, float]] = field(default_factory=list)  # the same on the wall clock
    active: bool = False
    accumulators: list[Any] = field(default_factory=list)  # the parameters' gradient accumulators, kept alive

    def add(self, name: str, category: str, start: Any, end: Any) -> None:
        """A span between two of the clock's stamps, read when the trace is written (on a GPU, reading waits)."""
        if self.active:
            self.spans.append((name, category, start, end))

    def add_host(self, name: str, category: str, start: float, end: float) -> None:
        """A span of the host's own, such as its wait for data, between two wall-clock times."""
        if self.active:
            self.host_spans.append((name, category, start, end))

    @contextmanager
    def region(self, name: str, category: str) -> Iterator[None]:
        started = self.clock.stamp()
        try:
            yield
        finally:
            self.add(name, category, started, self.clock.stamp())

    def tracing(self, step: int, first: int) -> bool:
        """Whether `step` (of a run that started at `first`) is one of those traced; turns tracing on or off."""
        self.active = first + WARM_UP <= step < first + WARM_UP + TRACED
        return self.active

    def watch(self, layout: Layout, optimizer: torch.optim.Optimizer) -> None:
        """Hooks on this rank's weight layers, its ledger and its optimizer; the ledger's clock times them all."""
        self.clock = layout.ledger.clock
        for _, part in layout.parts_held:
            for name, module in part.named_children():
                if isinstance(module, nn.Conv2d | nn.Linear):
                    self._watch_layer(name, module)
        layout.ledger.observer = lambda link, direction, start, end: self.add(
            f"{link} {direction}", COMMUNICATION, start, end)
        started: list[Any] = []
        optimizer.register_step_pre_hook(lambda *_: started.append(self.clock.stamp()))
        optimizer.register_step_post_hook(lambda *_: self.add("optimizer step", OPTIMIZER, started.pop(),
                                                               self.clock.stamp()))

    def _watch_layer(self, name: str, layer: nn.Module) -> None:
        forward_started: list[Any] = []
        backward_started: list[Any] = []
        latest: list[int] = []  # this layer's latest backward span, which its parameters' accumulations extend

        def before(module: nn.Module, args: Any) -> None:
            forward_started.append(self.clock.stamp())

        def after(module: nn.Module, args: Any, output: Any) -> None:
            self.add(f"{name} forward", COMPUTE, forward_started.pop(), self.clock.stamp())
            if self.active and isinstance(output, torch.Tensor) and output.grad_fn is not None:
                output.register_hook(backward_began)

        def backward_began(gradient: Any) -> None:
            latest.clear()
            backward_started.append(self.clock.stamp())

        def accumulated(*_: Any) -> None:
            """A parameter's gradient accumulated, or the hooks on its accumulation done: the backward lasts to here."""
            if backward_started:
                self.add(f"{name} backward", COMPUTE, backward_started.pop(), self.clock.stamp())
                latest[:] = [len(self.spans) - 1] if self.active else []
            elif latest and self.active:  # not into a step after the last traced
                self.spans[latest[0]] = (*self.spans[latest[0]][:3], self.clock.stamp())

        # Before the hooks a layout put there first: FSDP2 gathers the layer's parameters and copies them out before
        # its forward, and after it hooks its output to do the same before its backward; the waits are cut out of
        # the spans (`without_waits`), the copies are the layer's passes.
        layer.register_forward_pre_hook(before, prepend=True)
        layer.register_forward_hook(after, prepend=True)
        for parameter in layer.parameters(recurse=False):
            if parameter.requires_grad:
                # The hooks on a gradient's accumulator (DDP's copy into its bucket, its launch of the bucket's
                # reduction) run after the gradient is accumulated and before the next layer's backward: the span
                # lasts until they have run for every parameter. FSDP2 calls the post-accumulate hook itself, after
                # its reduce-scatter. The tracer holds the accumulators, as DDP does, so that every step's graph
                # reaches the same ones.
                parameter.register_post_accumulate_grad_hook(accumulated)
                accumulator = get_gradient_edge(parameter).node
                accumulator.register_hook(accumulated)
                self.accumulators.append(accumulator)

    def events(self) -> list[dict[str, Any]]:
        """This rank's spans as Chrome trace events: compute, data and the optimizer on one row, communication on
        another."""
        meta = [{"ph": "M", "name": "process_name", "pid": self.rank, "args": {"name": f"rank {self.rank}"}}]
        spans = without_waits([(name, category, self.clock.wall(start), self.clock.wall(end))
                               for name, category, start, end in self.spans]) + self.host_spans
        return meta + [{"name": name, "cat": category, "ph": "X", "pid": self.rank,
                        "tid": 1 if category == COMMUNICATION else 0, "ts": start * 1e6, "dur": (end - start) * 1e6}
                       for name, category, start, end in spans if end > start]


def without_waits(spans: list[tuple[str, str, float, float]]) -> list[tuple[str, str, float, float]]:
    """A rank's spans, its compute and optimizer spans cut where it waited on a link: a wait blocks the thread that
    computes, and can fall inside a span (FSDP2 reduce-scatters a layer's gradients before it hands them over)."""
    waits = [(start, end) for _, category, start, end in spans if category == COMMUNICATION]
    cut = []
    for name, category, start, end in spans:
        pieces = [(start, end)]
        if category in (COMPUTE, OPTIMIZER):
            for wait_start, wait_end in waits:
                pieces = [piece for begin, finish in pieces
                          for piece in ((begin, min(finish, wait_start)), (max(begin, wait_end), finish))
                          if piece[1] > piece[0]]
        cut += [(name, category, begin, finish) for begin, finish in pieces]
    return cut


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
