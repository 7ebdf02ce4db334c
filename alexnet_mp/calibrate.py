"""`python -m alexnet_mp calibrate`: measures the machine at hand into a hardware profile (hardware.py).

Each layer as it runs in the net (a convolution with its ReLU, LRN and pooling; fc6 and fc7 with their ReLU and
dropout) forward and backward, at the shares of its outputs the layouts hold (whole, halves, quarters), at passes of
a few images up to the global batch, at the threads a rank runs for each rank count asked for; the optimizer's step
with each of its kernels; what a byte of a gradient costs added into another, and copied into a freshly mapped
block; what a process keeps resident beyond its tensors (the one-device reference at two batches, and the ranks of
a replicating and a gathering layout); each collective the layouts use over gloo processes, at sizes from a few KiB
to tens of MiB, each call right after compute in a loop of them, as a step meets them; and how much slower a rank
computes with every rank of each count computing at once than alone. Where the machine has GPUs: the layers and the
optimizer on a GPU, by its own clock, and the collectives over NCCL, one rank a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from alexnet_mp.bench.matrix import FULL
from alexnet_mp.bench.measure import layout_steps
from alexnet_mp.blocks import rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.hardware import FRESH_FIGURES, KERNELS, KINDS, Collective, Hardware, ResidentOverhead
from alexnet_mp.malloc import LargeBlocks, in_reused_memory, mapped_afresh
from alexnet_mp.model import ARCHITECTURES, IMAGE_SIZE, MaskDraw, SeededDropout, build_model, conv_sides
from alexnet_mp.predict import ProcessMemory, process_memory
from alexnet_mp.processes import run_distributed
from alexnet_mp.speed import EAGER, Variant, apply_speed
from alexnet_mp.step import make_optimizer
from alexnet_mp.strategies import GATHERING, REFERENCE, REPLICATED
from alexnet_mp.strategies.base import shard_layers
from alexnet_mp.timing import Clock, clock_for

SHARES = (1.0, 0.5, 0.25)  # of a layer's outputs: whole, a tower or a shard of 2, a shard of 4
REPEATS = 3  # timed passes (or sweeps of passes) per figure, after one to warm up; the median is kept
# seconds a timed loop of calls lasts, as many calls as fit (at least one): a call's time is what it adds to a loop
# of the compute alone, and a loop's sum moves less than one call's compute does
LOOP_S = 0.1
AT_ONCE_IMAGES = 4  # per pass of the whole net timed on every rank at once
STEADY = 0.1  # layer sweeps further apart than this: the machine was busy with other work while it was measured
# float32 elements per rank in a timed collective: 4 KiB to 64 MiB, about the largest a layout sends in one call
# (FSDP's fc6 unit at 2 ranks): gloo's rate falls as its buffers outgrow the caches
SIZES = (1024, 65536, 1 << 20, 1 << 22, 1 << 24)
CPU = torch.device("cpu")
SETTLING_STEPS = 2  # steps after bench's warm-up by which a small run's heap has stopped growing
# of `probe`: eight sweeps of the net on 8 images, a few seconds on a CPU: a burst of other work moves one sweep, not
# their median
PROBE_IMAGES, PROBE_SWEEPS = 8, 8


def shares_for(ranks: Sequence[int]) -> tuple[float, ...]:
    """The shares of a layer's outputs to time for runs on `ranks` ranks: whole and halves always (the paper split's
    towers, in one process as on two), quarters where four ranks or more shard a layer."""
    return tuple(share for share in SHARES if share >= 0.5 or max(ranks) >= round(1 / share))


def pass_images(batch: int) -> list[int]:
    """The images per timed pass, up to `batch`: 2, 4, 8, ... (each twice the last: the slices of a global batch
    the layouts run, by ranks, micro-batches or rounds) and `batch` itself, at least two sizes. A pass's time at
    sizes between is interpolated, so a layer is timed at about the sizes it runs (what a large pass costs beyond a
    small one's rate: the caches it overflows, the blocks mapped afresh; not in proportion to its images)."""
    sizes = [2 * 2**k for k in range(batch.bit_length()) if 2 * 2**k < batch] + [batch]
    return sizes if len(sizes) > 1 else [1, 2]


def static_shapes() -> contextlib.AbstractContextManager:
    """Within it, a compiled layer is timed at each pass size as a run of that size compiles it: a graph for each
    size (its batch not made dynamic after the first), however many the sizes, shares and layers that share the code
    of a forward."""
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=4096,
                                      accumulated_recompile_limit=4096)


