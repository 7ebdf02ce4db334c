"""Where one training step's time goes: torch.profiler over a few steady-state steps of one layout on
one process, printed as the ops and kernels that take the most device time. Fed by the input
pipeline (`--fed-by workers|device|device-in-workers`, over generated JPEGs), it prints the host's time instead: the
calls that keep the host from preparing the next batch while the device trains.

    python launch/profile_step.py --precision bf16 --channels-last --compile --batch 256
    python launch/profile_step.py --precision bf16 --channels-last --compile --fed-by device --trace fed.json.gz
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from alexnet_mp.bench.measure import loaded_batches, write_jpeg_tree
from alexnet_mp.config import TrainConfig
from alexnet_mp.data import DECODE_PLACES, require_device_decoder
from alexnet_mp.rng import seeded_generator
from alexnet_mp.speed import Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import build


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="single", choices=["single", "paper-split"])
    parser.add_argument("--arch", default="paper")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--triton-lrn", action="store_true")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--fed-by", default="memory", choices=["memory", *DECODE_PLACES],
                        help="one in-memory batch, or the input pipeline with JPEGs decoded where --decode-on says")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trace", type=Path, help="also write a Chrome trace here (.json or .json.gz)")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = Variant(args.precision, Speed(args.channels_last, args.compile, args.cuda_graphs, args.triton_lrn))
    config = TrainConfig(mode=args.mode, arch=args.arch, num_classes=1000, batch_size=args.batch,
                         **variant.speed.flags())
    layout = build(config, device)
    layout.train()
    optimizer = make_optimizer(layout.parameters(), config)
    batches = feed(args.fed_by, args.batch, args.workers, args.warmup + args.steps, device)

    def step(index: int) -> None:
        images, labels = next(batches)
        with variant.autocast(device):
            train_step(layout, optimizer, images, labels, index, args.batch)

    for index in range(args.warmup):
        step(index)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for index in range(args.steps):
            step(args.warmup + index)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" and args.fed_by == "memory" else "self_cpu_time_total"
    print(f"{args.mode}, {variant.named(args.arch)}, batch {args.batch}, {args.steps} steps on {device}, "
          f"fed by {args.fed_by}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))
    if args.trace:
        prof.export_chrome_trace(str(args.trace))


def feed(source: str, batch: int, workers: int, steps: int, device: torch.device) -> Iterator[tuple]:
    """(images, labels) on `device` for `steps` steps: one fixed random batch, or the input pipeline's."""
    if source == "memory":
        generator = seeded_generator(0, 9)
        images = torch.randn(batch, 3, 224, 224, generator=generator).to(device)
        return itertools.repeat((images, torch.randint(0, 1000, (batch,), generator=generator).to(device)))
    if source != "workers":
        require_device_decoder()
    root = str(write_jpeg_tree(Path(tempfile.mkdtemp()) / "jpeg", 2048))
    return ((images, labels) for _, images, labels in loaded_batches(root, batch, workers, steps, device, source))


if __name__ == "__main__":
    main()
