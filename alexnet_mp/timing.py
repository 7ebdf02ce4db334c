"""How work is timed and memory is read, the same way in the training loop, the ledger, the trace and the
benchmark: on a GPU by CUDA events (the device's own clock, read once the work is done), on a CPU by the host's
perf counter."""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Sequence

import torch


class HostClock:
    """The host's clock: a stamp is `time.perf_counter()`. On a CPU the host runs the work as it queues it."""

    def __init__(self) -> None:
        self.offset = time.time() - time.perf_counter()

    def stamp(self) -> float:
        """A mark of now in the stream of work: what runs after it is timed from it."""
        return time.perf_counter()

    def seconds(self, start: float, end: float) -> float:
        """Seconds from `start` to `end`; none where `end` came first."""
        return max(end - start, 0.0)

    def latest(self, stamps: Sequence[float]) -> float:
        """The last of `stamps` to be reached."""
        return max(stamps)

    def wall(self, stamp: float) -> float:
        """`stamp` on the wall clock (`time.time`, one clock for every process of a host), to line ranks up."""
        return stamp + self.offset


class DeviceClock:
    """A GPU's clock: a stamp is a CUDA event recorded on the device's current stream, so a span is its time for
    the work queued between its stamps; a wait, how long that stream stalled on the collective it waited for
    (which, on NCCL, ran on a stream of its own). Reading a span waits for the device to pass its end, so the
    ledger and the trace read theirs once a step's work is queued, not as they stamp."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.origin = self.stamp()
        self.origin.synchronize()
        self.origin_wall = time.time()

    def stamp(self) -> torch.cuda.Event:
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def seconds(self, start: torch.cuda.Event, end: torch.cuda.Event) -> float:
        end.synchronize()
        return max(start.elapsed_time(end) / 1000, 0.0)

    def latest(self, stamps: Sequence[torch.cuda.Event]) -> torch.cuda.Event:
        return stamps[-1]  # recorded in the order the work completes: a process group's collectives run in turn

    def wall(self, stamp: torch.cuda.Event) -> float:
        return self.origin_wall + self.seconds(self.origin, stamp)


Clock = HostClock | DeviceClock


def clock_for(device: torch.device) -> Clock:
    return DeviceClock(device) if device.type == "cuda" else HostClock()


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.clock = clock_for(device)
        self.started = self.ended = self.clock.stamp()

    def start(self) -> None:
        self.started = self.clock.stamp()

    def end(self) -> None:
        """Marks the end of what is timed: work queued after it is not counted, and the host may queue
        more before it reads `seconds`."""
        self.ended = self.clock.stamp()

    def seconds(self) -> float:
        """Seconds from `start` to `end`; on a GPU, waits for the work queued between them to finish."""
        return self.clock.seconds(self.started, self.ended)

    def stop(self) -> float:
        """`end`, then `seconds`."""
        self.end()
        return self.seconds()


def peak_memory_mb(device: torch.device) -> float:
    """The most GPU memory allocated so far, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def memory_in_use_mb(device: torch.device) -> float:
    """The GPU memory allocated now, or on a CPU the process's resident set now: what a later peak is taken
    less of, for the memory training adds (the net, its gradients and momentum, the activations)."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/statm") as statm:
        resident_pages = int(statm.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20
