"""Speed-ups that change how a piece of the net runs, never what it computes. Each one is applied to a
built piece by its own small function (as torchtitan applies each parallelism), after the strategy has
loaded the piece's weights; `apply_speed` runs the ones a `Speed` asks for."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from alexnet_mp.model import LRN, AlexNet


@dataclass(frozen=True)
class Speed:
    channels_last: bool = False  # conv weights (and so activations) in NHWC, the layout cuDNN's fast kernels use
    compile: bool = False  # each conv stage between two links one torch.compile graph
    cuda_graphs: bool = False  # the compiled stages replayed as CUDA graphs (implies compile)
    triton_lrn: bool = False  # LRN as hand-written Triton kernels (kernels.py) instead of torch ops

    @property
    def compiled(self) -> bool:
        return self.compile or self.cuda_graphs

    @property
    def compile_mode(self) -> str | None:
        return "reduce-overhead" if self.cuda_graphs else None

    def describe(self) -> str:
        """The speed-ups on, joined by " + "; empty for none."""
        return " + ".join(name for name, on in (("channels_last", self.channels_last), ("compile", self.compiled),
                                                ("cuda graphs", self.cuda_graphs), ("triton LRN", self.triton_lrn))
                          if on)


def apply_channels_last(piece: AlexNet) -> None:
    """Conv weights in channels_last; a conv with such a weight returns channels_last maps, so every
    layer after conv1 (links included: they concatenate channels) keeps the layout."""
    piece.to(memory_format=torch.channels_last)


def apply_compile(piece: AlexNet, mode: str | None) -> None:
    """Each conv stage (`run_convs`: the layers between two links) becomes one compiled graph. The
    links and the fully connected layers, whose dropout draws from seeded generators, stay eager, so no
    collective and no generator lies inside a graph: the links are the graphs' boundaries."""
    piece.run_convs = torch.compile(piece.run_convs, mode=mode)


def apply_triton_lrn(piece: AlexNet) -> None:
    """Every LRN runs `kernels.lrn`; under compile it is one opaque op in the graph (imported here, so
    that only runs which ask for it import Triton)."""
    from alexnet_mp import kernels

    for module in piece.modules():
        if isinstance(module, LRN):
            module.kernel = kernels.lrn


def apply_speed(piece: AlexNet, speed: Speed) -> None:
    if speed.channels_last:
        apply_channels_last(piece)
    if speed.triton_lrn:
        apply_triton_lrn(piece)
    if speed.compiled:
        apply_compile(piece, speed.compile_mode)


@dataclass(frozen=True)
class Variant:
    """How a training step runs: its autocast precision and the speed-ups (`Speed`)."""

    precision: str = "fp32"  # or "bf16": autocast; parameters, gradients and optimizer stay float32
    speed: Speed = Speed()

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def label(self) -> str:
        """What differs from the eager float32 step, e.g. "bf16 + channels_last"; empty for none."""
        return " + ".join(part for part in (self.precision if self.precision != "fp32" else "",
                                            self.speed.describe()) if part)

    def named(self, name: str) -> str:
        return f"{name}, {self.label()}" if self.label() else name


EAGER = Variant()  # float32, no speed-ups: as the equivalence tests and the CPU runs use it