def time_layers(arch: str, batch: int, device: torch.device = CPU, shares: Sequence[float] = SHARES,
                repeats: int = REPEATS, variant: Variant = EAGER) -> tuple[dict[str, dict[str, Any]], float]:
    """Each layer of `arch` as it runs in the net (with what follows it up to the next layer: a conv's ReLU, LRN and
    pool; fc6's and fc7's ReLU and dropout), at each of `shares`, on the threads `run_distributed` gave its process:
    a pass's seconds forward and backward at each of `pass_images(batch)`, and on a CPU the bytes it allocates in
    blocks a training process maps afresh and the most of them live at once (`fresh_blocks`), which a process
    reusing its memory (`in_reused_memory`) does not pay in its times. Every pass runs once per sweep and the sweeps
    one after another, so that a burst of the machine's other work slows one sweep's passes rather than every repeat
    of a few, and each pass follows another layer's, as in the net: the first sweep warms up, the median of the rest
    is kept. Also how far apart the timed sweeps' sums are (the slowest over the fastest, less 1): how steady the
    machine was. On `device` (a GPU: its own clock, `timing.DeviceClock`), each layer run as `variant` says (its
    precision and speed-ups)."""
    images = pass_images(batch)
    with static_shapes():
        return _timed_layers(arch, images, device, shares, repeats, variant)


def _timed_layers(arch: str, images: list[int], device: torch.device, shares: Sequence[float], repeats: int,
                  variant: Variant) -> tuple[dict[str, dict[str, Any]], float]:
    passes = [timed for share in shares for timed in _layer_passes(arch, share, images, device, variant)]
    passes.sort(key=lambda timed: timed.shape[0])  # by images, each size's layers in the net's order (a stable sort)
    sweeps = [[_forward_backward(timed, device, variant) for timed in passes] for _ in range(1 + repeats)]
    times: dict[str, dict[str, Any]] = {}
    for at, layer_pass in enumerate(passes):
        timed = times.setdefault(layer_pass.key, {"images": images, "forward": [], "backward": []})
        timed["forward"].append(statistics.median(sweep[at][0] for sweep in sweeps[1:]))
        timed["backward"].append(statistics.median(sweep[at][1] for sweep in sweeps[1:]))
        if device.type == "cpu":  # a GPU's caching allocator reuses its blocks
            for direction, blocks in zip(("forward", "backward"), fresh_blocks(layer_pass, variant), strict=True):
                for figure, value in zip(FRESH_FIGURES, dataclasses.astuple(blocks), strict=True):
                    timed.setdefault(figure, {"forward": [], "backward": []})[direction].append(value)
    sums = [sum(f + b for f, b in sweep) for sweep in sweeps[1:]]
    return times, max(sums) / min(sums) - 1


def probe(arch: str, thread_counts: Sequence[int], device: torch.device = CPU, ranks: int = 1,
          variant: Variant = EAGER) -> dict[str, float]:
    """The machine's speed now, on each of `thread_counts`: the median seconds of a sweep of every layer of `arch`
    whole, forward and backward, on `PROBE_IMAGES` images, over `PROBE_SWEEPS` sweeps, timed as `time_layers` times
    its passes (in a process of its own that reuses its memory); with `ranks`, in that many such processes at once,
    the slowest's. `calibrate` writes it into the profile, and `drift` runs it again."""
    with tempfile.TemporaryDirectory(prefix="probe-") as scratch:
        found = run_distributed(in_reused_memory, ranks, Path(scratch), _time_probe, arch, list(thread_counts), device,
                                PROBE_SWEEPS, variant)
    return {threads: max(rank[threads] for rank in found) for threads in found[0]}


def _time_probe(arch: str, thread_counts: list[int], device: torch.device, timed_sweeps: int, variant: Variant,
                ) -> dict[str, float]:
    passes = _layer_passes(arch, 1.0, [PROBE_IMAGES], device, variant)
    found = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        with static_shapes():
            sweeps = [sum(sum(_forward_backward(timed, device, variant)) for timed in passes)
                      for _ in range(1 + timed_sweeps)]
        found[str(threads)] = statistics.median(sweeps[1:])
    return found


