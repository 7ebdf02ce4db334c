"""`train --trace`: a Chrome trace of a few steps on every rank, whose spans nest and cover the step, read off the
device's clock."""

from __future__ import annotations

import itertools
import json
import time
from collections import OrderedDict
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.autograd.graph import get_gradient_edge

from alexnet_mp.report import trace_spans, traced_step
from alexnet_mp.timing import DeviceClock, HostClock
from alexnet_mp.trace import COMMUNICATION, COMPUTE, DATA, TRACED, Tracer, without_waits
from tests.clocks import DeferredClock
from tests.equivalence import PAPER_NET
from tests.launching import process_state_restored

LAYERS = ("conv1", "conv2", "conv3", "conv4", "conv5", "fc6", "fc7", "fc8")


@pytest.fixture(scope="module")
def trace(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("traced")
    with process_state_restored():
        from alexnet_mp.cli import main

        main(["train", "--mode", "single", "--arch", PAPER_NET, "--batch-size", "4", "--num-classes", "10", "--steps",
              "6", "--workers", "0", "--no-checkpoints", "--trace", "--output-dir", str(out)])
    return {"events": json.loads((out / "trace.json").read_text())["traceEvents"], "path": out / "trace.json"}


@pytest.mark.slow  # trains a few steps in this process
def test_a_traced_run_records_each_layers_forward_and_backward_and_the_optimizer_in_each_traced_step(trace):
    names = [event["name"] for event in trace["events"] if event["ph"] == "X"]
    for layer in LAYERS:
        assert names.count(f"{layer} forward") == TRACED and names.count(f"{layer} backward") == TRACED, layer
    assert names.count("optimizer step") == TRACED


@pytest.mark.slow  # trains a few steps in this process
def test_a_traced_steps_compute_spans_follow_one_another_and_cover_most_of_it(trace):
    spans = traced_step(trace_spans(trace["path"]))[0]
    compute = sorted((start, end) for category, start, end in spans if category in ("compute", "optimizer"))
    assert all(later >= earlier_end - 1e-6 for (_, earlier_end), (later, _) in itertools.pairwise(compute))
    step = compute[-1][1] - compute[0][0]
    assert sum(end - start for start, end in compute) >= 0.8 * step


@pytest.mark.slow  # trains a few steps in this process
def test_every_span_of_a_trace_ends_within_the_steps_it_traced(trace):
    """The run goes on past its traced steps: hooks that fire there add to no traced span."""
    spans = [event for event in trace["events"] if event["ph"] == "X"]
    step_ends = {"optimizer step", "data wait (next batch)"}  # each traced step ends with them, in this order
    last_step_end = max(event["ts"] + event["dur"] for event in spans if event["name"] in step_ends)
    assert max(event["ts"] + event["dur"] for event in spans) <= last_step_end


@pytest.mark.slow  # trains a few steps in this process
def test_a_trace_names_each_rank_as_a_process(trace):
    meta = [event for event in trace["events"] if event["ph"] == "M"]
    assert meta == [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "rank 0"}}]


def test_a_tracer_reads_its_clocks_spans_when_it_writes_them_and_places_them_on_the_wall_clock():
    """On a GPU the spans are CUDA events, readable once the device has run the work before them."""
    clock = DeferredClock()
    tracer = Tracer(0, clock=clock, active=True)
    with tracer.region("conv1 forward", COMPUTE):
        clock.stamp()
    tracer.add_host("data wait (next batch)", DATA, 1010.0, 1010.5)
    clock.done = True
    spans = {event["name"]: (event["ts"], event["dur"]) for event in tracer.events() if event["ph"] == "X"}
    assert spans == {"conv1 forward": pytest.approx((1001e6, 2e6)),
                     "data wait (next batch)": pytest.approx((1010e6, 0.5e6))}


def watching(net: nn.Module) -> Tracer:
    """A tracer on `net`'s layers, as a one-rank layout holding it whole would have it, tracing."""
    tracer = Tracer(0, active=True)
    tracer.watch(SimpleNamespace(ledger=SimpleNamespace(clock=HostClock()), parts_held=[(0, net)]),
                 torch.optim.SGD(net.parameters(), lr=0.1))
    return tracer


def test_a_layers_backward_span_lasts_until_the_hooks_on_each_of_its_gradients_accumulation_have_run():
    """DDP copies each gradient into its bucket in such a hook, registered before the tracer's, before the next
    layer's backward begins: those copies are the layer's backward, not a gap after it."""
    net = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4)))
    accumulators = [get_gradient_edge(parameter).node for parameter in (net.fc.weight, net.fc.bias)]
    for accumulator in accumulators:
        accumulator.register_hook(lambda *_: time.sleep(0.03))
    tracer = watching(net)
    net(torch.ones(2, 4)).sum().backward()
    (backward,) = [event for event in tracer.events() if event.get("name") == "fc backward"]
    assert backward["dur"] >= 0.06e6


def test_a_layers_passes_begin_before_the_hooks_a_layout_put_on_the_layer():
    """FSDP2 gathers a layer's parameters and copies them out in a forward pre-hook of its own, registered first, and
    again before the backward in a hook it puts on the layer's output after the forward."""
    def before_backward(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        output.register_hook(lambda _: time.sleep(0.03))

    net = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4)))
    net.fc.register_forward_pre_hook(lambda *_: time.sleep(0.03))
    net.fc.register_forward_hook(before_backward)
    tracer = watching(net)
    net(torch.ones(2, 4)).sum().backward()
    durations = {event["name"]: event["dur"] for event in tracer.events() if event["ph"] == "X"}
    assert durations["fc forward"] >= 0.03e6 and durations["fc backward"] >= 0.03e6


def test_a_wait_on_a_link_is_cut_out_of_the_compute_span_it_falls_in():
    spans = [("fc6 backward", COMPUTE, 0.0, 10.0), ("gradients backward", COMMUNICATION, 6.0, 10.0),
             ("conv1 backward", COMPUTE, 10.0, 20.0), ("conv1-input backward", COMMUNICATION, 12.0, 15.0)]
    assert without_waits(spans) == [("fc6 backward", COMPUTE, 0.0, 6.0), spans[1],
                                    ("conv1 backward", COMPUTE, 10.0, 12.0), ("conv1 backward", COMPUTE, 15.0, 20.0),
                                    spans[3]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="reads a GPU's clock")
def test_a_device_clock_reads_the_devices_time_for_the_work_not_the_hosts_time_to_queue_it():
    clock = DeviceClock(torch.device("cuda"))
    queued = time.perf_counter()
    start = clock.stamp()
    torch.cuda._sleep(100_000_000)  # tens of milliseconds of the device's time, queued at once
    end = clock.stamp()
    queued = time.perf_counter() - queued
    assert clock.seconds(start, end) > 10 * queued
