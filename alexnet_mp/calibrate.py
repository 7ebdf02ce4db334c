"""`python -m alexnet_mp calibrate`: measures the machine at hand into a hardware profile (hardware.py).

Each layer (convolution with its ReLU, LRN and pooling; each fully connected layer) forward and backward, at
the shares of its outputs the layouts hold (whole, halves, quarters), at the threads a rank runs for each rank
count asked for; the optimizer's fused step; what a byte of a freshly mapped block costs; and each collective
the layouts use over gloo processes, at sizes from a few KiB to tens of MiB, fitted as latency plus bytes over
bandwidth.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from alexnet_mp.blocks import rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.hardware import Collective, Hardware
from alexnet_mp.model import ARCHITECTURES, IMAGE_SIZE, build_model, conv_sides
from alexnet_mp.processes import run_distributed
from alexnet_mp.step import make_optimizer
from alexnet_mp.strategies.base import shard_layers

SHARES = (1.0, 0.5, 0.25)  # of a layer's outputs: whole, a tower or a shard of 2, a shard of 4
BATCHES = (2, 8)  # images per timed pass: a pass's time is fitted as a fixed part plus a part per image
REPEATS = 3  # timed passes per figure, after one to warm up; the median is kept
SIZES = (1024, 65536, 1 << 20, 1 << 22)  # float32 elements per rank in a timed collective: 4 KiB to 16 MiB


def time_layers(arch: str, threads: int) -> dict[str, dict[str, float]]:
    """Each layer of `arch` at each of `SHARES`, on `threads`: forward and backward seconds per image, and per
    pass (what a pass costs whatever its images: what makes micro-batches of few images slow)."""
    torch.set_num_threads(threads)
    sides = [IMAGE_SIZE] + [block for _, block in conv_sides(ARCHITECTURES[arch])]
    times = {}
    for share in SHARES:
        parts = round(1 / share)
        cut = shard_layers(build_model(arch, 1000, seed=0), lambda key, shape, part, n: (rows(shape[0], 0, n),), 0,
                           parts)
        for index, (name, layer) in enumerate(cut.layers().items()):
            per_batch = {}
            for batch in BATCHES:
                shape = (batch, layer.in_features) if isinstance(layer, torch.nn.Linear) else \
                    (batch, layer.in_channels, sides[index], sides[index])
                per_batch[batch] = _forward_backward(layer, shape, needs_input_grad=index > 0)
            times[f"{arch}.{name}@{share:g}"] = _per_image_and_pass(per_batch)
    return times


def _per_image_and_pass(per_batch: dict[int, dict[str, float]]) -> dict[str, float]:
    """From a pass's seconds at two batch sizes: seconds per image and per pass, each direction (none below 0)."""
    (small, at_small), (large, at_large) = sorted(per_batch.items())
    fitted = {}
    for direction in ("forward", "backward"):
        per_image = max((at_large[direction] - at_small[direction]) / (large - small), at_large[direction] / large / 10)
        fitted[direction] = per_image
        fitted[f"{direction}_per_pass"] = max(at_large[direction] - per_image * large, 0.0)
    return fitted


def _forward_backward(layer: torch.nn.Module, shape: tuple[int, ...], needs_input_grad: bool) -> dict[str, float]:
    """A pass's seconds, forward and backward: the median of `REPEATS` after one to warm up."""
    x = torch.randn(shape, requires_grad=needs_input_grad)
    forward, backward = [], []
    for _ in range(1 + REPEATS):
        started = time.perf_counter()
        out = layer(x)
        middle = time.perf_counter()
        out.backward(torch.ones_like(out))
        forward.append(middle - started)
        backward.append(time.perf_counter() - middle)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    return {"forward": statistics.median(forward[1:]), "backward": statistics.median(backward[1:])}