def drift(hardware: Hardware, arch: str = "paper") -> dict[str, float]:
    """How much slower this machine runs now than when `hardware` was calibrated, per thread count it measured: the
    probe (`probe`) run now over the probe calibrate ran beside its layers, less 1 (negative: faster). Empty for a
    profile without a probe (a preset). Reported, not applied to a prediction: on a shared machine the probe moves
    from one process to the next by as much as the drift it reads."""
    if not hardware.probe_s:
        return {}
    device = torch.device("cuda") if hardware.backend == "nccl" else CPU
    now = probe(arch, [int(threads) for threads in hardware.probe_s], device, variant=hardware.variant)
    return {threads: now[threads] / then - 1 for threads, then in hardware.probe_s.items()}


class LayerPass(NamedTuple):
    """A timed pass of one layer with what follows it up to the next layer."""

    key: str  # in a profile: `arch.layer@share`
    segment: torch.nn.Module
    shape: tuple[int, ...]  # of its input
    needs_input_grad: bool  # all but the first layer's
    input_dtype: torch.dtype  # what the layer before hands it in the net: under autocast, maybe not float32


def _layer_passes(arch: str, share: float, images: Sequence[int], device: torch.device, variant: Variant = EAGER,
                  ) -> list[LayerPass]:
    """The passes that time each layer of `arch` at `share` of its outputs on each of `images`, on `device`, with
    `variant`'s speed-ups applied as a run applies them, each input in the dtype the layer before hands on."""
    sides = [IMAGE_SIZE] + [block for _, block in conv_sides(ARCHITECTURES[arch])]
    cut = shard_layers(build_model(arch, 1000, seed=0), lambda key, shape, part, n: (rows(shape[0], 0, n),), 0,
                       round(1 / share)).to(device)
    segments = [(name, segment, _input_shape(layer, min(images), sides, index))
                for index, (name, segment, layer) in enumerate(_segments(cut))]
    dtypes = _input_dtypes([(segment, shape) for _, segment, shape in segments], device, variant)  # before compiling
    for _, segment, _ in segments:
        apply_speed(segment, variant.speed)
    return [LayerPass(f"{arch}.{name}@{share:g}", segment, (n, *shape[1:]), index > 0, dtype)
            for index, ((name, segment, shape), dtype) in enumerate(zip(segments, dtypes, strict=True))
            for n in images]


def _input_dtypes(segments: list[tuple[torch.nn.Module, tuple[int, ...]]], device: torch.device, variant: Variant,
                  ) -> list[torch.dtype]:
    """The dtype each segment's input has in the net: the images' for the first, then what the one before returns
    in `variant`'s precision (which ops autocast keeps in float32 differs between devices)."""
    dtypes = [torch.float32]
    with torch.no_grad(), variant.autocast(device):
        for segment, shape in segments[:-1]:
            _draw_masks(segment, shape[0])
            dtypes.append(segment(torch.zeros(shape, dtype=dtypes[-1], device=device)).dtype)
    return dtypes


def _segments(net: torch.nn.Sequential) -> list[tuple[str, torch.nn.Sequential, torch.nn.Module]]:
    """Each weight layer of `net` with the modules after it up to the next: (its name, them in order, the layer)."""
    segments: list[tuple[str, list[torch.nn.Module], torch.nn.Module]] = []
    for name, module in net.named_children():
        if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
            segments.append((name, [module], module))
        else:
            segments[-1][1].append(module)
    return [(name, torch.nn.Sequential(*modules), layer) for name, modules, layer in segments]


def _input_shape(layer: torch.nn.Module, images: int, sides: list[int], index: int) -> tuple[int, ...]:
    """The input of the `index`th layer for a pass of `images`: features, or a convolution's square maps of
    `sides[index]`."""
    if isinstance(layer, torch.nn.Linear):
        return images, layer.in_features
    return images, layer.in_channels, sides[index], sides[index]


def _draw_masks(segment: torch.nn.Module, images: int) -> None:
    """The masks of `segment`'s dropout drawn for a pass of `images`."""
    for dropout in segment.modules():
        if isinstance(dropout, SeededDropout):
            dropout.draw = MaskDraw(seed=0, step=0, global_batch=images, rows=slice(0, images))


