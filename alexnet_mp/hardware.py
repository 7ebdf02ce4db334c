"""What a machine costs, apart from what a layout does: a hardware profile. `calibrate` measures one (each
layer's forward and backward at the shares the layouts hold, the optimizer's step, each collective's time at the
sizes the layouts send, after compute as a step meets it); presets hold the machines people name, each figure with
its source. The cost model (predict.py) walks a layout's step over a profile.

A profile is JSON, read as untrusted input: anything malformed, or missing what a prediction needs, is one
line (UsageError) naming what to do.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import is_number
from alexnet_mp.malloc import LargeBlocks
from alexnet_mp.speed import EAGER, FAST_GPU, Speed, Variant

FORMAT = 10
# The collectives the layouts call; the `-single` forms gather into or scatter from one flat tensor (FSDP's and
# DTensor's), which gloo runs apart from the forms on lists of tensors, at a speed of their own.
KINDS = ("all-reduce", "all-gather", "all-gather-single", "reduce-scatter", "reduce-scatter-single", "gather",
         "scatter", "broadcast", "send")
KERNELS = ("fused", "foreach")  # the optimizer's: one kernel over every parameter, or one op per parameter list
FRESH_FIGURES = ("fresh_bytes", "fresh_at_once_bytes")  # a measured pass's `LargeBlocks`, as a profile names them
DEFAULT_PATH = Path("runs/hardware.json")  # where `calibrate` writes and the comparisons look, unless told


@dataclass(frozen=True)
class Collective:
    """One collective's time, as the ledger counts what it moves: latency plus the bytes a rank sends over
    bandwidth; where calibrate timed it at several sizes (`measured`), a call's time on the line through the two
    sizes nearest its own: gloo's small calls are set by their latency and its large ones by a rate that falls as
    their buffers outgrow the caches, and one line holds one end or the other."""

    latency_s: float
    bytes_per_s: float
    measured: tuple[tuple[float, float], ...] = ()  # (bytes the busiest rank sends, seconds) a call, sizes rising

    def seconds(self, sent_bytes: float) -> float:
        """A call's seconds, the busiest rank sending `sent_bytes`."""
        if not self.measured:
            return self.latency_s + sent_bytes / self.bytes_per_s
        sizes, times = ([point[i] for point in self.measured] for i in (0, 1))
        return pass_s(sizes, times, max(sent_bytes, sizes[0]))  # below the smallest size timed, latency is the time


@dataclass(frozen=True)
class ResidentOverhead:
    """What a CPU process keeps resident beyond its tensors' peak: a fixed part (the libraries' workspaces, the
    threads' stacks), a part that grows with the activations its step allocates and frees again (the free chunks its
    heap keeps between them, which the next step allocates in another order), more in a rank of a group of several
    (its collectives' own blocks and threads), and a part that grows with what it gathers for a while (FSDP's whole
    units: blocks mapped afresh and unmapped, all but the smaller ones, which keep less)."""

    fixed_bytes: float
    per_activation_byte: float
    in_group_bytes: float
    per_gathered_byte: float

    def bytes(self, activation_bytes: float, gathered_bytes: float, in_group: bool) -> float:
        return (self.fixed_bytes + self.per_activation_byte * activation_bytes
                + (self.in_group_bytes if in_group else 0.0) + self.per_gathered_byte * gathered_bytes)


