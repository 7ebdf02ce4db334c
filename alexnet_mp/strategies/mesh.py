"""Process groups for layouts on a grid of ranks."""

from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def grid(rows: int, cols: int, timeout: timedelta) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Ranks laid out row-major on a rows x cols grid (rank = row * cols + col). Returns this rank's
    row group and column group, each with `timeout`. Every rank creates every group, in one order."""
    rank = dist.get_rank()
    row_groups = [dist.new_group([r * cols + c for c in range(cols)], timeout=timeout) for r in range(rows)]
    col_groups = [dist.new_group([r * cols + c for r in range(rows)], timeout=timeout) for c in range(cols)]
    return row_groups[rank // cols], col_groups[rank % cols]
