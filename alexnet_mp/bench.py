"""`python -m alexnet_mp bench`: every layout's training step timed side by side in one run, against
the plain PyTorch loop, plus the input pipeline alone. Each measurement runs in fresh processes it
spawns itself (gloo over a FileStore, no launcher), times steady-state steps after warm-up with the
batch already in memory, and reports medians with min-max; the ratios compare figures of this run.
The measured processes import only what a step needs (the data pipeline only where it is timed).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import layer_costs
from alexnet_mp.model import ARCHITECTURES, IMAGE_SIZE
from alexnet_mp.processes import run_distributed
from alexnet_mp.report import markdown_table
from alexnet_mp.rng import seeded_generator
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import Setup, create
from alexnet_mp.strategies.base import world
from alexnet_mp.timing import StepClock, peak_memory_mb

SEED = 0
BENCH_STREAM = 9  # a key of its own for the in-memory batch (rng.seeded_generator)
# Dense peak TFLOP/s by device name and dtype, from NVIDIA's datasheets (SXM parts); model FLOPs
# utilisation divides the training FLOPs actually done per second by these.
PEAK_TFLOPS = {"H100": {torch.float32: 67.0, torch.bfloat16: 989.0},
               "H200": {torch.float32: 67.0, torch.bfloat16: 989.0}}


@dataclass(frozen=True)
class Sizes:
    batch: int  # global batch of the layout comparisons
    steps: int  # timed, after `warmup` untimed
    warmup: int
    ranks: tuple[int, ...]  # world sizes of the data-parallel vs weird-trick comparison
    pipeline_images: int  # JPEG files written for the input pipeline's measurements
    workers: int  # loader processes of the pipeline measurement
    num_classes: int


FULL = Sizes(batch=32, steps=6, warmup=2, ranks=(2, 4), pipeline_images=512, workers=2, num_classes=1000)
QUICK = Sizes(batch=4, steps=1, warmup=1, ranks=(2, 4), pipeline_images=8, workers=2, num_classes=10)


# -- what runs inside the measured processes --

def _device() -> torch.device:
    rank, _ = world()
    if torch.cuda.is_available():
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _fixed_batch(batch: int, num_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    generator = seeded_generator(SEED, BENCH_STREAM)
    images = torch.randn(batch, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return images.to(device), torch.randint(0, num_classes, (batch,), generator=generator).to(device)


def _timed(run_step: Callable[[int], None], device: torch.device, sizes: Sizes,
           waited: Callable[[], float] = lambda: 0.0) -> dict:
    """Seconds per timed step, and seconds of each spent blocked on communication."""
    step_s, wait_s = [], []
    clock = StepClock(device)
    for step in range(sizes.warmup + sizes.steps):
        clock.start()
        run_step(step)
        elapsed = clock.stop()
        if step >= sizes.warmup:
            step_s.append(elapsed)
            wait_s.append(waited())
    return {"step_s": step_s, "comm_wait_s": wait_s, "peak_memory_mb": peak_memory_mb(device)}


def layout_steps(mode: str, arch: str, exchange: str | None, batch: int, sizes: Sizes) -> dict:
    """Our training step on this rank's part of an in-memory global batch."""
    device = _device()
    strategy = create(mode, Setup(arch, sizes.num_classes, SEED, device, exchange=exchange), world()[1])
    strategy.check_batch(batch)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), TrainConfig(batch_size=batch))
    images, labels = _fixed_batch(batch, sizes.num_classes, device)
    images, labels = images[strategy.image_rows(batch)], labels[strategy.label_rows(batch)]

    def run_step(step: int) -> None:
        strategy.ledger.reset()
        train_step(strategy, optimizer, images, labels, step, batch)

    result = _timed(run_step, device, sizes, lambda: strategy.ledger.wait_s)
    return {**result, "bytes": strategy.ledger.total_bytes()}


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


def _loaded_batches(root: str, batch: int, workers: int, steps: int, device: torch.device) -> Iterator:
    from alexnet_mp.data import Augmented, FolderSource, GlobalBatches, rank_batches, train_transform

    dataset = Augmented(FolderSource(Path(root)), train_transform(), SEED)
    batches = GlobalBatches(len(dataset), batch, SEED)
    return rank_batches(dataset, batches, slice(0, batch), slice(0, batch), 0, steps, workers,
                        pin_memory=device.type == "cuda")


def pipeline_pass(root: str, images: int, batch: int, workers: int) -> dict:
    """The input pipeline alone (decode, the paper's augmentation, collation): one pass over every
    image, from the loader's creation (worker start-up included) to its last batch. Per-batch times
    would mislead: batches prefetched during start-up arrive at once."""
    device = torch.device("cpu")
    steps = images // batch
    loaded = _loaded_batches(root, batch, workers, steps, device)  # a generator: nothing is loaded yet
    started = time.perf_counter()
    for _ in loaded:
        pass
    seconds = (time.perf_counter() - started) / steps
    return {"step_s": [seconds], "comm_wait_s": [0.0], "peak_memory_mb": peak_memory_mb(device), "bytes": 0.0}


