"""`python -m alexnet_mp bench`: every layout's training step timed side by side in one run, against
the plain PyTorch loop, plus the input pipeline alone. Each measurement runs in fresh processes it
spawns itself (gloo over a FileStore, no launcher), times steady-state steps after warm-up with the
batch already in memory, and reports medians with min-max; the ratios compare figures of this run.
The measured processes import only what a step needs (the data pipeline only where it is timed).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import shutil
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import layer_costs
from alexnet_mp.data import Augmented, FolderSource, GlobalBatches, rank_batches, require_device_decoder
from alexnet_mp.errors import UsageError
from alexnet_mp.links import Ledger
from alexnet_mp.model import ARCHITECTURES, IMAGE_SIZE
from alexnet_mp.processes import run_distributed
from alexnet_mp.report import markdown_table
from alexnet_mp.rng import seeded_generator
from alexnet_mp.speed import EAGER, Speed, Variant
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import build, check_layout
from alexnet_mp.timing import StepClock, peak_memory_mb
from alexnet_mp.world import current

SEED = 0
BENCH_STREAM = 9  # a key of its own for the in-memory batch (rng.seeded_generator)
# Dense peak TFLOP/s by device name and precision, from NVIDIA's datasheets (SXM parts); model FLOPs
# utilisation divides the training FLOPs actually done per second by these. fp32 steps are held to the
# TF32 tensor-core peak: cuDNN runs float32 convs as TF32 by default (torch.backends.cudnn.allow_tf32).
PEAK_TFLOPS = {"H100": {"fp32": 494.7, "bf16": 989.4}, "H200": {"fp32": 494.7, "bf16": 989.4}}


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


FULL = Sizes(batch=32, steps=6, warmup=2, ranks=(2, 4), pipeline_images=512, pipeline_steps=16, workers=2,
             num_classes=1000)
# The GPU sizes: batch 256; warm-up long enough for compilation and CUDA-graph recording.
FULL_GPU = Sizes(batch=256, steps=20, warmup=5, ranks=(2, 4), pipeline_images=2048, pipeline_steps=40, workers=8,
                 num_classes=1000)
QUICK = Sizes(batch=4, steps=1, warmup=1, ranks=(2, 4), pipeline_images=8, pipeline_steps=1, workers=2,
              num_classes=10)


FAST_GPU = Variant("bf16", Speed(channels_last=True, compile=True))
EXCHANGE_LINK = "fc6-input"  # the link of weird-trick's conv-feature exchange, the one scheme (b) overlaps


def single_variants(device_type: str) -> list[Variant]:
    """Our single-device step, one speed-up added at a time, on a GPU (the last: compiled with LRN's
    Triton kernels, against the compiled torch ops without CUDA graphs). A CPU runs the eager float32
    step alone: it has no bf16 units (bf16 ran 10x slower than float32 here), and compiling takes
    most of a minute per process with 2 cores."""
    if device_type == "cpu":
        return [EAGER]
    return [EAGER, Variant("bf16"), Variant("bf16", Speed(channels_last=True)), FAST_GPU,
            Variant("bf16", Speed(channels_last=True, cuda_graphs=True)),
            Variant("bf16", Speed(channels_last=True, compile=True, triton_lrn=True))]


def layout_variant(device_type: str) -> Variant:
    """How the layouts are compared: as the training loop runs them by default on a CPU; on a GPU
    with every speed-up that held up on one device."""
    return EAGER if device_type == "cpu" else FAST_GPU


# -- what runs inside the measured processes --

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


def layout_steps(mode: str, arch: str, exchange: str | None, batch: int, sizes: Sizes,
                 variant: Variant = EAGER) -> dict:
    """Our training step on this rank's part of an in-memory global batch."""
    device = _device()
    config = TrainConfig(mode=mode, arch=arch, num_classes=sizes.num_classes, seed=SEED, exchange=exchange,
                         batch_size=batch, **variant.speed.flags())
    check_layout(config, current().size)
    strategy = build(config, device)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), config)
    images, labels = _fixed_batch(batch, sizes.num_classes, device)
    images, labels = images[strategy.image_rows(batch)], labels[strategy.label_rows(batch)]

    def run_step(step: int) -> None:
        strategy.ledger.reset()
        with variant.autocast(device):
            train_step(strategy, optimizer, images, labels, step, batch)

    result = _timed(run_step, device, sizes, strategy.ledger)
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
    config = TrainConfig(mode="single", num_classes=sizes.num_classes, seed=SEED, batch_size=batch,
                         **variant.speed.flags())
    strategy = build(config, device)
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), config)

    def run_step(step: int, images: torch.Tensor, labels: torch.Tensor) -> None:
        with variant.autocast(device):
            train_step(strategy, optimizer, images, labels, step, batch)

    for step in range(sizes.warmup):
        run_step(step, *_fixed_batch(batch, sizes.num_classes, device))
    return _loader_pass(root, batch, workers, sizes.steps, device, decode_on,
                        lambda step, images, labels: run_step(sizes.warmup + step, images, labels))


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
    arch: str | None = None  # of a training step (None: the input pipeline alone)
    precision: str = "fp32"
    link_wait_s: dict[str, float] = field(default_factory=dict)  # comm_wait_s per link
    # comm_wait_s after the last rank reached the link: data moving, not a rank waiting for a slower one
    comm_transfer_s: float = 0.0
    link_transfer_s: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.images_per_s)

    def speed(self) -> str:
        return f"{self.median:.1f} ({min(self.images_per_s):.1f}-{max(self.images_per_s):.1f})"


