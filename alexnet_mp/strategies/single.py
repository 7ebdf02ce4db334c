"""single: the reference. The whole net on one device in one process."""

from __future__ import annotations

from alexnet_mp.errors import UsageError
from alexnet_mp.strategies.base import Setup
from alexnet_mp.strategies.data_parallel import DataParallel


class Single(DataParallel):
    """data-parallel on one rank is exactly the reference; this mode only refuses more ranks."""

    name = "single"

    @classmethod
    def check(cls, world_size: int, setup: Setup) -> None:
        super().check(world_size, setup)
        if world_size != 1:
            raise UsageError(f"--mode single runs on 1 process, not {world_size}; "
                             "for several use --mode data-parallel, paper-split or weird-trick")