def fed_steps(root: str, batch: int, workers: int, sizes: Sizes) -> dict:
    """Our single-device step fed by the input pipeline (data wait included)."""
    device = _device()
    loaded = _loaded_batches(root, batch, workers, sizes.warmup + sizes.steps, device)
    strategy = create("single", Setup("paper", sizes.num_classes, SEED, device), 1)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), TrainConfig(batch_size=batch))

    def run_step(step: int) -> None:
        _, images, labels = next(loaded)
        train_step(strategy, optimizer, images.to(device, non_blocking=True), labels.to(device), step, batch)

    return {**_timed(run_step, device, sizes), "bytes": 0.0}


# -- the matrix, run from the launching process --

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

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)

    def speed(self) -> str:
        return f"{self.median:.1f} ({min(self.images_per_s):.1f}-{max(self.images_per_s):.1f})"


def measure(name: str, fn: Callable[..., dict], ranks: int, threads: int, batch: int, scratch: Path,
            *args: object) -> Measurement:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    results = run_distributed(fn, ranks, folder, *args, threads=threads)
    slowest = [max(steps) for steps in zip(*(r["step_s"] for r in results), strict=True)]
    waits = [max(steps) for steps in zip(*(r["comm_wait_s"] for r in results), strict=True)]
    print(f"  {name}: {statistics.median(batch / s for s in slowest):.1f} images/s", flush=True)
    return Measurement(name, ranks, threads, batch, [batch / s for s in slowest], statistics.median(waits),
                       [r["bytes"] for r in results], [r["peak_memory_mb"] for r in results])


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


@dataclass
class Comparison:
    what: str
    ours: str  # measurement names
    theirs: str
    ratio: float
    target: float | None = None
    detail: str = ""

    @property
    def verdict(self) -> str:
        if self.target is None:
            return "-"
        return "met" if self.ratio >= self.target else f"missed by {self.target - self.ratio:.2f}"