def measure(name: str, fn: Callable[..., dict], ranks: int, threads: int, batch: int, scratch: Path,
            *args: object, arch: str | None = None, precision: str = "fp32") -> Measurement:
    folder = Path(tempfile.mkdtemp(dir=scratch))
    results = run_distributed(fn, ranks, folder, *args, threads=threads)
    slowest = [max(steps) for steps in zip(*(r["step_s"] for r in results), strict=True)]
    steps = list(zip(*(r["links"] for r in results), strict=True))  # per step, each rank's link times

    def slowest_wait(links: set[str], after_last_arrival: bool = False) -> float:
        return statistics.median(max(blocked_per_rank(step, links, after_last_arrival)) for step in steps)

    links = {link for step in steps for rank in step for link, _ in rank["blocked"]}
    print(f"  {name}: {statistics.median(batch / s for s in slowest):.1f} images/s", flush=True)
    return Measurement(name, ranks, threads, batch, [batch / s for s in slowest], slowest_wait(links),
                       [r["bytes"] for r in results], [r["peak_memory_mb"] for r in results], arch, precision,
                       {link: slowest_wait({link}) for link in sorted(links)}, slowest_wait(links, True),
                       {link: slowest_wait({link}, True) for link in sorted(links)})


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


PLAIN_LOOP = "plain loop, torchvision alexnet"
FED = "single, paper, fed by the input pipeline"
# what each of data.DECODE_PLACES adds to the pipeline's measurement names
DECODED = {"workers": "", "device": ", JPEGs decoded on the device",
           "device-in-workers": ", JPEGs decoded on the device by the workers"}


