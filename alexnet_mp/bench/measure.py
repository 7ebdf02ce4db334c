"""How one measurement of the benchmark is taken: the functions that run inside the measured processes
(a layout's training step, the plain PyTorch loop, the input pipeline, the step fed by it), each timing
steady-state steps after warm-up with the batch already in memory unless the pipeline is what is timed,
and `measure`, which runs one on fresh gloo processes (no launcher) and reduces what the ranks saw.
The measured processes import only what a step needs (the data pipeline only where it is timed)."""

from __future__ import annotations

import math
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from alexnet_mp.config import TrainConfig
from alexnet_mp.data import Augmented, FolderSource, GlobalBatches, rank_batches
from alexnet_mp.ledger import Ledger
from alexnet_mp.model import IMAGE_SIZE
from alexnet_mp.processes import run_distributed
from alexnet_mp.rng import seeded_generator
from alexnet_mp.speed import EAGER, Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import REFERENCE, build, check_layout
from alexnet_mp.timing import StepClock, memory_in_use_mb, peak_memory_mb
from alexnet_mp.trace import Tracer
from alexnet_mp.world import current

SEED = 0
BENCH_STREAM = 9  # a key of its own for the in-memory batch (rng.seeded_generator)


@dataclass(frozen=True)
class Sizes:
    batch: int  # global batch of the layout comparisons
    steps: int  # timed, after `warmup` untimed
    warmup: int
    ranks: tuple[int, ...]  # world sizes of the data-parallel vs weird-trick comparison
    pipeline_images: int  # JPEG files written for the input pipeline's measurements
    pipeline_steps: int  # batches the input pipeline alone is timed on, after its warm-up
    workers: int  # loader processes of the pipeline measurement
    num_classes: int
    paper_net: str = "paper"  # the nets our steps run (quick: the debug flavors)
    owt_net: str = "owt"


def _device() -> torch.device:
    rank = current().rank
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _fixed_batch(batch: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = seeded_generator(SEED, BENCH_STREAM)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images.to(device), torch.randint(0, num_classes, (batch,), generator=generator).to(device)


NO_LINKS = Ledger().timings()


def _timed(run_step: Callable[[int], None], device: torch.device, sizes: Sizes, ledger: Ledger | None = None) -> dict:
    """Seconds per timed step, and for each the ledger's communication times (`Ledger.timings`)."""
    step_s, links = [], []
    clock = StepClock(device)
    for step in range(sizes.warmup + sizes.steps):
        clock.start()
        run_step(step)
        elapsed = clock.stop()
        if step >= sizes.warmup:
            step_s.append(elapsed)
            links.append(ledger.timings() if ledger else NO_LINKS)
    return {"step_s": step_s, "links": links, "peak_memory_mb": peak_memory_mb(device)}


def layout_steps(mode: str, arch: str, options: dict[str, Any], batch: int, sizes: Sizes,
                 variant: Variant = EAGER, traced: bool = False) -> dict:
    """Our training step on this rank's part of an in-memory global batch, the layout given `options` (its own);
    `traced`, with `train --trace`'s hooks recording every step."""
    device = _device()
    config = TrainConfig(mode=mode, arch=arch, num_classes=sizes.num_classes, seed=SEED, batch_size=batch,
                         **variant.train_flags(), options=options)
    check_layout(config, current().size)
    before_net_mb = memory_in_use_mb(device)
    layout = build(config, device)
    layout.train()
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())
    images, labels = _fixed_batch(batch, sizes.num_classes, device)
    images, labels = images[layout.image_rows(batch)], labels[layout.label_rows(batch)]
    if traced:
        tracer = Tracer(current().rank, active=True)
        tracer.watch(layout, optimizer)

    def run_step(step: int) -> None:
        layout.ledger.reset()
        with variant.autocast(device):
            train_step(layout, optimizer, images, labels, step, batch)

    result = _timed(run_step, device, sizes, layout.ledger)
    return {**result, "bytes": layout.ledger.total_bytes(),
            "training_memory_mb": result["peak_memory_mb"] - before_net_mb}