@dataclass(frozen=True)
class Hardware:
    name: str
    source: str  # how its figures were obtained: a calibrate run (machine, date, versions) or the documents cited
    backend: str  # gloo (collectives block the host) or nccl (they run beside the compute)
    cores: int | None  # CPU cores the ranks share; None where each rank has a device of its own
    # per threads a rank runs: "arch.layer@share" -> "images" per timed pass, and a pass's seconds at each,
    # "forward" and "backward", its blocks found mapped already; and, where measured, "fresh_bytes" and
    # "fresh_at_once_bytes": what the pass allocates in blocks that a training process maps afresh, and the most of
    # them live at once ("forward" and "backward", at each of its images)
    layers: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    tflops: float | None = None  # where layers are not measured: the training rate a device sustains on them
    # per threads a rank runs, per optimizer kernel (`KERNELS`): a parameter's share of the SGD step
    optimizer_s_per_parameter: dict[str, dict[str, float]] = field(default_factory=dict)
    # per threads a rank runs: what a byte of a gradient costs added into the one accumulated before it; none in a
    # preset
    accumulate_s_per_byte: dict[str, float] = field(default_factory=dict)
    collectives: dict[str, dict[str, Collective]] = field(default_factory=dict)  # per rank count, per kind
    # per threads a rank runs: what a byte costs copied into a block the allocator maps afresh (the copy, and a CPU's
    # page faults and zero-filling); none where blocks are reused (CUDA's caching allocator)
    fresh_copy_s_per_byte: dict[str, float] = field(default_factory=dict)
    # per threads a rank runs: what a byte of a block mapped afresh costs beyond its writing (the page faults and
    # zero-filling alone); none where blocks are reused
    fresh_page_s_per_byte: dict[str, float] = field(default_factory=dict)
    # per threads a rank runs: what a CPU process keeps resident beyond its tensors' peak; none where memory is a
    # device's allocated tensors
    resident_overhead: dict[str, ResidentOverhead] = field(default_factory=dict)
    # per rank count: how much slower each rank computes with every rank computing at once than alone on its threads
    # (the cores, caches and memory bandwidth they share); where unmeasured, ranks over cores
    shared_slowdown: dict[str, float] = field(default_factory=dict)
    # per threads a rank runs: seconds of calibrate's probe (`calibrate.probe`: a sweep of every layer of the net it
    # measured), which `bench` runs again to see how far the machine has drifted; none in a preset
    probe_s: dict[str, float] = field(default_factory=dict)
    links_source: str = ""  # where the collectives' figures come from, where not from `source`
    variant: Variant = EAGER  # how the layers it times ran: a run in another precision or speed-up runs at other rates
    # where layers are not measured: per net, the training rate a device sustains on that net's layers, where
    # measured for it (another net's layers run at another rate on the same device); other nets at `tflops`
    net_tflops: dict[str, float] = field(default_factory=dict)

    @property
    def provenance(self) -> str:
        """Where its figures come from: its source, and its links' where they come from elsewhere."""
        return f"{self.source}; links: {self.links_source}" if self.links_source else self.source

    def check_times(self, run: Variant) -> None:
        """Refuses, in one line, to predict a step that runs as `run` where this profile's layers ran otherwise."""
        if run != self.variant:
            raise UsageError(f"the hardware profile {self.name!r} times its layers in {self.variant.said()}, not "
                             f"{run.said()} as this run: compare it with a profile of its own setting")

    def threads(self, ranks: int) -> int:
        """The threads each of `ranks` ranks runs: the cores split evenly, at least one."""
        return 1 if self.cores is None else max(1, self.cores // ranks)

    def sharing(self, ranks: int) -> float:
        """How much slower each of `ranks` ranks computes than alone because they share the machine: as calibrated,
        or else by as many times as they outnumber the cores (1 where they do not, or each has a device)."""
        if str(ranks) in self.shared_slowdown:
            return self.shared_slowdown[str(ranks)]
        return 1.0 if self.cores is None else max(1.0, ranks / self.cores)

    def layer_s(self, layer: str, share: float, ranks: int, flops: float, samples: int, passes: int = 1,
                served: Mapping[str, float] | None = None) -> tuple[float, float]:
        """Seconds of `layer` at `share` of its outputs on `samples` images in `passes` passes, forward and
        backward, on a rank of `ranks`: from the layer measured at that share (the nearest measured share,
        scaled, otherwise), a pass's time at its images interpolated between the sizes measured, and the pages of
        the blocks it maps afresh but those its process's heap serves (`served`: bytes a pass, by direction); or,
        unmeasured, from `flops` (its forward's per image; the backward's twice that) at the rate sustained on its
        net's layers."""
        measured = self._measured(layer, share, ranks)
        if measured:
            times, nearest = measured
            scale = share / nearest * self.sharing(ranks) * passes
            fresh = self.fresh_blocks(layer, share, ranks, samples, passes)
            rate = self.fresh_page_s_per_byte.get(str(self.threads(ranks)), 0.0)
            return tuple(scale * (pass_s(times["images"], times[direction], samples / passes)
                                  + rate * max(fresh[direction].allocated - (served or {}).get(direction, 0.0), 0.0))
                         for direction in ("forward", "backward"))
        if self.tflops is None:
            nets = dict.fromkeys([*(key.split(".")[0] for table in self.layers.values() for key in table),
                                  layer.split(".")[0]])
            raise UsageError(f"the hardware profile {self.name!r} has no time for {layer} at {self.threads(ranks)} "
                             f"thread(s) and no tflops: run `python -m alexnet_mp calibrate --ranks {ranks} --arch "
                             f"{','.join(nets)}{self.variant.calibrate_flags()}`")
        rate = self.net_tflops.get(layer.split(".")[0], self.tflops)
        forward = flops * samples / (rate * 1e12) * self.sharing(ranks)
        return forward, 2 * forward

    def fresh_blocks(self, layer: str, share: float, ranks: int, samples: int, passes: int = 1,
                    ) -> dict[str, LargeBlocks]:
        """By direction, the blocks a training process maps afresh that one of `passes` passes of `layer` over
        `samples` images allocates, as measured at the nearest share measured (interpolated between the sizes
        measured, as its time is); none where unmeasured."""
        measured = self._measured(layer, share, ranks)
        times = measured[0] if measured and "fresh_bytes" in measured[0] else None
        return {direction: LargeBlocks(*(pass_s(times["images"], times[figure][direction], samples / passes)
                                         for figure in FRESH_FIGURES)) if times else LargeBlocks(0.0, 0.0)
                for direction in ("forward", "backward")}

    def _measured(self, layer: str, share: float, ranks: int) -> tuple[dict[str, Any], float] | None:
        """`layer`'s passes measured at the threads a rank of `ranks` runs, at the share nearest `share`, and that
        share; None where it was not measured."""
        measured = self.layers.get(str(self.threads(ranks)), {})
        shares = {float(key.split("@")[1]): value for key, value in measured.items() if key.split("@")[0] == layer}
        if not shares:
            return None
        nearest = min(shares, key=lambda s: abs(math.log(s / share)))
        return shares[nearest], nearest

    def optimizer_s(self, fused: int, foreach: int, ranks: int) -> float:
        """Seconds of the SGD step of a rank of `ranks` that steps `fused` parameters with the fused kernel and
        `foreach` with the foreach one."""
        rates = self.optimizer_s_per_parameter.get(str(self.threads(ranks)), dict.fromkeys(KERNELS, 0.0))
        return (rates["fused"] * fused + rates["foreach"] * foreach) * self.sharing(ranks)

    def accumulate_s(self, gradient_bytes: float, ranks: int) -> float:
        """Seconds a rank of `ranks` spends adding `gradient_bytes` of gradients into those accumulated before."""
        return self._bytes_s(self.accumulate_s_per_byte, gradient_bytes, ranks)

    def fresh_copy_s(self, copied_bytes: float, ranks: int) -> float:
        """Seconds a rank of `ranks` spends copying `copied_bytes` into blocks allocated afresh."""
        return self._bytes_s(self.fresh_copy_s_per_byte, copied_bytes, ranks)

    def _bytes_s(self, rates: Mapping[str, float], nbytes: float, ranks: int) -> float:
        """Seconds of `nbytes` at the rate per byte `rates` gives a rank of `ranks`'s threads (none where absent)."""
        return nbytes * rates.get(str(self.threads(ranks)), 0.0) * self.sharing(ranks)

    def resident_bytes(self, tensor_bytes: float, activation_bytes: float, gathered_bytes: float, ranks: int,
                       mapped_later: float = 0.0) -> float:
        """The memory a process of `ranks` takes to train whose tensors peak at `tensor_bytes`, of them
        `activation_bytes` and `gathered_bytes` allocated and freed again each step (`ResidentOverhead`); on a CPU,
        with the `mapped_later` bytes of blocks it maps afresh after that peak: its heap keeps the high-water mark
        the peak left, and they map beside it."""
        overhead = self.resident_overhead.get(str(self.threads(ranks)))
        if not overhead:
            return tensor_bytes
        return tensor_bytes + overhead.bytes(activation_bytes, gathered_bytes, ranks > 1) + mapped_later

    def collective(self, kind: str, ranks: int) -> Collective:
        known = self.collectives.get(str(ranks)) or self.collectives.get("any")
        if not known or kind not in known:
            raise UsageError(f"the hardware profile {self.name!r} has no {kind} over {ranks} ranks: run `python -m "
                             f"alexnet_mp calibrate --ranks {ranks}{self.variant.calibrate_flags()}`, or give a "
                             "profile that has it (`plan --links PRESET` lends a preset's)")
        return known[kind]

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}