def run_matrix(sizes: Sizes, scratch: Path, device_type: str,
               measured: Callable[[list[Measurement], list[str]], None]
               ) -> tuple[list[Measurement], list[str], list[str]]:
    """Every measurement of the matrix; the ones skipped, each with the reason (layouts needing more
    GPUs than this machine has); and the ones that FAILED, each with its error's last line. After each
    measurement, `measured` gets those so far (the measurements, and the skipped and failed ones)."""
    cores, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    batch, layouts = sizes.batch, layout_variant(device_type)
    found: dict[str, Measurement] = {}
    skipped: list[str] = []
    failed: list[str] = []

    def run(name: str, fn: Callable[..., dict], ranks: int, *args: object, threads: int | None = None,
            arch: str | None = None, precision: str = "fp32") -> None:
        if device_type == "cuda" and ranks > gpus:
            skipped.append(f"{name}: one GPU per rank needed, this machine has {gpus}")
            return
        try:
            found[name] = measure(name, fn, ranks, threads or max(1, cores // ranks), batch, scratch, *args,
                                  arch=arch, precision=precision)
        except RuntimeError as error:  # one broken measurement must not lose the rest of the matrix
            last = str(error).strip().splitlines()[-1]
            print(f"  {name}: FAILED: {last}", flush=True)
            failed.append(f"{name}: FAILED: {last}")
        measured(list(found.values()), skipped + failed)

    def step(name: str, ranks: int, mode: str, arch: str, variant: Variant, exchange: str | None = None) -> None:
        run(variant.named(name), layout_steps, ranks, mode, arch, exchange, batch, sizes, variant, arch=arch,
            precision=variant.precision)

    run(PLAIN_LOOP, plain_loop_steps, 1, batch, sizes, arch="owt")
    for variant in single_variants(device_type):
        step("single, paper", 1, "single", "paper", variant)
    step("single, owt", 1, "single", "owt", layouts)
    if device_type == "cuda":  # both towers on the one GPU, the links local copies
        step("paper-split, 1 process", 1, "paper-split", "paper", layouts)
    step("paper-split x2", 2, "paper-split", "paper", layouts)
    for ranks in sizes.ranks:
        step(f"data-parallel x{ranks}", ranks, "data-parallel", "paper", layouts)
        for scheme in ("all", "one-at-a-time"):
            step(f"weird-trick ({scheme}) x{ranks}", ranks, "weird-trick", "paper", layouts, scheme)
    pictures = str(write_jpeg_tree(scratch / "jpeg", sizes.pipeline_images))
    run("input pipeline, 1 worker (in process)", pipeline_pass, 1, pictures, batch, 0, sizes.pipeline_steps,
        threads=1)
    for place in decode_places(device_type, skipped):
        suffix = DECODED[place]
        run(f"input pipeline, {sizes.workers} workers{suffix}", pipeline_pass, 1, pictures, batch, sizes.workers,
            sizes.pipeline_steps, place, threads=1)
        run(layouts.named(FED + suffix), fed_steps, 1, pictures, batch, sizes.workers, sizes, layouts, place,
            arch="paper", precision=layouts.precision)
    return list(found.values()), skipped, failed


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


def comparisons(found: dict[str, Measurement], sizes: Sizes, device_type: str) -> list[Comparison]:
    """The ratios of this run, each with its target where the issue sets one; a ratio whose
    measurements this machine could not run is left out."""
    layouts = layout_variant(device_type)
    single = layouts.named("single, paper")
    rows: list[Comparison] = []

    def ratio(what: str, ours: str, theirs: str, target: float | None = None, detail: str = "") -> None:
        if ours in found and theirs in found:
            rows.append(Comparison(what, ours, theirs, found[ours].median / found[theirs].median, target, detail))

    ratio("our step vs the plain loop (different nets: paper has LRN and 2 towers)", "single, paper", PLAIN_LOOP)
    ratio("our step vs the plain loop, same net (owt = torchvision's layout)", layouts.named("single, owt"),
          PLAIN_LOOP, 1.0)
    if device_type == "cuda":
        owt = found.get(layouts.named("single, owt"))
        # the measured part of why: the same speed-ups on torchvision's layout, the same FLOPs to 1%
        same_speed_ups = ("torchvision's layout (owt) with these speed-ups: "
                          f"{owt.median / found[PLAIN_LOOP].median:.2f}x; the paper net's two LRNs and grouped "
                          "convolutions cost the difference (profile: docs/experiments.md)"
                          ) if owt and PLAIN_LOOP in found else ""
        for variant in single_variants(device_type)[1:]:
            ratio(f"our step, {variant.label()}, vs the plain fp32 loop", variant.named("single, paper"), PLAIN_LOOP,
                  2.0, same_speed_ups if variant == layouts else "")
        steps = [variant.named("single, paper") for variant in single_variants(device_type)]
        rows.extend(utilisation_rows([found[name] for name in steps + [layouts.named("paper-split, 1 process")]
                                      if name in found], sizes.num_classes, owt))
    split = layouts.named("paper-split x2")
    if split in found:
        ratio("paper-split on 2 ranks vs single on the same cores", split, single, 0.95,
              f"links blocked {1000 * found[split].comm_wait_s:.1f} ms/step")
    ratio("paper-split in 1 process (towers as separate convs) vs single (grouped convs)",
          layouts.named("paper-split, 1 process"), single)
    for ranks in sizes.ranks:
        dp, a, b = (layouts.named(name) for name in (f"data-parallel x{ranks}", f"weird-trick (all) x{ranks}",
                                                     f"weird-trick (one-at-a-time) x{ranks}"))
        if not {dp, a, b} <= found.keys():
            continue
        ratio(f"weird-trick (a) vs data-parallel at {ranks} ranks", a, dp,
              detail=f"bytes/step on rank 0: {found[a].bytes_per_rank[0]:,.0f} vs {found[dp].bytes_per_rank[0]:,.0f}")
        rows.extend(hidden_exchange(found[b], found[a], ranks))
    pipeline = f"input pipeline, {sizes.workers} workers"
    ratio("input pipeline vs the training step it feeds (>= 1: the loader keeps up)", pipeline, single, 1.0,
          f"{found['input pipeline, 1 worker (in process)'].median:.1f} images/s per worker"
          if "input pipeline, 1 worker (in process)" in found else "")
    for suffix in DECODED.values():
        if suffix:
            ratio(f"input pipeline{suffix} vs the training step it feeds", pipeline + suffix, single, 1.0)
    for suffix in DECODED.values():
        ratio(f"single step fed by the input pipeline{suffix} vs from memory", layouts.named(FED + suffix), single)
    return rows


def hidden_exchange(b: Measurement, a: Measurement, ranks: int) -> list[Comparison]:
    """How much of the conv features' exchange scheme (b) hides behind fc6's work, against scheme (a),
    on that link alone (the FC layers' own gathers are the same in both schemes): of the transfer,
    the target's measure, and of the whole wait, which also holds the time spent waiting for a
    slower rank to finish its convs (imbalance, which shows up again at the next collective)."""
    def hidden(ours: float, theirs: float) -> float:
        return 1 - ours / theirs if theirs else 0.0

    moving_a, moving_b = (m.link_transfer_s.get(EXCHANGE_LINK, 0.0) for m in (a, b))
    wait_a, wait_b = (m.link_wait_s.get(EXCHANGE_LINK, 0.0) for m in (a, b))
    return [Comparison(f"weird-trick (b) vs (a) at {ranks} ranks: exchange transfer hidden", b.name, a.name,
                       hidden(moving_b, moving_a), 0.5,
                       f"{EXCHANGE_LINK} blocked after the last rank arrived {1000 * moving_b:.1f} vs "
                       f"{1000 * moving_a:.1f} ms"),
            Comparison(f"weird-trick (b) vs (a) at {ranks} ranks: exchange wait hidden, slower ranks included",
                       b.name, a.name, hidden(wait_b, wait_a), None,
                       f"{EXCHANGE_LINK} blocked {1000 * wait_b:.1f} vs {1000 * wait_a:.1f} ms; all links "
                       f"{1000 * b.comm_wait_s:.1f} vs {1000 * a.comm_wait_s:.1f} ms")]


def training_tflops(measurement: Measurement, num_classes: int) -> float:
    """Training FLOPs per image (3x the forward's) x images/s: what `plan --device-tflops` wants."""
    arch = ARCHITECTURES[measurement.arch or "paper"]
    return 3 * sum(c.flops for c in layer_costs(arch, num_classes)) * measurement.median / 1e12


def peak_tflops(precision: str) -> float | None:
    """The GPU's dense datasheet peak for the precision; None on a CPU or an unknown GPU."""
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS.items() if key in name), None)


