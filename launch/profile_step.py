"""Where one training step's time goes: torch.profiler over a few steady-state steps of one layout on
one process, printed as the ops and kernels that take the most device time.

    python launch/profile_step.py --precision bf16 --channels-last --compile --batch 256
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from alexnet_mp.config import TrainConfig
from alexnet_mp.rng import seeded_generator
from alexnet_mp.speed import Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import Setup, create


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="single", choices=["single", "paper-split"])
    parser.add_argument("--arch", default="paper")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--cuda-graphs", action="store_true")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variant = Variant(args.precision, Speed(args.channels_last, args.compile, args.cuda_graphs))
    strategy = create(args.mode, Setup(args.arch, 1000, 0, device, speed=variant.speed), 1)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), TrainConfig(batch_size=args.batch))
    generator = seeded_generator(0, 9)
    images = torch.randn(args.batch, 3, 224, 224, generator=generator).to(device)
    labels = torch.randint(0, 1000, (args.batch,), generator=generator).to(device)

    def step(index: int) -> None:
        with variant.autocast(device):
            train_step(strategy, optimizer, images, labels, index, args.batch)

    for index in range(args.warmup):
        step(index)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for index in range(args.steps):
            step(args.warmup + index)
        if device.type == "cuda":
            torch.cuda.synchronize()
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"{args.mode}, {variant.named(args.arch)}, batch {args.batch}, {args.steps} steps on {device}")
    print(prof.key_averages().table(sort_by=key, row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
