"""The layouts, one module each, and the registry that every command asks (train, experiment, plan, bench,
the checkpoints): adding a layout is a new module and a line in STRATEGIES."""

from __future__ import annotations

import torch

from alexnet_mp.config import LAYOUT_OPTIONS, TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.model import build_model
from alexnet_mp.strategies.base import Strategy
from alexnet_mp.strategies.data_parallel import DataParallel
from alexnet_mp.strategies.fsdp import FSDP
from alexnet_mp.strategies.paper_split import PaperSplit
from alexnet_mp.strategies.pipeline import Pipeline
from alexnet_mp.strategies.single import Single
from alexnet_mp.strategies.tensor_parallel import TensorParallel
from alexnet_mp.strategies.weird_trick import WeirdTrick

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Single, DataParallel, PaperSplit, WeirdTrick, FSDP, Pipeline, TensorParallel)
}


def layout(mode: str) -> type[Strategy]:
    if mode not in STRATEGIES:
        raise UsageError(f"unknown --mode {mode!r}; choose one of: {', '.join(STRATEGIES)}")
    return STRATEGIES[mode]


def check_layout(config: TrainConfig, world_size: int) -> type[Strategy]:
    """The layout of `config.mode`, once it is known to run `config` on `world_size` ranks (UsageError if not)."""
    cls = layout(config.mode)
    for option in LAYOUT_OPTIONS:
        if getattr(config, option) is not None and option not in cls.options:
            takers = " or ".join(name for name, other in STRATEGIES.items() if option in other.options)
            raise UsageError(f"--{option.replace('_', '-')} applies to --mode {takers} only, not {cls.name}")
    cls.check(world_size, config)
    return cls


def build(config: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> Strategy:
    """The whole net `config` describes, with its seed's initial weights in `dtype` (float64 in the equivalence
    tests), laid out on this rank by `config.mode`'s layout. `config.num_classes` must be known."""
    model = build_model(config.arch, config.num_classes, config.seed, config.init).to(dtype)
    return layout(config.mode)(model, config, device)


__all__ = ["STRATEGIES", "Strategy", "build", "check_layout", "layout"]
