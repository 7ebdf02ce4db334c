"""One module per layout; adding one is a new module and a line in STRATEGIES."""

from __future__ import annotations

from alexnet_mp.errors import UsageError
from alexnet_mp.strategies.base import Setup, Strategy
from alexnet_mp.strategies.data_parallel import DataParallel
from alexnet_mp.strategies.paper_split import PaperSplit
from alexnet_mp.strategies.single import Single
from alexnet_mp.strategies.weird_trick import WeirdTrick

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls for cls in (Single, DataParallel, PaperSplit, WeirdTrick)
}


def check(mode: str, world_size: int, setup: Setup) -> type[Strategy]:
    """The layout `mode`, once it is known to run on `world_size` ranks as `setup` asks (UsageError if not)."""
    if mode not in STRATEGIES:
        raise UsageError(f"unknown --mode {mode!r}; choose one of: {', '.join(STRATEGIES)}")
    STRATEGIES[mode].check(world_size, setup)
    return STRATEGIES[mode]


def create(mode: str, setup: Setup, world_size: int) -> Strategy:
    """The strategy for `mode`, after checking it can run on `world_size` ranks as `setup` asks."""
    return check(mode, world_size, setup)(setup)


__all__ = ["STRATEGIES", "Setup", "Strategy", "check", "create"]
