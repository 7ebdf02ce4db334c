"""Speed-ups that change how the net runs, never what it computes. Each one is applied to a layout's
part of the net by its own small function (as torchtitan applies each parallelism), once the layout
has sharded and placed it; `apply_speed` runs the ones a `Speed` asks for."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from alexnet_mp.model import LRN, ConvLayer


@dataclass(frozen=True)
class Speed:
    channels_last: bool = False  # conv weights (and so activations) in NHWC, the layout cuDNN's fast kernels use
    compile: bool = False  # each conv layer one torch.compile graph
    cuda_graphs: bool = False  # the compiled layers replayed as CUDA graphs (implies compile)
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

    def flags(self) -> dict[str, bool]:
        """The run's flags (TrainConfig's fields) that ask for these speed-ups."""
        return {"channels_last": self.channels_last, "compile": self.compile, "cuda_graphs": self.cuda_graphs,
                "triton_lrn": self.triton_lrn}


def apply_channels_last(model: nn.Module) -> None:
    """Conv weights in channels_last; a conv with such a weight returns channels_last maps, so every
    layer after conv1 (links included: they concatenate channels) keeps the layout."""
    model.to(memory_format=torch.channels_last)


def apply_compile(model: nn.Module, mode: str | None) -> None:
    """Each conv layer's forward (convolution, ReLU, LRN, pool) becomes one compiled graph. The links
    run as hooks around the layers' forwards, and the fully connected layers, whose dropout draws from
    seeded generators, stay eager: no collective and no generator lies inside a graph."""
    for layer in model.modules():
        if isinstance(layer, ConvLayer):
            layer.forward = torch.compile(layer.forward, mode=mode)


def apply_triton_lrn(model: nn.Module) -> None:
    """Every LRN runs `kernels.lrn`; under compile it is one opaque op in the graph (imported here, so
    that only runs which ask for it import Triton)."""
    from alexnet_mp import kernels

    for module in model.modules():
        if isinstance(module, LRN):
            module.kernel = kernels.lrn


def apply_speed(model: nn.Module, speed: Speed) -> nn.Module:
    if speed.channels_last:
        apply_channels_last(model)
    if speed.triton_lrn:
        apply_triton_lrn(model)
    if speed.compiled:
        apply_compile(model, speed.compile_mode)
    return model


COMPUTE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # per a Variant's precision


@dataclass(frozen=True)
class Variant:
    """How a training step runs: its autocast precision and the speed-ups (`Speed`)."""

    precision: str = "fp32"  # or "bf16": autocast; parameters, gradients and optimizer stay float32
    speed: Speed = Speed()

    def autocast(self, device: torch.device) -> torch.autocast:
        return torch.autocast(device.type, dtype=self.compute_dtype, enabled=self.precision != "fp32")

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the layers compute and hand on in: autocast's, or float32."""
        return COMPUTE_DTYPES[self.precision]

    def label(self) -> str:
        """What differs from the eager float32 step, e.g. "bf16 + channels_last"; empty for none."""
        return " + ".join(part for part in (self.precision if self.precision != "fp32" else "",
                                            self.speed.describe()) if part)

    def named(self, name: str) -> str:
        return f"{name}, {self.label()}" if self.label() else name

    def said(self) -> str:
        """How it runs, in words: "fp32, eager" for the plain step."""
        return self.label() or "fp32, eager"

    def calibrate_flags(self) -> str:
        """The flags of `calibrate` that time layers as it runs them, each with a space before it; none for the plain
        step."""
        return "".join(f" {flag}" for flag, on in ((f"--mixed-precision {self.precision}", self.precision != "fp32"),
                                                    ("--channels-last", self.speed.channels_last),
                                                    ("--compile", self.speed.compiled)) if on)

    def train_flags(self) -> dict[str, Any]:
        """The run's flags (TrainConfig's field names) that run a step so: what `of_run` reads back."""
        return {"mixed_precision": "no" if self.precision == "fp32" else self.precision, **self.speed.flags()}

    @classmethod
    def of_run(cls, config: Mapping[str, Any]) -> Variant:
        """How a run's step ran, from its flags (config.json's, TrainConfig's field names)."""
        precision = config.get("mixed_precision", "no")
        return cls("fp32" if precision == "no" else precision,
                   Speed(**{flag: bool(config.get(flag, False)) for flag in Speed().flags()}))


EAGER = Variant()  # float32, no speed-ups: as the equivalence tests and the CPU runs use it
FAST_GPU = Variant("bf16", Speed(channels_last=True, compile=True))  # the fastest step on a GPU that held up on one
