"""The layouts, one module each, and the registry that every command asks (train, experiment, plan, bench,
the checkpoints): adding a layout is a new module and a line in LAYOUTS. `--mode` names a layout."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.model import build_model
from alexnet_mp.strategies.base import Layout
from alexnet_mp.strategies.data_parallel import DataParallel
from alexnet_mp.strategies.fsdp import FSDP
from alexnet_mp.strategies.options import Option, label
from alexnet_mp.strategies.paper_split import PaperSplit
from alexnet_mp.strategies.pipeline import Pipeline
from alexnet_mp.strategies.single import REFERENCE_STEP, Single
from alexnet_mp.strategies.tensor_parallel import TensorParallel
from alexnet_mp.strategies.weird_trick import WeirdTrick

LAYOUTS: dict[str, type[Layout]] = {
    cls.name: cls for cls in (Single, DataParallel, PaperSplit, WeirdTrick, FSDP, Pipeline, TensorParallel)
}
REFERENCE = Single.name  # the one-device run every layout is held to, and measured against
# calibrate's measures of what a rank of a group keeps resident beyond its tensors: the reference's work on every
# rank, and the layout that gathers whole layers for a while
REPLICATED = DataParallel.name
GATHERING = FSDP.name


def layout_named(mode: str) -> type[Layout]:
    if mode not in LAYOUTS:
        raise UsageError(f"unknown --mode {mode!r}; choose one of: {', '.join(LAYOUTS)}")
    return LAYOUTS[mode]


def all_options() -> dict[str, tuple[Option, list[str]]]:
    """Every layout's own option by name, with the layouts that take it (an option two layouts share is
    declared once and imported by the second)."""
    found: dict[str, tuple[Option, list[str]]] = {}
    for mode, cls in LAYOUTS.items():
        for option in cls.options:
            found.setdefault(option.name, (option, []))[1].append(mode)
    return found


def layout_label(settings: Mapping[str, Any]) -> str:
    """A run's layout with the options it was given, from its config (`TrainConfig.to_dict`, a run's
    config.json): 'paper-split', 'pipeline (1f1b, M=4)'."""
    mode = settings["mode"]
    return label(mode, LAYOUTS[mode].options if mode in LAYOUTS else (), settings)


def check_layout(config: TrainConfig, world_size: int) -> type[Layout]:
    """The layout of `config.mode`, once it is known to run `config` on `world_size` ranks (UsageError if not)."""
    cls = layout_named(config.mode)
    known = all_options()
    for name, value in config.options.items():
        option, takers = known.get(name, (None, []))
        if option is None or option not in cls.options:
            where = f"--mode {' or '.join(takers)} only" if takers else "no layout"
            raise UsageError(f"--{name.replace('_', '-')} applies to {where}, not {cls.name}")
        if not option.accepts(value):
            raise UsageError(f"{option.flag} {value} is not {option.taken()}")
    if cls.fixed_world_size not in (None, world_size):
        others = ", ".join(mode for mode, other in LAYOUTS.items() if other.fixed_world_size is None)
        raise UsageError(f"--mode {cls.name} runs on {cls.fixed_world_size} process, not {world_size}; for "
                         f"{world_size} use one of: {others}")
    cls.check(world_size, config)
    return cls


def build(config: TrainConfig, device: torch.device, dtype: torch.dtype = torch.float32) -> Layout:
    """The whole net `config` describes, with its seed's initial weights in `dtype` (float64 in the equivalence
    tests), laid out on this rank by `config.mode`'s layout. `config.num_classes` must be known."""
    model = build_model(config.arch, config.num_classes, config.seed, config.init).to(dtype)
    return layout_named(config.mode)(model, config, device)


__all__ = ["GATHERING", "LAYOUTS", "REFERENCE", "REFERENCE_STEP", "REPLICATED", "Layout", "Option", "all_options",
           "build", "check_layout", "layout_label", "layout_named"]
