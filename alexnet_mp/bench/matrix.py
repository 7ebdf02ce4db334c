"""What the benchmark measures: the plain PyTorch loop, our single-device step with each speed-up, every
registered layout at each world size it runs (with the option values it says a comparison covers), and
the input pipeline alone and feeding the step. A layout that cannot run on a world size is listed as
not measured, with its own reason."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import torch

from alexnet_mp.bench.measure import (
    Measurement,
    Sizes,
    fed_steps,
    layout_steps,
    measure,
    pipeline_pass,
    plain_loop_steps,
    write_jpeg_tree,
)
from alexnet_mp.config import TrainConfig
from alexnet_mp.data import require_device_decoder
from alexnet_mp.errors import UsageError
from alexnet_mp.speed import EAGER, FAST_GPU, Speed, Variant
from alexnet_mp.strategies import LAYOUTS, REFERENCE, REFERENCE_STEP

FULL = Sizes(batch=32, steps=6, warmup=2, ranks=(2, 4), pipeline_images=512, pipeline_steps=16, workers=2,
             num_classes=1000)
# The GPU sizes: batch 256; warm-up long enough for compilation and CUDA-graph recording.
FULL_GPU = Sizes(batch=256, steps=20, warmup=5, ranks=(2, 4), pipeline_images=2048, pipeline_steps=40, workers=8,
                 num_classes=1000)
# Every part of the matrix once, as fast as it runs: its figures say nothing of the nets' speed.
QUICK = Sizes(batch=4, steps=1, warmup=1, ranks=(2, 4), pipeline_images=8, pipeline_steps=1, workers=2,
              num_classes=10, paper_net="paper-debug", owt_net="owt-debug")


def single_variants(device_type: str) -> list[Variant]:
    """Our single-device step, one speed-up added at a time, on a GPU (the last: compiled with LRN's
    Triton kernels, against the compiled torch ops without CUDA graphs). A CPU runs the eager float32
    step alone: a CPU without bf16 units runs bf16 far slower than float32, and compiling costs more than
    the few steps measured (docs/results/choices.md)."""
    if device_type == "cpu":
        return [EAGER]
    return [EAGER, Variant("bf16"), Variant("bf16", Speed(channels_last=True)), FAST_GPU,
            Variant("bf16", Speed(channels_last=True, cuda_graphs=True)),
            Variant("bf16", Speed(channels_last=True, compile=True, triton_lrn=True))]


def layout_variant(device_type: str) -> Variant:
    """How the layouts are compared: as the training loop runs them by default on a CPU; on a GPU
    with every speed-up that held up on one device."""
    return EAGER if device_type == "cpu" else FAST_GPU


PLAIN_LOOP = "plain loop, torchvision alexnet"
FED = f"{REFERENCE_STEP}, fed by the input pipeline"
TRACED = f"{REFERENCE_STEP}, traced (train --trace)"
# what each of data.DECODE_PLACES adds to the pipeline's measurement names
DECODED = {"workers": "", "device": ", JPEGs decoded on the device",
           "device-in-workers": ", JPEGs decoded on the device by the workers"}


def run_matrix(sizes: Sizes, scratch: Path, device_type: str,
               measured: Callable[[list[Measurement], list[str]], None], modes: Collection[str] | None = None,
               ) -> tuple[list[Measurement], list[str], list[str]]:
    """Every measurement of the matrix (with `modes`, only those layouts and the one-device step they are
    compared with); the ones skipped, each with the reason (layouts needing more GPUs than this machine
    has); and the ones that FAILED, each with its error's last line. After each measurement, `measured`
    gets those so far (the measurements, and the skipped and failed ones)."""
    cores, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    batch, layouts = sizes.batch, layout_variant(device_type)
    found: dict[str, Measurement] = {}
    skipped: list[str] = []
    failed: list[str] = []

    def run(name: str, fn: Callable[..., dict], ranks: int, *args: object, threads: int | None = None,
            **described: Any) -> None:
        if device_type == "cuda" and ranks > gpus:
            skipped.append(f"{name}: one GPU per rank needed, this machine has {gpus}")
            return
        try:
            found[name] = measure(name, fn, ranks, threads or max(1, cores // ranks), batch, scratch, *args,
                                  **described)
        except RuntimeError as error:  # one broken measurement must not lose the rest of the matrix
            last = str(error).strip().splitlines()[-1]
            print(f"  {name}: FAILED: {last}", flush=True)
            failed.append(f"{name}: FAILED: {last}")
        measured(list(found.values()), skipped + failed)

    def step(name: str, ranks: int, mode: str, arch: str, variant: Variant, options: dict | None = None) -> None:
        run(variant.named(name), layout_steps, ranks, mode, arch, options or {}, batch, sizes, variant, arch=arch,
            variant=variant, mode=mode, options=options or {})

    paper, owt = sizes.paper_net, sizes.owt_net
    if modes is not None:
        step(REFERENCE_STEP, 1, REFERENCE, paper, layouts)
        for name, ranks, mode, options in layout_runs(sizes, device_type, skipped, modes):
            step(name, ranks, mode, paper, layouts, options)
        return list(found.values()), skipped, failed
    run(PLAIN_LOOP, plain_loop_steps, 1, batch, sizes, arch="owt")
    for variant in single_variants(device_type):
        step(REFERENCE_STEP, 1, REFERENCE, paper, variant)
    run(layouts.named(TRACED), layout_steps, 1, REFERENCE, paper, {}, batch, sizes, layouts, True, arch=paper,
        variant=layouts)
    step(f"{REFERENCE}, owt", 1, REFERENCE, owt, layouts)
    for name, ranks, mode, options in layout_runs(sizes, device_type, skipped):
        step(name, ranks, mode, paper, layouts, options)
    pictures = str(write_jpeg_tree(scratch / "jpeg", sizes.pipeline_images))
    run("input pipeline, 1 worker (in process)", pipeline_pass, 1, pictures, batch, 0, sizes.pipeline_steps,
        threads=1)
    for place in decode_places(device_type, skipped):
        suffix = DECODED[place]
        run(f"input pipeline, {sizes.workers} workers{suffix}", pipeline_pass, 1, pictures, batch, sizes.workers,
            sizes.pipeline_steps, place, threads=1)
        run(layouts.named(FED + suffix), fed_steps, 1, pictures, batch, sizes.workers, sizes, layouts, place,
            arch=paper, variant=layouts)
    return list(found.values()), skipped, failed


def layout_runs(sizes: Sizes, device_type: str, skipped: list[str], modes: Collection[str] | None = None,
                ) -> list[tuple[str, int, str, dict[str, Any]]]:
    """(name, ranks, mode, options) of every registered layout that runs on more than one rank, at each of
    `sizes.ranks`, with each combination of the option values it says a comparison covers (`compared`: the
    weird trick's exchange schemes, the pipeline's schedules and micro-batches); on a GPU also those that
    hold several parts in one process (the paper split's towers on the one GPU). Those whose own check refuses
    the world size or the batch are added to `skipped`, with its reason. `modes`: those layouts alone."""
    runs = []
    for mode, cls in LAYOUTS.items():
        if cls.fixed_world_size == 1 or (modes is not None and mode not in modes):
            continue  # single: measured above, with each speed-up
        counts = ([1] if device_type == "cuda" and cls.costs.parts(1) > 1 else []) + list(sizes.ranks)
        for ranks, options in itertools.product(counts, cls.compared()):
            name = cls.run_name(ranks, options)
            try:
                cls.check(ranks, TrainConfig(mode=mode, arch=sizes.paper_net, batch_size=sizes.batch, options=options))
            except UsageError as refusal:
                skipped.append(f"{name}: {refusal}")
                continue
            runs.append((name, ranks, mode, options))
    return runs


def decode_places(device_type: str, skipped: list[str]) -> list[str]:
    """Where the pipeline's JPEGs are decoded in this run: by the workers; on the device if a decoder can
    run there (if not, the reason is added to `skipped`); and on a GPU, on it by the workers as well (on
    a CPU that would be the workers' decoding again, by another decoder)."""
    try:
        require_device_decoder()
    except UsageError as error:
        skipped.append(f"input pipeline decoded on the device: {error}")
        return ["workers"]
    return ["workers", "device"] + (["device-in-workers"] if device_type == "cuda" else [])


