"""The cost model: what each layout should cost per step on hardware that is not here (more GPUs,
faster links), from the layer shapes alone. `python -m alexnet_mp plan` prints it and draws it.

Per rank and step: the bytes it sends (`cost.expected_traffic`, the count the ledger is tested
against), its training FLOPs over `device_tflops` (the throughput the device sustains on these
layers, not its datasheet peak), its communication time at `link_gbps` gigabytes per second per
direction, and its memory. The step is set by the slowest rank. Without overlap, compute and
communication add up. With overlap, the activation exchanges (conv3's and the fully connected
layers' inputs) stay on the critical path, because the next layer needs them, while the gradient
all-reduce is hidden behind the backward pass as far as the backward's compute lasts, and a conv features'
exchange sent in rounds (the weird trick's schemes b and c) travels behind the FC layers' work on the round
before. Speed-ups are against one GPU running `single` at one GPU's batch: the same global batch (strong
scaling), or with `per_gpu` the batch per GPU, as the 2014 paper scales (weak scaling).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import activation_bytes, layer_costs, memory_bytes, training_flops
from alexnet_mp.errors import UsageError
from alexnet_mp.model import ARCHITECTURES
from alexnet_mp.predict import StepPrediction, plan_parts, predict_step
from alexnet_mp.report import markdown_table, pyplot, save_figure
from alexnet_mp.speed import EAGER, Variant
from alexnet_mp.strategies import LAYOUTS, REFERENCE, layout_label
from alexnet_mp.strategies.costs import CONV_FEATURES, hidden_by_rounds

if TYPE_CHECKING:
    from alexnet_mp.hardware import Hardware

GRADIENT_LINKS = ("gradients", "conv-gradients")  # gradient reductions that overlap the backward pass
BACKWARD_SHARE = 2 / 3  # of a step's FLOPs (see cost.training_flops)


@dataclass(frozen=True)
class Prediction:
    layout: str  # the mode, with the options it was planned with: pipeline (gpipe, M=4)
    gpus: int
    batch: int  # the global batch
    bytes_per_rank: list[float]
    compute_s: float  # of the slowest rank's work in a step
    activation_bytes: float  # of the slowest rank: exchanged on the critical path
    gradient_bytes: float  # of the slowest rank: all-reduced behind the backward pass
    memory: dict[str, float]  # bytes, of the rank that needs most
    slots: float = 1.0  # the step's length over its work's: a pipeline's bubble, (M + N - 1) / M
    fc_compute_s: float = 0.0  # of the slowest rank: its FC layers' part of compute_s
    rounds: int = 0  # the conv features' exchange in rounds behind the FC layers' work; 0: at once
    round_bytes: float = 0.0  # of the slowest rank: that exchange's, both ways (in activation_bytes too)

    @property
    def busy_s(self) -> float:
        """The compute's part of a step: the slowest rank's work, stretched over the slots the schedule takes."""
        return self.compute_s * self.slots

    def comm_s(self, link_gbps: float) -> tuple[float, float]:
        """(activation exchange, gradient all-reduce) seconds at `link_gbps` GB/s."""
        rate = link_gbps * 1e9
        return self.activation_bytes / rate, self.gradient_bytes / rate

    def hidden_by_rounds_s(self, link_gbps: float) -> float:
        """The rounds' transfer hidden behind the FC layers' work (a round a rank need not receive is ignored)."""
        return hidden_by_rounds(self.rounds, self.round_bytes / (link_gbps * 1e9), self.fc_compute_s)

    def step_s(self, link_gbps: float, overlap: bool) -> float:
        activations, gradients = self.comm_s(link_gbps)
        if not overlap:
            return self.busy_s + activations + gradients
        exposed = activations - self.hidden_by_rounds_s(link_gbps)
        return self.busy_s + exposed + max(0.0, gradients - BACKWARD_SHARE * self.compute_s)

    def images_per_s(self, link_gbps: float, overlap: bool = True) -> float:
        return self.batch / self.step_s(link_gbps, overlap)


def layout_config(mode: str, arch: str, batch: int, options: Mapping[str, Any] | None = None) -> TrainConfig:
    """The run a layout is planned as: its own options as `options` gives them, the rest as each option plans
    (a pipeline's micro-batches); those at the layout's default are left unsaid, as in a run's label."""
    given = options or {}
    planned = {option: given.get(option.name, option.planned_value()) for option in LAYOUTS[mode].options}
    return TrainConfig(mode=mode, arch=arch, batch_size=batch,
                       options={option.name: value for option, value in planned.items() if value != option.default})


def layouts(gpus: int, arch: str, batch: int = 128, options: Mapping[str, Any] | None = None) -> list[str]:
    """The modes that run a global batch of `batch` on `gpus` GPUs, one part of the net on each, by the layouts'
    own checks (with the options given); on one GPU, only the layout made for one (single)."""
    return [mode for mode in _made_for(gpus) if _refusal(mode, gpus, arch, batch, options) is None]


def not_planned(gpu_counts: list[int], arch: str, batch: int, options: Mapping[str, Any] | None = None,
                per_gpu: bool = False) -> list[str]:
    """Why each layout made for a GPU count is not planned on it: its own check's line, as `train` would say it."""
    return [f"on {gpus} GPUs: {refusal}" for gpus, global_batch in _global_batches(gpu_counts, batch, per_gpu)
            for mode in _made_for(gpus) if (refusal := _refusal(mode, gpus, arch, global_batch, options)) is not None]


def _global_batches(gpu_counts: list[int], batch: int, per_gpu: bool) -> list[tuple[int, int]]:
    """(GPUs, the global batch on them) for each of `gpu_counts`: `batch`, or with `per_gpu` `batch` on each GPU."""
    return [(gpus, batch * gpus if per_gpu else batch) for gpus in gpu_counts]


def _planned_runs(gpu_counts: list[int], arch: str, batch: int, options: Mapping[str, Any] | None,
                  per_gpu: bool) -> list[tuple[int, int, str]]:
    """(GPUs, global batch, mode) of every layout that runs on each of `gpu_counts`."""
    return [(gpus, global_batch, mode) for gpus, global_batch in _global_batches(gpu_counts, batch, per_gpu)
            for mode in layouts(gpus, arch, global_batch, options)]


def _made_for(gpus: int) -> list[str]:
    """The modes that put one part of the net on each of `gpus` GPUs (on one GPU, only the one made for one)."""
    return [mode for mode, cls in LAYOUTS.items()
            if (cls.fixed_world_size == 1) == (gpus == 1) and cls.costs.parts(gpus) == gpus]


def _refusal(mode: str, gpus: int, arch: str, batch: int, options: Mapping[str, Any] | None) -> str | None:
    try:
        LAYOUTS[mode].check(gpus, layout_config(mode, arch, batch, options))
    except UsageError as refused:
        return str(refused)
    return None


def predict(mode: str, arch: str, gpus: int, batch: int, device_tflops: float, num_classes: int = 1000,
            options: Mapping[str, Any] | None = None, variant: Variant = EAGER) -> Prediction:
    """`mode`'s step on `gpus` GPUs at global batch `batch`, its links and memory as a step run as `variant` says
    holds them."""
    layout = LAYOUTS[mode]
    config = layout_config(mode, arch, batch, options)
    parts = plan_parts(mode, arch, gpus, batch, num_classes, config.options, variant)
    sent = [part.sent_bytes() for part in parts]
    architecture, rate = ARCHITECTURES[arch], device_tflops * 1e12
    compute = [training_flops(part.work, architecture, num_classes) / rate for part in parts]
    slowest = max(range(len(parts)), key=lambda rank: (compute[rank], sent[rank]))
    gradient = parts[slowest].sent_bytes(GRADIENT_LINKS)
    memory = max((memory_bytes(part.work, architecture, num_classes, variant, part.foreach_parameters, part.added)
                  for part in parts), key=lambda kinds: sum(kinds.values()))
    rounds = layout.costs.exchange_rounds(gpus, config)
    return Prediction(layout_label(config.to_dict()), gpus, batch, sent, compute[slowest], sent[slowest] - gradient,
                      gradient, memory, layout.costs.slots(gpus, config),
                      fc_compute_s=training_flops(parts[slowest].work, architecture, num_classes, "fc") / rate,
                      rounds=rounds, round_bytes=parts[slowest].sent_bytes((CONV_FEATURES.name,)) if rounds else 0.0)


def plan(gpu_counts: list[int], arch: str, batch: int, device_tflops: float, num_classes: int = 1000,
         options: Mapping[str, Any] | None = None, per_gpu: bool = False, variant: Variant = EAGER,
         ) -> list[Prediction]:
    """Every layout that runs on each GPU count: at the global batch `batch`, or with `per_gpu` at `batch` per GPU;
    each step run as `variant` says."""
    return [predict(mode, arch, gpus, global_batch, device_tflops, num_classes, options, variant)
            for gpus, global_batch, mode in _planned_runs(gpu_counts, arch, batch, options, per_gpu)]


@dataclass(frozen=True)
class Planned:
    """A layout's step on a hardware profile, walked by the cost model (predict.py)."""

    layout: str  # the mode, with the options it was planned with
    gpus: int
    batch: int  # the global batch
    step: StepPrediction

    @property
    def images_per_s(self) -> float:
        return self.batch / self.step.step_s


def plan_on(hardware: Hardware, gpu_counts: list[int], arch: str, batch: int, num_classes: int = 1000,
            options: Mapping[str, Any] | None = None, per_gpu: bool = False,
            ) -> tuple[list[Planned], list[tuple[int, str, str]]]:
    """`plan`, each step walked over `hardware`'s figures instead of one rate and one link speed; and (GPUs, layout,
    why) for each layout the profile cannot predict on a GPU count (a rank count it has no collectives for, say)."""
    planned, refused = [], []
    for gpus, global_batch, mode in _planned_runs(gpu_counts, arch, batch, options, per_gpu):
        given = layout_config(mode, arch, global_batch, options).options
        label = layout_label({"mode": mode, **given})
        try:
            step = predict_step(mode, arch, gpus, global_batch, hardware, num_classes, given)
        except UsageError as refusal:
            refused.append((gpus, label, str(refusal)))
            continue
        planned.append(Planned(label, gpus, global_batch, step))
    return planned, refused


def planned_table(planned: list[Planned]) -> str:
    header = ["mode", "ranks", "global batch", "step ms", "compute ms (busiest rank)",
              "collectives ms (most on a rank)", "images/s", "MiB sent/rank/step (max)", "memory MiB/rank (max)"]
    rows = [[p.layout, str(p.gpus), str(p.batch), f"{1000 * p.step.step_s:.2f}", f"{1000 * max(p.step.compute_s):.2f}",
             f"{1000 * max(p.step.comm_s):.2f}", f"{p.images_per_s:,.0f}",
             f"{max(p.step.bytes_per_rank) / 2**20:.1f}", f"{max(p.step.memory_bytes) / 2**20:.0f}"] for p in planned]
    return markdown_table(header, rows)


def plan_at_rate(gpu_counts: list[int], arch: str, batch: int, device_tflops: float, link_gbps: list[float],
                 num_classes: int = 1000, options: Mapping[str, Any] | None = None, per_gpu: bool = False,
                 variant: Variant = EAGER) -> tuple[str, Callable[[Path], Path]]:
    """`plan` by the first-order model, each step run as `variant` says: its text (the table at each link speed, and
    why each layout left out is), and what draws it."""
    predictions = plan(gpu_counts, arch, batch, device_tflops, num_classes, options, per_gpu, variant)
    _check_planned(predictions, batch, per_gpu, gpu_counts)
    table = plan_table(predictions, link_gbps, one_gpu(arch, batch, device_tflops, num_classes, variant))
    title = (f"Predicted per step: {arch} net, {_scaling(batch, per_gpu)}, {device_tflops:g} TFLOP/s sustained per "
             f"GPU, links and memory as a step in {variant.said()} holds them; speed-ups over one GPU at {batch} "
             "images")
    text = f"{title}\n\n{shares(arch, num_classes)}\n\n{table}\n"
    return text + _not_planned_said(not_planned(gpu_counts, arch, batch, options, per_gpu)), partial(
        plot_plan, predictions, link_gbps)


def plan_on_profile(hardware: Hardware, gpu_counts: list[int], arch: str, batch: int, num_classes: int = 1000,
                    options: Mapping[str, Any] | None = None, per_gpu: bool = False,
                    ) -> tuple[str, Callable[[Path], Path]]:
    """`plan --hardware`: its text (every layout's step on each GPU count walked over the profile, and why each
    layout left out is), and what draws it. Where the profile can predict none of them, the first reason why is
    the one line to act on."""
    planned, unpredicted = plan_on(hardware, gpu_counts, arch, batch, num_classes, options, per_gpu)
    if unpredicted and not planned:
        raise UsageError(unpredicted[0][2])
    _check_planned(planned, batch, per_gpu, gpu_counts)
    title = (f"Predicted on {hardware.name} ({hardware.provenance}), {arch} net, {_scaling(batch, per_gpu)}, as its "
             f"layers ran: {hardware.variant.said()}")
    refused = not_planned(gpu_counts, arch, batch, options, per_gpu)
    refused += [f"on {gpus} GPUs, {label}: {why}" for gpus, label, why in unpredicted]
    text = f"{title}\n\n{planned_table(planned)}\n" + _not_planned_said(refused)
    return text, partial(plot_planned, planned, f"{hardware.name}, {arch} net, {_scaling(batch, per_gpu)}")


def _scaling(batch: int, per_gpu: bool) -> str:
    return f"{batch} images per GPU" if per_gpu else f"global batch {batch}"


def _check_planned(planned: Sequence[object], batch: int, per_gpu: bool, gpu_counts: list[int]) -> None:
    if not planned:
        raise UsageError(f"no layout runs a batch of {batch}{' per GPU' if per_gpu else ''} on "
                         f"{','.join(map(str, gpu_counts))} GPUs; use counts that divide it")


def _not_planned_said(refused: list[str]) -> str:
    return "\nNot planned:\n" + "".join(f"- {line}\n" for line in refused) if refused else ""


def one_gpu(arch: str, batch: int, device_tflops: float, num_classes: int = 1000, variant: Variant = EAGER,
            ) -> Prediction:
    """What speed-ups are measured against: the reference on one GPU at one GPU's batch."""
    return predict(REFERENCE, arch, 1, batch, device_tflops, num_classes, variant=variant)


def shares(arch: str, num_classes: int = 1000) -> str:
    """The two papers' argument in one line: where the parameters are, and where the FLOPs are."""
    costs = layer_costs(ARCHITECTURES[arch], num_classes)
    conv = [c for c in costs if c.name.startswith("conv")]
    params = sum(c.parameters for c in conv) / sum(c.parameters for c in costs)
    flops = sum(c.flops for c in conv) / sum(c.flops for c in costs)
    return (f"{arch} net: the conv layers hold {params:.1%} of the parameters and do {flops:.1%} of the FLOPs; "
            f"the fully connected layers hold {1 - params:.1%} and do {1 - flops:.1%}. Data parallelism moves "
            "parameters (cheap for convs), model parallelism moves activations (cheap for the FC layers).")


def plan_table(predictions: list[Prediction], link_gbps: list[float], baseline: Prediction) -> str:
    """A row per prediction; at each link speed its step time, images/s and speed-up over `baseline`."""
    header = ["mode", "GPUs", "global batch", "MiB sent/rank/step (max)", "compute ms (x the bubble's slots)",
              "memory MiB/rank: params+grads+momentum(+gathered, +the foreach copy, +autocast's copies) / activations"]
    header += [f"step ms @ {gbps:g} GB/s: serial / overlapped (images/s, speed-up)" for gbps in link_gbps]
    rows = []
    for p in predictions:
        activations = activation_bytes(p.memory) / 2**20
        state = sum(p.memory.values()) / 2**20 - activations
        row = [p.layout, str(p.gpus), str(p.batch), f"{max(p.bytes_per_rank) / 2**20:.1f}", f"{1000 * p.busy_s:.2f}",
               f"{state:.0f} / {activations:.0f}"]
        for gbps in link_gbps:
            serial, overlapped = p.step_s(gbps, False), p.step_s(gbps, True)
            speed_up = p.images_per_s(gbps) / baseline.images_per_s(gbps)
            row.append(f"{1000 * serial:.2f} / {1000 * overlapped:.2f} ({p.images_per_s(gbps):,.0f}, {speed_up:.2f}x)")
        rows.append(row)
    return markdown_table(header, rows)


def plot_plan(predictions: list[Prediction], link_gbps: list[float], out: Path) -> Path:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(link_gbps), figsize=(4.5 * len(link_gbps), 4), sharey=True, squeeze=False)
    for axis, gbps in zip(axes[0], link_gbps, strict=True):
        for mode in dict.fromkeys(p.layout for p in predictions):
            points = [p for p in predictions if p.layout == mode]
            gpus = [p.gpus for p in points]
            line, = axis.plot(gpus, [p.images_per_s(gbps) for p in points], marker="o", label=mode)
            axis.plot(gpus, [p.images_per_s(gbps, overlap=False) for p in points], linestyle="--",
                      color=line.get_color())
        _scaling_axis(axis, f"{gbps:g} GB/s links", [p.gpus for p in predictions])
    axes[0][0].legend(title="solid: overlapped, dashed: serial", fontsize="small")
    return save_figure(figure, out)


def plot_planned(planned: list[Planned], title: str, out: Path) -> Path:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(p.layout for p in planned):
        points = [p for p in planned if p.layout == mode]
        axis.plot([p.gpus for p in points], [p.images_per_s for p in points], marker="o", label=mode)
    _scaling_axis(axis, title, [p.gpus for p in planned])
    axis.legend(fontsize="small")
    return save_figure(figure, out)


def _scaling_axis(axis: Any, title: str, gpus: list[int]) -> None:
    counts = sorted(set(gpus))
    axis.set(xscale="log", xlabel="GPUs", title=title, ylabel="predicted images/s")
    axis.set_xticks(counts, labels=map(str, counts))
    axis.minorticks_off()  # a log axis labels its minor ticks too: 3 x 10^0
