"""How steps are timed and memory is read, the same way in the training loop and the benchmark:
CUDA events on a GPU (the device's own clock, read once the step's work is done), perf counters
on a CPU."""

from __future__ import annotations

import resource
import time

import torch


class StepClock:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) \
            if device.type == "cuda" else None
        self.started = 0.0

    def start(self) -> None:
        if self.events:
            self.events[0].record()
        self.started = time.perf_counter()

    def stop(self) -> float:
        """Seconds since `start`; on a GPU, waits for the work queued in between to finish."""
        if self.events:
            self.events[1].record()
            self.events[1].synchronize()
            return self.events[0].elapsed_time(self.events[1]) / 1000
        return time.perf_counter() - self.started


def peak_memory_mb(device: torch.device) -> float:
    """The most GPU memory allocated so far, or on a CPU the process's peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
