"""single: the reference. The whole net on one device in one process."""

from __future__ import annotations

from alexnet_mp.strategies.data_parallel import DataParallel


class Single(DataParallel):
    """data-parallel on one rank is exactly the reference; this mode runs on that one rank only."""

    name = "single"
    fixed_world_size = 1


REFERENCE_STEP = f"{Single.name}, paper"  # the benchmark's measurement of the reference's step