def pass_s(images: list[float], seconds: list[float], at: float) -> float:
    """A pass's seconds at `at` images, from its seconds at each of `images` (ascending): on the line through the
    two measured sizes nearest it (beyond either end, the end's two), and no less than the smallest size's time
    scaled down by images."""
    right = min(max(bisect.bisect_left(images, at), 1), len(images) - 1)
    (x0, x1), (y0, y1) = images[right - 1:right + 1], seconds[right - 1:right + 1]
    return max(y0 + (y1 - y0) * (at - x0) / (x1 - x0), seconds[0] * min(at / images[0], 1.0))


# Each figure with its source. NVLink 4 (H100 SXM): 900 GB/s per GPU both ways, 450 one way (NVIDIA's H100
# datasheet); nccl-tests' measured bus bandwidth on 8 H100s is about 360-370 GB/s, used here, with NCCL's
# small-message latency of about 15 us (nccl-tests, NVIDIA's DGX H100 reports). The compute rates: each net's fastest
# one-GPU step measured here, in TFLOP/s of training (docs/results/2026-11-23-benchmark-gpu-h100.md): the paper net's
# 69.4, the owt net's 146 (the same FLOPs to 1% in half the time: no LRN, no grouped convs). A100 SXM: NVLink 3,
# 600 GB/s both ways; about 230 GB/s bus bandwidth in nccl-tests; compute at the H100's rates scaled by the bf16 dense
# peaks (312 against 989 TFLOP/s, NVIDIA's datasheets). PCIe 4 x16: 32 GB/s one way, about 22 GB/s reached by NCCL
# through the host.
H100_TFLOPS = {"paper": 69.4, "owt": 146.0}


