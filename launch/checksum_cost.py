"""What the shards' SHA-256 adds to a checkpoint's save and load: one process, the paper net with its momentum,
each variant timed alternately REPEATS times (median seconds, and the ratio to the variant without it).

    python launch/checksum_cost.py [--num-classes 1000] [--repeats 5] [--dir /tmp/checksum-cost]

The save hashes the bytes as torch.save writes them; the load reads every shard once more to verify it
before its blocks are read. The files are in the page cache when verified (just written), as after a save;
a load from a cold disk reads them at the disk's speed instead.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch

from alexnet_mp import checkpoint
from alexnet_mp.config import TrainConfig
from alexnet_mp.step import make_optimizer
from alexnet_mp.strategies import build


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-classes", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=None)
    args = parser.parse_args()
    folder = args.dir or Path(tempfile.mkdtemp(prefix="checksum-cost-"))
    config = TrainConfig(mode="single", num_classes=args.num_classes)
    layout = build(config, torch.device("cpu"))
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())
    for param in layout.parameters():  # momentum buffers, as a trained net's checkpoint holds them
        optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param)

    class Unhashed(checkpoint._HashingWriter):
        def write(self, data: bytes) -> int:
            return self.file.write(data)

    def save(hashed: bool) -> float:
        with mock.patch.object(checkpoint, "_HashingWriter", checkpoint._HashingWriter if hashed else Unhashed):
            return timed(lambda: checkpoint.save(folder, layout, optimizer, {"step": 1}, keep=1))

    def load(verified: bool) -> float:
        found = checkpoint.find("latest", folder)
        recorded = found.meta["sha256"]["shard-00000.pt"]
        with mock.patch.object(checkpoint, "_sha256", checkpoint._sha256 if verified else lambda path: recorded):
            return timed(lambda: checkpoint.load(found, layout, optimizer))

    times: dict[str, list[float]] = {name: [] for name in ("save", "save hashed", "load", "load verified")}
    for _ in range(args.repeats):
        times["save"].append(save(False))
        times["save hashed"].append(save(True))
        times["load"].append(load(False))
        times["load verified"].append(load(True))
    size = sum(path.stat().st_size for path in checkpoint.complete_checkpoints(folder)[-1].glob("shard-*.pt"))
    print(f"paper net, {args.num_classes} classes, with momentum: {size / 2**20:.0f} MiB; median of {args.repeats}, "
          f"torch {torch.__version__}")
    median = {name: statistics.median(values) for name, values in times.items()}
    for plain, checked in (("save", "save hashed"), ("load", "load verified")):
        print(f"{plain:>5}: {median[plain]:.3f} s without, {median[checked]:.3f} s with the checksum "
              f"(+{median[checked] - median[plain]:.3f} s, x{median[checked] / median[plain]:.2f})")


if __name__ == "__main__":
    main()