def time_optimizer(threads: int, parameters: int = 1 << 24) -> float:
    """Seconds per parameter of the training loop's fused SGD step (momentum, weight decay)."""
    torch.set_num_threads(threads)
    weight = torch.nn.Parameter(torch.randn(parameters))
    weight.grad = torch.randn(parameters)
    optimizer = make_optimizer([weight], TrainConfig())
    seconds = []
    for _ in range(1 + REPEATS):
        started = time.perf_counter()
        optimizer.step()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[1:]) / parameters


def time_fresh_pages(elements: int = 1 << 24) -> float:
    """Seconds per byte that filling a block the allocator maps afresh costs beyond filling one already mapped:
    a block of 64 MiB, above the threshold where glibc's malloc maps each block on its own."""
    held = torch.empty(elements)
    extra = []
    for _ in range(1 + REPEATS):
        started = time.perf_counter()
        torch.empty(elements).fill_(1.0)
        fresh = time.perf_counter() - started
        started = time.perf_counter()
        held.fill_(1.0)
        extra.append(fresh - (time.perf_counter() - started))
    return max(statistics.median(extra[1:]), 0.0) / held.nbytes


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


def time_collectives(sizes: Sequence[int] = SIZES) -> dict[str, list[tuple[float, float]]]:
    """On a rank of a gloo group: per kind, (bytes the busiest rank sends, seconds) at each size; every rank
    enters each collective together (a barrier first), and the slowest rank's time counts."""
    size, rank = dist.get_world_size(), dist.get_rank()
    found: dict[str, list[tuple[float, float]]] = {}
    for kind in ("all-reduce", "all-gather", "reduce-scatter", "gather", "scatter", "broadcast", "send"):
        for elements in sizes:
            run = _collective(kind, torch.ones(elements), size, rank)
            seconds = []
            for _ in range(1 + REPEATS):
                dist.barrier()
                started = time.perf_counter()
                run()
                took = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
                dist.all_reduce(took, op=dist.ReduceOp.MAX)
                seconds.append(float(took))
            found.setdefault(kind, []).append((4 * _sent(kind, elements, size), statistics.median(seconds[1:])))
    return found


def fit(points: Sequence[tuple[float, float]]) -> Collective:
    """Latency and bandwidth by least squares over (bytes, seconds); each kept positive."""
    sent, seconds = np.array(points).T
    slope, intercept = np.polyfit(sent, seconds, 1)
    bandwidth = 1 / slope if slope > 0 else sent.max() / seconds.max()
    return Collective(max(float(intercept), float(seconds.min()) / 10), float(bandwidth))


def calibrate(ranks: Sequence[int], arch: str = "paper", log: Callable[[str], None] = print) -> Hardware:
    cores = os.cpu_count() or 1
    started = time.perf_counter()
    profile = Hardware(f"{platform.node() or 'this machine'}", "", "gloo", cores)
    thread_counts = sorted({profile.threads(count) for count in (1, *ranks)})
    layers, optimizer = {}, {}
    for threads in thread_counts:
        log(f"layers of the {arch} net on {threads} thread(s) ...")
        layers[str(threads)] = time_layers(arch, threads)
        optimizer[str(threads)] = time_optimizer(threads)
    fresh = time_fresh_pages()
    collectives = {}
    with tempfile.TemporaryDirectory(prefix="calibrate-") as scratch:
        for count in ranks:
            log(f"collectives over {count} gloo processes ...")
            per_rank = run_distributed(time_collectives, count, Path(scratch) / str(count),
                                       threads=profile.threads(count))
            collectives[str(count)] = {kind: fit(points) for kind, points in per_rank[0].items()}
    source = (f"calibrate on {platform.processor() or platform.machine()}, {cores} cores, "
              f"{datetime.date.today().isoformat()}, torch {torch.__version__}, "
              f"in {time.perf_counter() - started:.0f} s")
    return Hardware(profile.name, source, "gloo", cores, layers, None, optimizer, collectives, fresh)
