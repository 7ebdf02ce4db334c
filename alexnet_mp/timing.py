"""How steps are timed and memory is read, the same way in the training loop and the benchmark:
CUDA events on a GPU (the device's own clock, read once the step's work is done), perf counters
on a CPU."""

from __future__ import annotations

import os
import resource
import time

import torch


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if device.type == "cuda" else None
        self.started = self.ended = 0.0

    def start(self) -> None:
        if self.events:
            self.events[0].record()
        self.started = time.perf_counter()

    def end(self) -> None:
        """Marks the end of what is timed: work queued after it is not counted, and the host may queue
        more before it reads `seconds`."""
        if self.events:
            self.events[1].record()
        self.ended = time.perf_counter()

    def seconds(self) -> float:
        """Seconds from `start` to `end`; on a GPU, waits for the work queued between them to finish."""
        if self.events:
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1]) / 1000
        return self.ended - self.started

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