def _preset(name: str, source: str, links_source: str, scale: float, bus_gb_s: float, latency_s: float) -> Hardware:
    """A preset whose layers run at the H100's rates times `scale`; other nets than those measured at the paper
    net's."""
    link = Collective(latency_s, bus_gb_s * 1e9)
    rates = {net: scale * tflops for net, tflops in H100_TFLOPS.items()}
    return Hardware(name, source, "nccl", None, tflops=rates["paper"], collectives={"any": dict.fromkeys(KINDS, link)},
                    links_source=links_source, variant=FAST_GPU, net_tflops=rates)  # the step the rates are of


# A preset times each net's layers at one rate, whatever their kind and images a pass; the source says so, since
# another pass size runs at another rate on the same GPU.
NET_RATES = ("each net's layers at one rate, the net's own step on one H100 in bf16, compiled, at 256 images "
             "(docs/results/2026-11-23-benchmark-gpu-h100.md: the paper net's 69.4 TFLOP/s, the owt net's 146; other "
             "nets at the paper net's)")

PRESETS = {
    "h100-nvlink": _preset("h100-nvlink", f"one H100 SXM node over NVLink 4: {NET_RATES}",
                           "nccl-tests' bus bandwidth on NVLink 4, 360 GB/s, and 15 us", 1.0, 360.0, 15e-6),
    "a100-nvlink": _preset("a100-nvlink", f"one A100 SXM node over NVLink 3: {NET_RATES}, x 312/989 (the "
                           "datasheets' bf16 peaks)", "nccl-tests' bus bandwidth on NVLink 3, 230 GB/s, and 15 us",
                           312 / 989, 230.0, 15e-6),
    "h100-pcie": _preset("h100-pcie", f"H100s on PCIe 4 x16 through the host: {NET_RATES}",
                         "NCCL through the host on PCIe 4 x16, 22 GB/s, and 30 us", 1.0, 22.0, 30e-6),
}