def run_matrix(sizes: Sizes, scratch: Path) -> tuple[list[Measurement], list[Comparison]]:
    cores = os.cpu_count() or 1
    batch = sizes.batch
    found: dict[str, Measurement] = {}

    def run(name: str, fn: Callable[..., dict], ranks: int, *args: object, threads: int | None = None) -> None:
        found[name] = measure(name, fn, ranks, threads or max(1, cores // ranks), batch, scratch, *args)

    run("plain loop, torchvision alexnet", plain_loop_steps, 1, batch, sizes)
    run("single, paper", layout_steps, 1, "single", "paper", None, batch, sizes)
    run("single, owt", layout_steps, 1, "single", "owt", None, batch, sizes)
    run("paper-split x2", layout_steps, 2, "paper-split", "paper", None, batch, sizes)
    for ranks in sizes.ranks:
        run(f"data-parallel x{ranks}", layout_steps, ranks, "data-parallel", "paper", None, batch, sizes)
        for scheme in ("all", "one-at-a-time"):
            run(f"weird-trick ({scheme}) x{ranks}", layout_steps, ranks, "weird-trick", "paper", scheme, batch, sizes)
    pictures = write_jpeg_tree(scratch / "jpeg", sizes.pipeline_images)
    for workers, name in ((0, "1 worker (in process)"), (sizes.workers, f"{sizes.workers} workers")):
        run(f"input pipeline, {name}", pipeline_pass, 1, str(pictures), sizes.pipeline_images, batch, workers,
            threads=1)
    run("single, paper, fed by the input pipeline", fed_steps, 1, str(pictures), batch, sizes.workers, sizes)
    return list(found.values()), comparisons(found, sizes)


def comparisons(found: dict[str, Measurement], sizes: Sizes) -> list[Comparison]:
    def ratio(what: str, ours: str, theirs: str, target: float | None = None, detail: str = "") -> Comparison:
        return Comparison(what, ours, theirs, found[ours].median / found[theirs].median, target, detail)

    split = found["paper-split x2"]
    rows = [ratio("our step vs the plain loop (different nets: paper has LRN and 2 towers)", "single, paper",
                  "plain loop, torchvision alexnet"),
            ratio("our step vs the plain loop, same net (owt = torchvision's layout)", "single, owt",
                  "plain loop, torchvision alexnet", 1.0),
            ratio("paper-split on 2 ranks vs single on the same cores", "paper-split x2", "single, paper", 0.95,
                  f"links blocked {1000 * split.comm_wait_s:.1f} ms/step")]
    for ranks in sizes.ranks:
        rows.append(ratio(f"weird-trick (a) vs data-parallel at {ranks} ranks", f"weird-trick (all) x{ranks}",
                          f"data-parallel x{ranks}",
                          detail=f"bytes/step on rank 0: {found[f'weird-trick (all) x{ranks}'].bytes_per_rank[0]:,.0f}"
                                 f" vs {found[f'data-parallel x{ranks}'].bytes_per_rank[0]:,.0f}"))
        a, b = found[f"weird-trick (all) x{ranks}"], found[f"weird-trick (one-at-a-time) x{ranks}"]
        hidden = 1 - b.comm_wait_s / a.comm_wait_s if a.comm_wait_s else 0.0
        rows.append(Comparison(f"weird-trick (b) vs (a) at {ranks} ranks: exchange time hidden", b.name, a.name,
                               hidden, 0.5, f"blocked {1000 * b.comm_wait_s:.1f} vs {1000 * a.comm_wait_s:.1f} ms"))
    pipeline = found[f"input pipeline, {sizes.workers} workers"]
    rows.append(ratio("input pipeline vs the training step it feeds (>= 1: the loader keeps up)", pipeline.name,
                      "single, paper", 1.0,
                      f"{found['input pipeline, 1 worker (in process)'].median:.1f} images/s per worker"))
    rows.append(ratio("single step fed by the input pipeline vs from memory",
                      "single, paper, fed by the input pipeline", "single, paper"))
    return rows


def sustained_tflops(measurement: Measurement, arch: str, num_classes: int) -> float:
    """Training FLOPs per image (3x the forward's) x images/s: what `plan --device-tflops` wants."""
    return 3 * sum(c.flops for c in layer_costs(ARCHITECTURES[arch], num_classes)) * measurement.median / 1e12


def model_flops_utilisation(tflops: float) -> float | None:
    """Sustained TFLOP/s over the GPU's dense fp32 peak; None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    peak = next((p[torch.float32] for key, p in PEAK_TFLOPS.items() if key in name), None)
    return tflops / peak if peak else None


def environment() -> dict[str, str]:
    import torchvision

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else (platform.processor() or "cpu")
    return {"device": device, "cpu cores": str(os.cpu_count()), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "python": platform.python_version()}


def report(measurements: list[Measurement], rows: list[Comparison], sizes: Sizes, quick: bool) -> str:
    env = environment()
    lines = [f"# Benchmark ({'quick' if quick else 'full'} sizes)", "",
             ", ".join(f"{key}: {value}" for key, value in env.items()),
             f"global batch {sizes.batch}, {sizes.steps} timed steps after {sizes.warmup} warm-up, "
             f"{sizes.num_classes} classes, data in memory unless named", "",
             markdown_table(["measurement", "ranks x threads", "images/s median (min-max)", "comm wait ms/step",
                             "bytes sent/step per rank", "peak MiB per rank"],
                            [[m.name, f"{m.ranks} x {m.threads}", m.speed(), f"{1000 * m.comm_wait_s:.1f}",
                              " / ".join(f"{b:,.0f}" for b in m.bytes_per_rank),
                              " / ".join(f"{p:.0f}" for p in m.peak_memory_mb)] for m in measurements]),
             "",
             markdown_table(["comparison", "ratio", "target", "verdict", "detail"],
                            [[c.what, f"{c.ratio:.2f}", "-" if c.target is None else f">= {c.target:g}", c.verdict,
                              c.detail] for c in rows])]
    single = next(m for m in measurements if m.name == "single, paper")
    tflops = sustained_tflops(single, "paper", sizes.num_classes)
    lines += ["", f"`single, paper` sustains {tflops:.3f} TFLOP/s of training (`plan --device-tflops {tflops:.3g}`)"]
    utilisation = model_flops_utilisation(tflops)
    if utilisation is not None:
        lines.append(f"Model FLOPs utilisation of `single, paper` (fp32): {utilisation:.1%}")
    return "\n".join(lines) + "\n"


def bench(output: Path, quick: bool, ranks: tuple[int, ...] | None = None) -> Path:
    sizes = QUICK if quick else FULL
    if ranks:
        sizes = replace(sizes, ranks=ranks)
    output.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=output))
    try:
        measurements, rows = run_matrix(sizes, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    text = report(measurements, rows, sizes, quick)
    record = {"environment": environment(), "sizes": asdict(sizes), "quick": quick,
              "measurements": [{**asdict(m), "median_images_per_s": m.median} for m in measurements],
              "comparisons": [{**asdict(c), "verdict": c.verdict} for c in rows]}
    (output / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
    (output / "bench.md").write_text(text)
    print(text)
    return output