def _pass_input(timed: LayerPass, device: torch.device, variant: Variant) -> torch.Tensor:
    """A pass's input (maps in channels_last where `variant` has them), its segment's dropout masks drawn for it."""
    _draw_masks(timed.segment, timed.shape[0])
    x = torch.randn(timed.shape, device=device, dtype=timed.input_dtype)
    if variant.speed.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(timed.needs_input_grad)


def _forward_backward(timed: LayerPass, device: torch.device, variant: Variant = EAGER) -> tuple[float, float]:
    """One pass's seconds on `device`, forward (in `variant`'s precision) and backward."""
    x = _pass_input(timed, device, variant)
    clock = clock_for(device)
    started = clock.stamp()
    with variant.autocast(device):
        out = timed.segment(x)
    middle = clock.stamp()
    out.backward(torch.ones_like(out))
    ended = clock.stamp()
    timed.segment.zero_grad(set_to_none=True)
    return clock.seconds(started, middle), clock.seconds(middle, ended)


def fresh_blocks(timed: LayerPass, variant: Variant = EAGER) -> tuple[LargeBlocks, LargeBlocks]:
    """The blocks one pass on the CPU allocates that glibc's malloc maps afresh in a training process
    (`malloc.mapped_afresh`), forward and backward, whose pages the kernel faults in and zero-fills unless its heap
    serves them. Read off the profiler's record of each allocation and free, which sees the blocks that an op
    allocates for itself as well."""
    x = _pass_input(timed, CPU, variant)
    with _memory_records() as forward, variant.autocast(CPU):
        out = timed.segment(x)
    gradient = torch.ones_like(out)
    with _memory_records() as backward:
        out.backward(gradient)
    timed.segment.zero_grad(set_to_none=True)
    return large_blocks(forward), large_blocks(backward)


@contextlib.contextmanager
def _memory_records() -> Iterator[list[dict[str, Any]]]:
    """Within `with`, the profiler records every CPU allocation and free; after it, the list it gave holds those
    records in order (each a trace event's arguments: "Bytes", "Addr")."""
    found: list[dict[str, Any]] = []
    profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    with _quiet_stderr():  # the profiler logs its start and stop there, whatever its log level
        profiler.start()
    try:
        yield found
    finally:
        with _quiet_stderr():
            profiler.stop()
    with tempfile.TemporaryDirectory(prefix="allocations-") as scratch:
        path = Path(scratch) / "trace.json"
        profiler.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    found += [event["args"] for event in sorted(events, key=lambda event: event.get("ts", 0))
              if event.get("name") == "[memory]"]


def large_blocks(records: Sequence[Mapping[str, Any]]) -> LargeBlocks:
    """The blocks `malloc.mapped_afresh` that the profiler's memory records (in order: "Bytes" allocated, or freed
    where negative, at "Addr") allocate, and the most bytes of them live at once; frees of blocks allocated before
    the records began are not theirs."""
    live: dict[int, float] = {}
    allocated = now = at_once = 0.0
    for record in records:
        size, address = float(record["Bytes"]), int(record["Addr"])
        if size > 0 and mapped_afresh(size):
            live[address] = size
            allocated, now = allocated + size, now + size
            at_once = max(at_once, now)
        elif size < 0:
            now -= live.pop(address, 0.0)
    return LargeBlocks(allocated, at_once)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """This process's standard error (its file descriptor, which C++ code writes to) sent nowhere, and restored."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as nowhere:
            os.dup2(nowhere.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _on_threads(threads: int) -> Iterator[None]:
    """Torch's threads at `threads` while a figure is timed in calibrate's own process, and put back after: the
    process that asked for the profile goes on as it was."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_optimizer(threads: int, device: torch.device = CPU, parameters: int = 1 << 24) -> dict[str, float]:
    """Seconds per parameter of the training loop's SGD step (momentum, weight decay) with each of its kernels:
    fused (plain tensors) and foreach (DTensors, which no fused kernel takes), here on a plain tensor."""
    weight = torch.nn.Parameter(torch.randn(parameters, device=device))
    weight.grad = torch.randn(parameters, device=device)
    clock = clock_for(device)
    fused = make_optimizer([weight], TrainConfig())
    foreach = torch.optim.SGD([weight], **{**fused.defaults, "fused": False, "foreach": True})
    with _on_threads(threads):
        return {kernel: _median_s(optimizer.step, clock) / parameters
                for kernel, optimizer in zip(KERNELS, (fused, foreach), strict=True)}