def load(name_or_path: str | Path) -> Hardware:
    """A preset by name, or a profile file (`calibrate`'s), checked."""
    if str(name_or_path) in PRESETS:
        return PRESETS[str(name_or_path)]
    path = Path(name_or_path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no hardware profile at {path}: run `python -m alexnet_mp calibrate --output {path}`, or "
                         f"name a preset ({', '.join(PRESETS)})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is not a hardware profile ({error}): run `python -m alexnet_mp calibrate` "
                         "again") from None
    try:
        return _parsed(raw)
    except (AttributeError, KeyError, TypeError, ValueError) as error:  # AttributeError: a list where a table goes
        raise UsageError(f"{path} is not a hardware profile this program reads ({error}): run `python -m "
                         "alexnet_mp calibrate` again") from None


def with_links(device: Hardware, links: Hardware) -> Hardware:
    """`device`'s compute and memory, joined by `links`' collectives: a machine calibrated on one GPU, planned on
    several over links it does not have."""
    if not links.collectives:
        raise UsageError(f"the hardware profile {links.name!r} has no collectives to lend: name a preset "
                         f"({', '.join(PRESETS)}), or a profile calibrated with --ranks 2 or more")
    return replace(device, name=f"{device.name}, {links.name}'s links", backend=links.backend,
                   collectives=links.collectives, links_source=f"{links.name}'s, {links.links_source or links.source}")


