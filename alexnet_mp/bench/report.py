"""The benchmark's ratios, each against its target where one is set, and its report in Markdown."""

from __future__ import annotations

import datetime
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from alexnet_mp.bench.matrix import DECODED, FED, PLAIN_LOOP, TRACED, layout_variant, single_variants
from alexnet_mp.bench.measure import Measurement, Sizes
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import layer_costs
from alexnet_mp.model import ARCHITECTURES
from alexnet_mp.predict import Held
from alexnet_mp.report import markdown_table, pyplot, save_figure
from alexnet_mp.strategies import LAYOUTS, REFERENCE_STEP

# Dense peak TFLOP/s by device name and precision, from NVIDIA's datasheets (SXM parts); model FLOPs
# utilisation divides the training FLOPs actually done per second by these. fp32 steps are held to the
# TF32 tensor-core peak: cuDNN runs float32 convs as TF32 by default (torch.backends.cudnn.allow_tf32).
PEAK_TFLOPS = {"H100": {"fp32": 494.7, "bf16": 989.4}, "H200": {"fp32": 494.7, "bf16": 989.4}}


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


def comparisons(found: dict[str, Measurement], sizes: Sizes, device_type: str, held: Iterable[Held] = ()
                ) -> list[Comparison]:
    """The ratios of this run, each with its target where one is set; a ratio whose measurements this machine
    could not run is left out. `held`: the cost model's predictions of the runs, where a profile was given."""
    layouts = layout_variant(device_type)
    single = layouts.named(REFERENCE_STEP)
    rows: list[Comparison] = []

    def ratio(what: str, ours: str, theirs: str, target: float | None = None, detail: str = "") -> None:
        if ours in found and theirs in found:
            rows.append(Comparison(what, ours, theirs, found[ours].median / found[theirs].median, target, detail))

    ratio("our step vs the plain loop (different nets: paper has LRN and 2 towers)", REFERENCE_STEP, PLAIN_LOOP)
    ratio("the traced step vs the step (train --trace's hooks: at most 5% slower)", layouts.named(TRACED), single,
          0.95)
    ratio("our step vs the plain loop, same net (owt = torchvision's layout)", layouts.named("single, owt"),
          PLAIN_LOOP, 1.0)
    if device_type == "cuda":
        owt = found.get(layouts.named("single, owt"))
        # the measured part of why: the same speed-ups on torchvision's layout, the same FLOPs to 1%
        same_speed_ups = ("torchvision's layout (owt) with these speed-ups: "
                          f"{owt.median / found[PLAIN_LOOP].median:.2f}x; the paper net's two LRNs and grouped "
                          "convolutions cost the difference (profile: docs/results/)"
                          ) if owt and PLAIN_LOOP in found else ""
        for variant in single_variants(device_type)[1:]:
            ratio(f"our step, {variant.label()}, vs the plain fp32 loop", variant.named(REFERENCE_STEP), PLAIN_LOOP,
                  2.0, same_speed_ups if variant == layouts else "")
        steps = [variant.named(REFERENCE_STEP) for variant in single_variants(device_type)]
        steps += [layouts.named(cls.run_name(1)) for cls in LAYOUTS.values()]  # several parts in one process
        rows.extend(utilisation_rows([found[name] for name in steps if name in found], sizes.num_classes, owt))
    for ranks in (1, *sizes.ranks):
        for cls in LAYOUTS.values():
            for claim in cls.claims(ranks):
                ours, theirs = layouts.named(claim.ours), layouts.named(claim.theirs)
                if ours in found and theirs in found:
                    pair = found[ours], found[theirs]
                    rows.append(Comparison(claim.what, ours, theirs,
                                           claim.ratio(*pair) if claim.ratio else pair[0].median / pair[1].median,
                                           claim.target, claim.detail(*pair) if claim.detail else ""))
    rows.extend(bubbles(found.values(), {h.run: h for h in held}))
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


LEAST_IDLE_SHARE = 0.005  # of a step: a predicted bubble shown as 0% and held to nothing


