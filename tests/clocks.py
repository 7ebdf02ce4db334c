"""A clock for tests of what reads one: stamps that, like a GPU's events, are read only once the device has run."""

from __future__ import annotations


class DeferredClock:
    """A clock whose stamps, like a GPU's events, can be read only once the work before them is done (`done`)."""

    def __init__(self) -> None:
        self.now, self.done = 0.0, False

    def stamp(self) -> float:
        self.now += 1.0
        return self.now

    def seconds(self, start: float, end: float) -> float:
        assert self.done, "a stamp was read before the device reached it"
        return max(end - start, 0.0)

    def latest(self, stamps: list[float]) -> float:
        return stamps[-1]

    def wall(self, stamp: float) -> float:
        return 1000.0 + stamp

