"""single: the reference. The whole net on one device in one process."""

from __future__ import annotations

from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.strategies.data_parallel import DataParallel


class Single(DataParallel):
    """data-parallel on one rank is exactly the reference; this mode only refuses more ranks."""

    name = "single"
    fixed_world_size = 1

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if world_size != 1:
            raise UsageError(f"--mode single runs on 1 process, not {world_size}; "
                             "for several use --mode data-parallel, paper-split or weird-trick")