def bubbles(measurements: Iterable[Measurement], held: Mapping[str, Held]) -> list[Comparison]:
    """For each layout that leaves ranks idle by design (a pipeline's bubble: `Layout.slots`), the idle share
    of the busiest rank's step (the one that waited least) against the prediction: the cost model's timeline
    where `held` has one for it (each stage at its own speed), else 1 - 1 / slots, which is (N - 1) / (M + N - 1)
    for a pipeline of equal stages. A pipeline whose busiest stage is predicted never to idle (or for less than
    `LEAST_IDLE_SHARE`: the schedule's floating-point residue) has no ratio (its rank 0's wait is in the table of
    predictions)."""
    rows = []
    for m in measurements:
        slots = LAYOUTS[m.mode].costs.slots(m.ranks, TrainConfig(mode=m.mode, batch_size=m.batch, options=m.options)) \
            if m.mode else 1.0
        if slots > 1:
            predicted, by = ((held[m.name].busiest_idle_share, "the cost model's timeline") if m.name in held
                             else (1 - 1 / slots, "(N - 1) / (M + N - 1)"))
            measured = min(m.wait_per_rank_s) / m.step_s
            if predicted >= LEAST_IDLE_SHARE:
                rows.append(Comparison(f"{m.name}: bubble, measured over predicted", m.name, by, measured / predicted,
                                       None, f"the busiest stage idle {measured:.0%} of its step; "
                                             f"predicted {predicted:.0%}"))
    return rows


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
    """The MFU target: the best bf16 one-device step of the paper net (of `steps`, from memory),
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


def plot_layouts(measurements: list[Measurement], reference: str, out: Path) -> Path | None:
    """Every layout's images/s on the same global batch, ranked, one panel per rank count, with the one-device
    step (`reference`) as a line: the comparison at a glance. None if no layout ran on several ranks."""
    counts = sorted({m.ranks for m in measurements if m.mode and m.ranks > 1})
    if not counts:
        return None
    plt = pyplot()
    single = next((m.median for m in measurements if m.name == reference), None)
    rows = max(sum(1 for m in measurements if m.mode and m.ranks == n) for n in counts)
    figure, axes = plt.subplots(1, len(counts), figsize=(6.5 * len(counts), 0.32 * rows + 1.5), squeeze=False)
    for axis, count in zip(axes[0], counts, strict=True):
        ranked = sorted((m for m in measurements if m.mode and m.ranks == count), key=lambda m: m.median)
        axis.barh([m.name.rsplit(" x", 1)[0] for m in ranked], [m.median for m in ranked])
        if single:
            axis.axvline(single, color="black", linestyle="--", label=f"{reference} (one process)")
            axis.legend(fontsize="small", loc="lower right")
        axis.set(title=f"{count} ranks, global batch {ranked[0].batch}", xlabel="images/s (median)")
    return save_figure(figure, out)


def environment() -> dict[str, str]:
    import torchvision

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else (platform.processor() or "cpu")
    gpu = {"cuda": str(torch.version.cuda), "cudnn": str(torch.backends.cudnn.version())} if cuda else {}
    return {"device": device, "cpu cores": str(os.cpu_count()), "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, **gpu,
            "python": platform.python_version()}


def as_markdown(measurements: list[Measurement], rows: list[Comparison], not_measured: list[str], sizes: Sizes,
           quick: bool, env: dict[str, str]) -> str:
    def utilisation(m: Measurement) -> str:
        value = model_flops_utilisation(m, sizes.num_classes)
        return "-" if value is None else f"{value:.1%}"

    launches = max((len(m.launch_steps_s) for m in measurements), default=1)
    each_launch = ["step ms of each launch"] if launches > 1 else []
    lines = [f"# Benchmark ({'quick' if quick else 'full'} sizes)", "",
             ", ".join(f"{key}: {value}" for key, value in env.items()),
             f"global batch {sizes.batch}, {sizes.steps} timed steps after {sizes.warmup} warm-up, "
             f"{sizes.num_classes} classes, the {sizes.paper_net} and {sizes.owt_net} nets, data in memory unless "
             "named; bf16: autocast, float32 weights"
             + (f"; the matrix launched {launches} times, each measurement's median launch shown" if each_launch
                else ""), "",
             markdown_table(["measurement", "ranks x threads", "images/s median (min-max)",
                             "comm wait ms/step (after the last rank arrived)", "bytes sent/step per rank",
                             "peak MiB per rank", "TFLOP/s", "MFU", *each_launch],
                            [[m.name, f"{m.ranks} x {m.threads}", m.speed(),
                              f"{1000 * m.comm_wait_s:.1f} ({1000 * m.comm_transfer_s:.1f})",
                              " / ".join(f"{b:,.0f}" for b in m.bytes_per_rank),
                              " / ".join(f"{p:.0f}" for p in m.peak_memory_mb),
                              f"{training_tflops(m, sizes.num_classes):.3g}" if m.arch else "-", utilisation(m),
                              *([" / ".join(f"{1000 * s:,.0f}" for s in m.launch_steps_s)] if each_launch else [])]
                             for m in measurements]),
             "",
             markdown_table(["comparison", "ratio", "target", "verdict", "detail"],
                            [[c.what, f"{c.ratio:.2f}", "-" if c.target is None else f">= {c.target:g}", c.verdict,
                              c.detail] for c in rows])]
    if not_measured:
        lines += ["", "Not measured:", *(f"- {reason}" for reason in not_measured)]
    single = next((m for m in measurements if m.name == REFERENCE_STEP), None)  # None in a partial report
    if single:
        tflops = training_tflops(single, sizes.num_classes)
        lines += ["", f"`{REFERENCE_STEP}` sustains {tflops:.3f} TFLOP/s of training "
                      f"(`plan --device-tflops {tflops:.3g}`)"]
    return "\n".join(lines) + "\n"