def model_flops_utilisation(measurement: Measurement, num_classes: int) -> float | None:
    """Training FLOPs done per second over the device's dense peak for the step's precision."""
    peak = peak_tflops(measurement.precision)
    return training_tflops(measurement, num_classes) / peak if peak and measurement.arch else None


def utilisation_rows(steps: list[Measurement], num_classes: int, owt: Measurement | None = None) -> list[Comparison]:
    """The issue's MFU target: the best bf16 one-device step of the paper net (of `steps`, from memory),
    beside torchvision's layout (`owt`) with the same speed-ups, where measured."""
    bf16 = [m for m in steps if m.precision == "bf16"]
    peak = peak_tflops("bf16")
    if not bf16 or peak is None:
        return []
    best = max(bf16, key=lambda m: m.median)
    tflops = training_tflops(best, num_classes)
    owt_net = (f"; torchvision's layout (owt) {training_tflops(owt, num_classes) / peak:.1%}: AlexNet's 3-channel "
               "conv1 and 13x13 conv3-5 leave tensor cores idle, and the paper net adds memory-bound LRNs"
               ) if owt else ""
    return [Comparison(f"model FLOPs utilisation in bf16 at batch {best.batch}", best.name, "dense bf16 peak",
                       tflops / peak, 0.30, f"{tflops:.1f} of {peak:g} TFLOP/s (datasheet){owt_net}")]