def plain_loop_steps(batch: int, sizes: Sizes) -> dict:
    """torchvision's AlexNet in the loop the seed notebooks use: zero_grad, forward, cross-entropy,
    backward, SGD step."""
    import torchvision

    device = _device()
    model = torchvision.models.alexnet(num_classes=sizes.num_classes).to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    images, labels = _fixed_batch(batch, sizes.num_classes, device)

    def run_step(step: int) -> None:
        optimizer.zero_grad()
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    return {**_timed(run_step, device, sizes), "bytes": 0.0}


def loaded_batches(root: str, batch: int, workers: int, steps: int, device: torch.device,
                   decode_on: str) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """`steps` training batches of the JPEG folder `root` on `device`, as `rank_batches` gives them."""
    dataset = Augmented(FolderSource(Path(root)), SEED, train=True, decode_on=decode_on)
    batches = GlobalBatches(len(dataset), batch, SEED)
    return rank_batches(dataset, batches, slice(0, batch), slice(0, batch), 0, steps, workers, device)


def _loader_pass(root: str, batch: int, workers: int, steps: int, device: torch.device, decode_on: str,
                 consume: Callable[[int, torch.Tensor, torch.Tensor], None]) -> dict:
    """Mean time per batch of `steps` loaded batches, each handed to `consume`, in the loader's steady
    state: the clock starts once the first wave is consumed, the batches every worker made at once while
    the loader started (or, with no workers, the first batch, on which the device's decoder starts).
    Timed from the loader's creation, start-up would dominate a short pass; timed per batch, the first
    wave would arrive at once."""
    warmup = max(workers, 1)
    clock = StepClock(device)
    for i, (step, images, labels) in enumerate(loaded_batches(root, batch, workers, warmup + steps, device,
                                                              decode_on)):
        consume(step, images, labels)
        if i == warmup - 1:
            clock.start()
    return {"step_s": [clock.stop() / steps], "links": [NO_LINKS], "peak_memory_mb": peak_memory_mb(device),
            "bytes": 0.0}


def pipeline_pass(root: str, batch: int, workers: int, steps: int, decode_on: str = "workers") -> dict:
    """The input pipeline alone: decode, crop and flip in the workers or on the device, collation, the
    copy to the device and the colour work there."""
    return _loader_pass(root, batch, workers, steps, _device(), decode_on, lambda *batch: None)


def fed_steps(root: str, batch: int, workers: int, sizes: Sizes, variant: Variant = EAGER,
              decode_on: str = "workers") -> dict:
    """Our single-device step fed by the input pipeline, data waits included; warmed up (compiled) on an
    in-memory batch first."""
    device = _device()
    config = TrainConfig(mode=REFERENCE, arch=sizes.paper_net, num_classes=sizes.num_classes, seed=SEED,
                         batch_size=batch, **variant.train_flags())
    layout = build(config, device)
    layout.train()
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())

    def run_step(step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        with variant.autocast(device):
            train_step(layout, optimizer, images, labels, step, batch)

    for step in range(sizes.warmup):
        run_step(step, *_fixed_batch(batch, sizes.num_classes, device))
    return _loader_pass(root, batch, workers, sizes.steps, device, decode_on,
                        lambda step, images, labels: run_step(sizes.warmup + step, images, labels))


@dataclass
class Measurement:
    name: str
    ranks: int
    threads: int  # per rank
    batch: int
    images_per_s: list[float]  # per timed step, of the whole global batch
    comm_wait_s: float  # median per step, slowest rank
    bytes_per_rank: list[float]
    peak_memory_mb: list[float]
    arch: str | None = None  # of a training step (None: the input pipeline alone)
    precision: str = "fp32"
    link_wait_s: dict[str, float] = field(default_factory=dict)  # comm_wait_s per link
    # comm_wait_s after the last rank reached the link: data moving, not a rank waiting for a slower one
    comm_transfer_s: float = 0.0
    link_transfer_s: dict[str, float] = field(default_factory=dict)
    wait_per_rank_s: list[float] = field(default_factory=list)  # each rank's median blocked time per step
    step_s: float = 0.0  # median, slowest rank
    mode: str | None = None  # of a layout's step, with its own options
    options: dict[str, Any] = field(default_factory=dict)
    training_memory_mb: list[float] = field(default_factory=list)  # peak less the memory in use before the net
    launch_steps_s: list[float] = field(default_factory=list)  # step_s of each launch, where measured in several
    speed_ups: Speed = Speed()  # those its step ran with

    @property
    def variant(self) -> Variant:
        return Variant(self.precision, self.speed_ups)

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)

    def speed(self) -> str:
        return f"{self.median:.1f} ({min(self.images_per_s):.1f}-{max(self.images_per_s):.1f})"