def time_accumulation(threads: int, device: torch.device = CPU, elements: int = 1 << 24) -> float:
    """Seconds per byte of a gradient added into the one accumulated before it (autograd's in-place sum, what each
    pass of a layer after its first pays in a step of micro-batches or rounds), on `threads`: 64 MiB."""
    accumulated, gradient = torch.zeros(elements, device=device), torch.ones(elements, device=device)
    with _on_threads(threads):
        return _median_s(lambda: accumulated.add_(gradient), clock_for(device)) / gradient.nbytes


def _median_s(work: Callable[[], Any], clock: Clock) -> float:
    """Seconds of `work` by `clock`, the median of `REPEATS` runs after one to warm up."""
    seconds = []
    for _ in range(1 + REPEATS):
        started = clock.stamp()
        work()
        seconds.append(clock.seconds(started, clock.stamp()))
    return statistics.median(seconds[1:])


def time_fresh_copy(threads: int, elements: int = 1 << 24) -> tuple[float, float]:
    """Seconds per byte of copying a tensor into one the allocator maps afresh (the copy, and the pages faulted in
    and zero-filled), and of those pages alone (that copy's time less a copy into a block mapped already), on
    `threads` (a copy this large runs on all of them): a block of 64 MiB, above the threshold where glibc's malloc
    maps each block on its own (in a process that keeps its default allocator, as calibrate's is)."""
    source, mapped = torch.ones(elements), torch.zeros(elements)
    fresh, again = [], []
    with _on_threads(threads):
        for _ in range(1 + REPEATS):
            started = time.perf_counter()
            torch.empty(elements).copy_(source)
            fresh.append(time.perf_counter() - started)
            started = time.perf_counter()
            mapped.copy_(source)
            again.append(time.perf_counter() - started)
    copy_s, again_s = statistics.median(fresh[1:]), statistics.median(again[1:])
    return copy_s / source.nbytes, max(copy_s - again_s, 0.0) / source.nbytes


def _sent(kind: str, elements: int, size: int) -> float:
    """Elements the busiest rank sends in a collective of `kind` whose per-rank tensor has `elements`, as the
    ledger counts them (ledger.py)."""
    return {"all-reduce": 2 * elements * (size - 1) / size, "send": elements}.get(kind, elements * (size - 1))


def _collective(kind: str, x: torch.Tensor, size: int, rank: int) -> Callable[[], None]:
    if kind == "all-reduce":
        return lambda: dist.all_reduce(x)
    if kind == "all-gather":
        out = [torch.empty_like(x) for _ in range(size)]
        return lambda: dist.all_gather(out, x)
    if kind == "all-gather-single":  # into a fresh tensor each call, as FSDP and DTensor call it
        return lambda: dist.all_gather_single(torch.empty(size * x.numel(), device=x.device), x)
    if kind == "reduce-scatter-single":
        flat = torch.ones(size * x.numel(), device=x.device)
        return lambda: dist.reduce_scatter_single(torch.empty_like(x), flat)
    if kind == "reduce-scatter":
        chunks = [torch.empty_like(x) for _ in range(size)]
        return lambda: dist.reduce_scatter(x, chunks)
    if kind == "gather":
        out = [torch.empty_like(x) for _ in range(size)] if rank == 0 else None
        return lambda: dist.gather(x, out, dst=0)
    if kind == "scatter":
        chunks = [torch.empty_like(x) for _ in range(size)] if rank == 0 else None
        return lambda: dist.scatter(x, chunks, src=0)
    if kind == "broadcast":
        return lambda: dist.broadcast(x, src=0)
    return lambda: (dist.send(x, 1) if rank == 0 else dist.recv(x, 0)) if rank < 2 else None