def _positive(value: Any, what: str) -> float:
    if not (is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{what} must be a positive number, not {value!r}")
    return float(value)


def _not_negative(value: Any, what: str, unit: str) -> float:
    """A figure that may be 0: a number of `unit`, finite and not negative."""
    if not (is_number(value) and 0 <= value < math.inf):
        raise ValueError(f"{what} must be a number of {unit}, not {value!r}")
    return float(value)


def _layer_times(times: Any, where: str) -> dict[str, Any]:
    """A layer's measured passes: sizes that rise, at least two, and a time for each, forward and backward; and,
    where given, the bytes each maps afresh and the most of them live at once, forward and backward."""
    images = [_positive(n, f"{where}.images") for n in times["images"]]
    if len(images) < 2 or images != sorted(set(images)):
        raise ValueError(f"{where}.images must be two or more sizes that rise, not {times['images']!r}")
    found: dict[str, Any] = {"images": images}
    for direction in ("forward", "backward"):
        found[direction] = _per_pass(times[direction], len(images), f"{where}.{direction}", _positive)
    for figure in FRESH_FIGURES if "fresh_bytes" in times else ():
        found[figure] = {direction: _per_pass(times[figure][direction], len(images), f"{where}.{figure}.{direction}",
                                              lambda value, what: _not_negative(value, what, "bytes"))
                         for direction in ("forward", "backward")}
    return found


def _per_pass(values: Any, passes: int, where: str, check: Callable[[Any, str], float]) -> list[float]:
    """A figure for each of a layer's `passes` measured sizes, each checked."""
    found = [check(value, where) for value in values]
    if len(found) != passes:
        raise ValueError(f"{where} must have a figure for each of its images")
    return found


def _parsed_collective(link: Any, kind: str) -> Collective:
    """A collective's latency and bandwidth, and where given, its time at each size measured: two or more sizes
    that rise."""
    measured = tuple((_positive(sent, f"{kind} measured bytes"), _positive(seconds, f"{kind} measured seconds"))
                     for sent, seconds in link.get("measured", ()))
    if measured and (len(measured) < 2 or [sent for sent, _ in measured] != sorted({sent for sent, _ in measured})):
        raise ValueError(f"{kind} measured must be two or more sizes that rise, not {link['measured']!r}")
    return Collective(_positive(link["latency_s"], f"{kind} latency_s"),
                      _positive(link["bytes_per_s"], f"{kind} bytes_per_s"), measured)


def _parsed_variant(raw: Any) -> Variant:
    """How the layers were timed: fp32 or bf16, and each of `Speed`'s flags on or off (absent: the plain step)."""
    if raw is None:
        return EAGER
    if raw["precision"] not in ("fp32", "bf16"):
        raise ValueError(f"variant.precision must be fp32 or bf16, not {raw['precision']!r}")
    flags = {flag: raw["speed"].get(flag, False) for flag in Speed().flags()}
    if not all(isinstance(on, bool) for on in flags.values()):
        raise ValueError(f"variant.speed's flags must be true or false, not {raw['speed']!r}")
    return Variant(raw["precision"], Speed(**flags))


def _parsed(raw: Any) -> Hardware:
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise ValueError(f"format must be {FORMAT}")
    if raw["backend"] not in ("gloo", "nccl"):
        raise ValueError(f"backend must be gloo or nccl, not {raw['backend']!r}")
    cores = raw.get("cores")
    layers = {str(threads): {str(key): _layer_times(times, f"layers.{threads}.{key}") for key, times in table.items()}
              for threads, table in raw.get("layers", {}).items()}
    collectives = {str(ranks): {kind: _parsed_collective(link, kind) for kind, link in kinds.items() if kind in KINDS}
                   for ranks, kinds in raw.get("collectives", {}).items()}
    tflops = raw.get("tflops")
    accumulation, fresh, pages = ({str(threads): _not_negative(value, figure, "seconds")
                                   for threads, value in raw.get(figure, {}).items()}
                                  for figure in ("accumulate_s_per_byte", "fresh_copy_s_per_byte",
                                                 "fresh_page_s_per_byte"))
    resident = {str(threads): ResidentOverhead(*(_not_negative(line[figure.name], f"resident_overhead {figure.name}",
                                                               "bytes") for figure in fields(ResidentOverhead)))
                for threads, line in raw.get("resident_overhead", {}).items()}
    slowdown = {str(ranks): _positive(value, "shared_slowdown")
                for ranks, value in raw.get("shared_slowdown", {}).items()}
    probed = {str(threads): _positive(value, "probe_s") for threads, value in raw.get("probe_s", {}).items()}
    if not layers and tflops is None:
        raise ValueError("it has neither layer times nor tflops")
    net_tflops = {str(net): _positive(value, f"net_tflops.{net}") for net, value in raw.get("net_tflops", {}).items()}
    return Hardware(str(raw["name"]), str(raw["source"]), raw["backend"],
                    None if cores is None else int(_positive(cores, "cores")), layers,
                    None if tflops is None else _positive(tflops, "tflops"),
                    {str(t): {kernel: _positive(rates[kernel], f"optimizer_s_per_parameter.{t}.{kernel}")
                              for kernel in KERNELS} for t, rates in raw.get("optimizer_s_per_parameter", {}).items()},
                    accumulation, collectives, fresh, pages, resident, slowdown, probed,
                    str(raw.get("links_source", "")), _parsed_variant(raw.get("variant")), net_tflops)