def measure(name: str, fn: Callable[..., dict], ranks: int, threads: int, batch: int, scratch: Path,
            *args: object, arch: str | None = None, variant: Variant = EAGER, mode: str | None = None,
            options: dict[str, Any] | None = None) -> Measurement:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    results = run_distributed(fn, ranks, folder, *args, threads=threads)
    slowest = [max(steps) for steps in zip(*(r["step_s"] for r in results), strict=True)]
    steps = list(zip(*(r["links"] for r in results), strict=True))  # per step, each rank's link times

    def slowest_wait(links: set[str], after_last_arrival: bool = False) -> float:
        return statistics.median(max(blocked_per_rank(step, links, after_last_arrival)) for step in steps)

    links = {link for step in steps for rank in step for link, _ in rank["blocked"]}
    print(f"  {name}: {statistics.median(batch / s for s in slowest):.1f} images/s", flush=True)
    return Measurement(name, ranks, threads, batch, [batch / s for s in slowest], slowest_wait(links),
                       [r["bytes"] for r in results], [r["peak_memory_mb"] for r in results], arch, variant.precision,
                       {link: slowest_wait({link}) for link in sorted(links)}, slowest_wait(links, True),
                       {link: slowest_wait({link}, True) for link in sorted(links)},
                       [statistics.median(waits) for waits in zip(*(blocked_per_rank(step, links, False)
                                                                    for step in steps), strict=True)],
                       statistics.median(slowest), mode, options or {},
                       [r["training_memory_mb"] for r in results if "training_memory_mb" in r], speed_ups=variant.speed)


def blocked_per_rank(step: tuple[dict, ...], links: set[str], after_last_arrival: bool) -> list[float]:
    """Each rank's seconds blocked on `links` in one step (`step`: each rank's `Ledger.timings`). With
    `after_last_arrival`, only what it was still blocked after the last rank reached each link, in each
    direction: until then it was waiting for a slower rank, which no overlap of communication can hide.
    Each link is compared over all ranks: right for the layouts measured here, whose every link spans
    all ranks (paper-split on 2M ranks has M groups per link name)."""
    keys = {key for rank in step for key in rank["blocked"] if key[0] in links}
    last = {key: max(rank["arrivals"].get(key, -math.inf) for rank in step) for key in keys}

    def early(rank: dict, key: tuple[str, str]) -> float:
        """Seconds from this rank's arrival until the last rank's (a blocked rank has arrived)."""
        return last[key] - rank["arrivals"][key] if after_last_arrival and key in rank["arrivals"] else 0.0

    return [sum(max(0.0, rank["blocked"].get(key, 0.0) - early(rank, key)) for key in keys) for rank in step]


def write_jpeg_tree(root: Path, images: int, classes: int = 10) -> Path:
    """root/<class>/<i>.jpg: photos' size (500x375, ImageNet's most common) and JPEG quality 90."""
    import numpy as np
    from PIL import Image

    generator = np.random.default_rng(SEED)
    for i in range(images):
        folder = root / f"class{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = generator.integers(0, 255, (12, 16, 3), dtype=np.uint8)
        picture = Image.fromarray(coarse).resize((500, 375), Image.BICUBIC)
        picture.save(folder / f"{i}.jpg", quality=90)
    return root