def time_collectives(sizes: Sequence[int], device_type: str, repeats: int = REPEATS,
                     loop_s: float = LOOP_S) -> dict[str, list[tuple[float, float]]]:
    """On a rank of a group (gloo on CPUs, NCCL on `device_type` cuda): per kind, (bytes the busiest rank sends,
    seconds) at each size, each call timed as a step meets it: right after a layer's worth of compute on every rank
    (`layer_of_compute`), in a loop of such calls (`call_after_compute_s`). Over gloo, a call after compute costs
    several times one between idle ranks (most likely its peers' threads are asleep and its buffers out of the
    caches)."""
    size, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device(device_type, torch.cuda.current_device()) if device_type == "cuda" else CPU
    compute = layer_of_compute(device)
    found: dict[str, list[tuple[float, float]]] = {}
    for kind in KINDS:
        for elements in sizes:
            call = _collective(kind, torch.ones(elements, device=device), size, rank)
            found.setdefault(kind, []).append((4 * _sent(kind, elements, size),
                                               call_after_compute_s(call, compute, device, repeats, loop_s)))
    return found


def call_after_compute_s(call: Callable[[], Any], compute: Callable[[], Any], device: torch.device,
                         repeats: int = REPEATS, loop_s: float = LOOP_S) -> float:
    """Seconds `call` adds to a step where every rank computes before it: a loop of `compute` then `call`, as many as
    fit in `loop_s`, against a loop of `compute` alone, the two alternating (the machine's other work weighs on
    both), the median of `repeats` of each, per call, each loop timed on its slowest rank (on a GPU, until its device
    has run it). The ranks meet at each call, so it costs its transfer and the wait for the rank whose compute came
    slowest since the last; a barrier before each call would leave that out. No less than a hundredth of the loop's
    share: the compute moves by more than a small call takes."""
    calls = max(1, round(loop_s / _slowest_rank_s(lambda: (compute(), call()), device)))  # one pair warms up
    alone: list[float] = []
    with_calls: list[float] = []
    for _ in range(repeats):
        alone.append(_slowest_rank_s(lambda: [compute() for _ in range(calls)], device))
        with_calls.append(_slowest_rank_s(lambda: [(compute(), call()) for _ in range(calls)], device))
    with_calls_s = statistics.median(with_calls)
    return max(with_calls_s - statistics.median(alone), with_calls_s / 100) / calls


def layer_of_compute(device: torch.device) -> Callable[[], None]:
    """A layer's worth of compute: the weird trick's fc6 share at 4 ranks on a batch of 32 (about 10 ms on one CPU
    thread), which reads a weight of 36 MiB, more than the caches hold."""
    inputs, weight = torch.randn(32, 9216, device=device), torch.randn(9216, 1024, device=device)
    return lambda: inputs @ weight


def _slowest_rank_s(work: Callable[[], Any], device: torch.device) -> float:
    """Seconds of `work` started on every rank together, on the slowest rank: on a GPU, until its device has run it."""
    dist.barrier()
    started = time.perf_counter()
    work()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    took = torch.tensor([time.perf_counter() - started], dtype=torch.float64, device=device)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def fit(points: Sequence[tuple[float, float]]) -> Collective:
    """A collective timed at each of several sizes, (bytes, seconds): those times, each no more than a larger size's
    (more is the machine's noise), and the latency and bandwidth of the line through them by least squares, each
    point's error relative to its time, so that the small sizes weigh as much as the large ones. Each kept
    positive."""
    ordered = sorted(points)
    times = [float(t) for t in np.minimum.accumulate([seconds for _, seconds in ordered][::-1])[::-1]]
    sent, seconds = np.array([size for size, _ in ordered]), np.array(times)
    slope, intercept = np.polyfit(sent, seconds, 1, w=1 / seconds)
    bandwidth = 1 / slope if slope > 0 else sent.max() / seconds.max()
    return Collective(max(float(intercept), float(seconds.min()) / 10), float(bandwidth),
                      tuple(zip(sent.tolist(), times, strict=True)))