def environment() -> dict[str, str]:
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    gpu = {"cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())} if cuda else {}
    return {"device": device, "cpu cores": str(os.cpu_count()), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, **gpu,
            "python": platform.python_version()}


def report(measurements: list[Measurement], rows: list[Comparison], not_measured: list[str], sizes: Sizes,
           quick: bool, env: dict[str, str]) -> str:
    def utilisation(m: Measurement) -> str:
        value = model_flops_utilisation(m, sizes.num_classes)
        return "-" if value is None else f"{value:.1%}"

    lines = [f"# Benchmark ({'quick' if quick else 'full'} sizes)", "",
             ", ".join(f"{key}: {value}" for key, value in env.items()),
             f"global batch {sizes.batch}, {sizes.steps} timed steps after {sizes.warmup} warm-up, "
             f"{sizes.num_classes} classes, data in memory unless named; bf16: autocast, float32 weights", "",
             markdown_table(["measurement", "ranks x threads", "images/s median (min-max)",
                             "comm wait ms/step (after the last rank arrived)", "bytes sent/step per rank",
                             "peak MiB per rank", "TFLOP/s", "MFU"],
                            [[m.name, f"{m.ranks} x {m.threads}", m.speed(),
                              f"{1000 * m.comm_wait_s:.1f} ({1000 * m.comm_transfer_s:.1f})",
                              " / ".join(f"{b:,.0f}" for b in m.bytes_per_rank),
                              " / ".join(f"{p:.0f}" for p in m.peak_memory_mb),
                              f"{training_tflops(m, sizes.num_classes):.3g}" if m.arch else "-", utilisation(m)]
                             for m in measurements]),
             "",
             markdown_table(["comparison", "ratio", "target", "verdict", "detail"],
                            [[c.what, f"{c.ratio:.2f}", "-" if c.target is None else f">= {c.target:g}", c.verdict,
                              c.detail] for c in rows])]
    if not_measured:
        lines += ["", "Not measured:", *(f"- {reason}" for reason in not_measured)]
    single = next((m for m in measurements if m.name == "single, paper"), None)  # None in a partial report
    if single:
        tflops = training_tflops(single, sizes.num_classes)
        lines += ["", f"`single, paper` sustains {tflops:.3f} TFLOP/s of training "
                      f"(`plan --device-tflops {tflops:.3g}`)"]
    return "\n".join(lines) + "\n"


def bench(output: Path, quick: bool, ranks: tuple[int, ...] | None = None) -> list[str]:
    """Runs the matrix, writing OUTPUT/bench.json and bench.md after each measurement; returns the
    measurements that failed, each with its error's last line."""
    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    sizes = QUICK if quick else FULL_GPU if device_type == "cuda" else FULL
    if ranks:
        sizes = replace(sizes, ranks=ranks)
    output.mkdir(parents=True, exist_ok=True)
    env = environment()

    def write(measurements: list[Measurement], not_measured: list[str]) -> str:
        """bench.json and bench.md of the measurements so far: a run cut short keeps what it measured."""
        rows = comparisons({m.name: m for m in measurements}, sizes, device_type)
        text = report(measurements, rows, not_measured, sizes, quick, env)
        record = {"environment": env, "sizes": asdict(sizes), "quick": quick, "skipped": not_measured,
                  "measurements": [{**asdict(m), "median_images_per_s": m.median} for m in measurements],
                  "comparisons": [{**asdict(c), "verdict": c.verdict} for c in rows]}
        (output / "bench.json").write_text(json.dumps(record, indent=2) + "\n")
        (output / "bench.md").write_text(text)
        return text

    scratch = Path(tempfile.mkdtemp(prefix="bench-", dir=output))
    try:
        measurements, skipped, failed = run_matrix(sizes, scratch, device_type, write)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(write(measurements, skipped + failed))
    return failed
