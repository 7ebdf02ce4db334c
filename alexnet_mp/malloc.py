"""glibc's malloc in a process that trains on a CPU: which of its blocks are fresh pages, held to one rule.

By default glibc maps a block above its mmap threshold afresh at each allocation (the kernel faults its pages in and
zero-fills them) and unmaps it when it is freed, unless a free chunk of its heap fits it; the threshold starts at 128
KiB and rises to each larger such block freed, up to 32 MiB, and the heap's free top goes back to the kernel once it
outgrows twice the threshold. Which of a step's blocks are fresh pages then depends on what the process freed
before it. A training process holds the threshold where it would end and never trims its heap (`steady_malloc`):
a block of 32 MiB and up (`mapped_afresh`) is fresh pages unless the heap's free room fits it, which the cost model
walks a step to find (`cost.heap_served_bytes`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_MMAP_MAX = -1, -3, -4  # mallopt's parameters (malloc.h)
FRESH_BLOCK_BYTES = 32 * 2**20  # the highest mmap threshold glibc takes on a 64-bit machine
NEVER_TRIMMED = 2**31 - 1  # the most mallopt's int takes: the heap's free memory is never given back


def mapped_afresh(block_bytes: float) -> bool:
    """Whether a training process on a CPU maps a block of `block_bytes` afresh each time it allocates it where no
    free chunk of its heap fits it."""
    return block_bytes >= FRESH_BLOCK_BYTES


@dataclass(frozen=True)
class LargeBlocks:
    """The blocks of `FRESH_BLOCK_BYTES` and up that a pass allocates: their bytes in all, and the most of those
    bytes live at once (freed within the pass, they may reuse one another's memory)."""

    allocated: float
    at_once: float


def _mallopt() -> Callable[[int, int], int] | None:
    """glibc's mallopt; None where the C library is another's (its allocator is its own)."""
    try:
        return ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None


def steady_malloc() -> None:
    """This process maps afresh each block of `FRESH_BLOCK_BYTES` and up that no free chunk of its heap fits, and
    unmaps it when freed, and serves every smaller block from a heap it never gives back: glibc's rule with its
    threshold where the process's frees would take it, fixed from the start (setting it stops glibc moving it). A
    step is no slower for the blocks a default process maps afresh before its threshold has risen, or faults in
    again after a trim."""
    mallopt = _mallopt()
    if mallopt:
        mallopt(M_MMAP_THRESHOLD, FRESH_BLOCK_BYTES)
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIMMED)


def reuse_freed_memory() -> None:
    """This process serves every block from what it freed, mapping none afresh (no mmap, no trimming): a pass timed
    here finds its blocks' pages mapped already, so its time is the same from one sweep to the next, and calibrate
    adds what the blocks a training process maps afresh cost (`mapped_afresh`) on their own."""
    mallopt = _mallopt()
    if mallopt:
        mallopt(M_MMAP_MAX, 0)
        mallopt(M_TRIM_THRESHOLD, NEVER_TRIMMED)


def in_reused_memory(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) once this process reuses the memory it frees (`reuse_freed_memory`): for a process of its own."""
    reuse_freed_memory()
    return fn(*args)