def resident_overhead(arch: str, batch: int, threads: int, group_ranks: int | None, scratch: Path,
                      variant: Variant = EAGER) -> ResidentOverhead:
    """What a fresh process on `threads` keeps resident beyond its tensors (`ResidentOverhead`), from what processes
    training at `batch` and at a quarter of it keep (`kept_beyond_tensors`): the line in its activations through the
    one-device reference at the two batches, its slope no less than 0 and running through the larger batch's figure;
    and where ranks of a group run on `threads` (`group_ranks` of them), what the ranks of REPLICATED keep above that
    line at the quarter, and what the ranks of GATHERING keep above both at `batch`, a byte they gather: there their
    heap grows for more steps than at the quarter, and is measured over bench's. Each no less than 0; every process
    trains as `variant` says."""
    fewer, more = (kept_beyond_tensors(REFERENCE, arch, 1, images, threads, scratch / f"reference{images}",
                                       variant=variant)[0] for images in (max(batch // 4, 1), batch))
    rise = more.memory.activations - fewer.memory.activations
    slope = max((more.kept - fewer.kept) / rise, 0.0) if rise > 0 else 0.0
    line = ResidentOverhead(max(more.kept - slope * more.memory.activations, 0.0), slope, 0.0, 0.0)
    if not group_ranks:
        return line
    quarter = max(batch // 4 // group_ranks, 1) * group_ranks

    def above_line(mode: str, images: int, steps: int) -> list[Kept]:
        kept = kept_beyond_tensors(mode, arch, group_ranks, images, threads, scratch / mode, steps, variant=variant)
        return [dataclasses.replace(rank, kept=rank.kept - line.bytes(rank.memory.activations, 0.0, False))
                for rank in kept]

    in_group = max(statistics.mean(rank.kept for rank in above_line(REPLICATED, quarter, SETTLING_STEPS)), 0.0)
    gathering = [(rank.kept - in_group) / rank.memory.gathered
                 for rank in above_line(GATHERING, max(batch // group_ranks, 1) * group_ranks, FULL.steps)]
    return dataclasses.replace(line, in_group_bytes=in_group, per_gathered_byte=max(statistics.mean(gathering), 0.0))


@dataclasses.dataclass(frozen=True)
class Kept:
    """A rank's memory at its peak as the cost model predicts it, and what it kept resident beyond that."""

    memory: ProcessMemory
    kept: float


def kept_beyond_tensors(mode: str, arch: str, ranks: int, batch: int, threads: int, scratch: Path,
                        steps: int = SETTLING_STEPS, variant: Variant = EAGER) -> list[Kept]:
    """Fresh processes on `threads`, the `ranks` of `mode` at global batch `batch`, trained as `variant` says: each
    rank's memory at its peak (`predict.process_memory`, the cost model's, in `variant`'s precision), and what it
    kept resident beyond it: its training memory (bench's measure, over `steps` after bench's warm-up: the heap grows
    over the first steps) less its tensors' peak and the blocks it maps afresh after it."""
    sizes = dataclasses.replace(FULL, steps=steps)
    measured = run_distributed(layout_steps, ranks, scratch, mode, arch, {}, batch, sizes, variant, threads=threads)
    return [Kept(memory, max(rank["training_memory_mb"] * 2**20 - memory.tensors - memory.mapped_later, 0.0))
            for memory, rank in zip(process_memory(mode, arch, ranks, batch, sizes.num_classes,
                                                   variant=variant), measured, strict=True)]


def time_shared_slowdown(arch: str, images: int = AT_ONCE_IMAGES, repeats: int = REPEATS) -> float:
    """On a rank of a gloo group: how much slower the net's forward and backward (dropout off) on `images` images
    runs on every rank at once than on rank 0 alone, the others waiting: the cores they share, and their caches and
    memory bandwidth. Alone and at once alternate, so that the machine's other work weighs on both; the slowest
    rank's time of each pass, the median of a few, no less than alone."""
    net = build_model(arch).eval()
    x = torch.randn(images, 3, IMAGE_SIZE, IMAGE_SIZE)

    def training_pass(at_once: bool) -> None:
        if at_once or dist.get_rank() == 0:
            net(x).sum().backward()
            net.zero_grad(set_to_none=True)

    alone: list[float] = []
    together: list[float] = []
    for _ in range(1 + repeats):
        for at_once, seconds in ((False, alone), (True, together)):
            seconds.append(_slowest_rank_s(lambda every=at_once: training_pass(every), CPU))
    return max(statistics.median(together[1:]) / statistics.median(alone[1:]), 1.0)


def calibrate(ranks: Sequence[int], nets: Sequence[str] = ("paper",), batch: int | None = None,
              log: Callable[[str], None] = print, variant: Variant = EAGER) -> Hardware:
    """This machine's profile for runs of `nets` on each of `ranks` ranks, at a global batch of `batch` (bench's on a
    CPU by default), whose steps run as `variant` says: on its CPU cores over gloo, or where it has GPUs, on them over
    NCCL, one rank a GPU. Every net's layers are timed; the probe, what a process keeps resident and how ranks share
    the cores are the first net's."""
    arch = nets[0]
    batch = batch or FULL.batch
    on_gpu = torch.cuda.is_available()
    if on_gpu and max(ranks) > torch.cuda.device_count():
        raise UsageError(f"calibrate runs one rank a GPU, and this machine has {torch.cuda.device_count()}: --ranks "
                         f"up to {torch.cuda.device_count()}")
    device = torch.device("cuda") if on_gpu else CPU
    cores = None if on_gpu else os.cpu_count() or 1
    started = time.perf_counter()
    profile = Hardware(f"{platform.node() or 'this machine'}", "", "nccl" if on_gpu else "gloo", cores)
    thread_counts = sorted({profile.threads(count) for count in (1, *ranks)})
    layers, optimizer, accumulation, fresh, pages, spreads = {}, {}, {}, {}, {}, []
    collectives, resident, slowdown = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="calibrate-") as scratch:
        for threads in thread_counts:
            layers[str(threads)] = {}
            for net in nets:
                log(f"layers of the {net} net on {'the GPU' if on_gpu else f'{threads} thread(s)'}, passes of "
                    f"{pass_images(batch)} images ...")
                timed, spread = run_distributed(
                    in_reused_memory, 1, Path(scratch) / f"layers-{net}-{threads}", time_layers, net, batch,
                    device, shares_for(ranks), REPEATS, variant, threads=threads)[0]
                layers[str(threads)].update(timed)
                log(f"  its sweeps {spread:.0%} apart" + ("" if spread <= STEADY else ": the machine's other work "
                                                          "moved the figures; calibrate again when it is quieter"))
                spreads.append(spread)
            optimizer[str(threads)] = time_optimizer(threads, device)
            accumulation[str(threads)] = time_accumulation(threads, device)
            if not on_gpu:  # a GPU's caching allocator reuses its blocks
                fresh[str(threads)], pages[str(threads)] = time_fresh_copy(threads)
        log("the probe that `bench` runs again to see how far the machine has drifted from this profile ...")
        probed = probe(arch, thread_counts, device, variant=variant)
        for threads in [] if on_gpu else thread_counts:  # a GPU's memory is its tensors
            log(f"what a process keeps resident beyond its tensors, on {threads} thread(s) ...")
            group_ranks = min((count for count in ranks if count > 1 and profile.threads(count) == threads),
                              default=None)
            resident[str(threads)] = resident_overhead(arch, batch, threads, group_ranks,
                                                       Path(scratch) / f"memory{threads}", variant)
        for count in (count for count in ranks if count > 1):
            log(f"collectives over {count} {profile.backend} processes" + ("" if on_gpu else ", and the net on all "
                                                                            "of them at once") + " ...")
            per_rank = run_distributed(time_collectives, count, Path(scratch) / str(count), SIZES, device.type,
                                       REPEATS, LOOP_S, threads=profile.threads(count), backend=profile.backend)
            collectives[str(count)] = {kind: fit(points) for kind, points in per_rank[0].items()}
            if not on_gpu:  # GPUs share no cores
                slowdown[str(count)] = run_distributed(time_shared_slowdown, count, Path(scratch) / f"at-once{count}",
                                                       arch, AT_ONCE_IMAGES, REPEATS, threads=profile.threads(count))[0]
    where = torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, {cores} cores"
    source = (f"calibrate on {where}, {variant.said()}, batch {batch}, {datetime.date.today().isoformat()}, "
              f"torch {torch.__version__}, in {time.perf_counter() - started:.0f} s, layer sweeps within "
              f"{max(spreads):.0%}")
    return Hardware(profile.name, source, profile.backend, cores, layers, optimizer_s_per_parameter=optimizer,
                    accumulate_s_per_byte=accumulation, collectives=collectives, fresh_copy_s_per_byte=fresh,
                    fresh_page_s_per_byte=pages, resident_overhead=resident, shared_slowdown=slowdown,
                    probe_s=probed, variant=variant)
