"""The ledger: what each part of a layout sends, per link and direction, and how long it waited.

Counting is not a parameter of the links: a layout names a link and its ledger with `metered`, and the
collectives inside count into it, forward at once and backward whenever autograd runs it.
Convention: the elements and bytes each part *sends*, as if point to point: an all-gather of n
elements over N parts sends n(N-1); its reduce-scatter sends the same; a gather to the first part
sends n from every other part; its scatter sends n(N-1) from the first part; a ring all-reduce of n
elements sends 2n(N-1)/N (a fraction, hence float counts).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from alexnet_mp.timing import Clock, HostClock

FORWARD, BACKWARD = "forward", "backward"


@dataclass
class Ledger:
    """Elements and bytes sent, per (part, link, direction), and seconds spent blocked waiting for
    communication, per (link, direction), since the last `reset`. The wait is measured without barriers:
    a synchronous collective counts whole, an asynchronous one only for the time `wait()` blocks, so an
    exchange hidden behind computation shows as less wait. On a GPU the clock is the device's (`DeviceClock`):
    a wait is how long the stream that waits stalled, which is what blocking means there.

    A wait includes the time until the slowest peer reaches the collective, which is imbalance, not
    communication. To tell them apart, `arrivals` holds the wall-clock time (`time.time`, one clock for
    every process of a host) at which this process first reached each (link, direction) since the
    reset: entering a synchronous collective, or launching an asynchronous one. The benchmark compares
    them between ranks."""

    elements: dict[tuple[int, str, str], float] = field(default_factory=lambda: defaultdict(float))
    bytes: dict[tuple[int, str, str], float] = field(default_factory=lambda: defaultdict(float))
    arrivals: dict[tuple[str, str], float] = field(default_factory=dict)  # time.time()
    # what times the waits: the host's perf counter, or on a GPU CUDA events on the stream that waits
    clock: Clock = field(default_factory=HostClock)
    # told of every wait as it ends: (link, direction, start, end) in the clock's stamps; the trace's (trace.py)
    observer: Callable[[str, str, Any, Any], None] | None = None
    _blocked: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # seconds
    _unread: list[tuple[str, str, Any, Any]] = field(default_factory=list)  # waits stamped, not yet read

    @property
    def blocked(self) -> dict[tuple[str, str], float]:
        """Seconds blocked per (link, direction). The waits are read here, not as they end: on a GPU, reading one
        waits for the device to reach it."""
        for link, direction, started, ended in self._unread:
            self._blocked[link, direction] += self.clock.seconds(started, ended)
        self._unread.clear()
        return self._blocked

    @property
    def waits(self) -> dict[str, float]:
        """Seconds blocked per link, both directions."""
        out: dict[str, float] = defaultdict(float)
        for (link, _), seconds in self.blocked.items():
            out[link] += seconds
        return dict(out)

    @property
    def wait_s(self) -> float:
        return sum(self.blocked.values())

    def timings(self) -> dict[str, dict[tuple[str, str], float]]:
        """A copy of the seconds blocked and the first arrivals, per (link, direction), to compare
        between ranks."""
        return {"blocked": dict(self.blocked), "arrivals": dict(self.arrivals)}

    def arrive(self, link: str, direction: str) -> None:
        self.arrivals.setdefault((link, direction), time.time())

    @contextmanager
    def waiting(self, link: str, direction: str) -> Iterator[None]:
        self.arrive(link, direction)
        started = self.clock.stamp()
        try:
            yield
        finally:
            self.waited(link, direction, started, self.clock.stamp())

    def waited(self, link: str, direction: str, started: Any, ended: Any) -> None:
        """Blocked on `link` from `started` to `ended` (the clock's stamps), which `observer` also sees."""
        self._unread.append((link, direction, started, ended))
        if self.observer is not None:
            self.observer(link, direction, started, ended)

    def record(self, part: int, link: str, direction: str, count: float, element_size: int) -> None:
        self.elements[part, link, direction] += count
        self.bytes[part, link, direction] += count * element_size

    def sent(self, part: int | None = None) -> dict[tuple[str, str], float]:
        """Elements sent per (link, direction), by one part or by all parts this process holds."""
        out: dict[tuple[str, str], float] = defaultdict(float)
        for (who, link, direction), count in self.elements.items():
            if part is None or who == part:
                out[link, direction] += count
        return dict(out)

    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def reset(self) -> None:
        self.elements.clear()
        self.bytes.clear()
        self._blocked.clear()
        self._unread.clear()
        self.arrivals.clear()


@dataclass(frozen=True)
class Meter:
    """Where a link counts: a ledger, the link's name, and the part of this process that sends."""

    ledger: Ledger
    link: str
    part: int = 0

    def sent(self, direction: str, elements: float, element_size: int, part: int | None = None) -> None:
        self.ledger.record(self.part if part is None else part, self.link, direction, elements, element_size)

    def waiting(self, direction: str) -> contextmanager:
        return self.ledger.waiting(self.link, direction)

    def arrive(self, direction: str) -> None:
        self.ledger.arrive(self.link, direction)


_METER: ContextVar[Meter | None] = ContextVar("alexnet_mp_meter", default=None)


@contextmanager
def metered(ledger: Ledger, link: str, part: int = 0) -> Iterator[None]:
    """The links used within count into `ledger` as `link`: their forward now, their backward (which autograd runs
    later, outside this context) into the same place."""
    token = _METER.set(Meter(ledger, link, part))
    try:
        yield
    finally:
        _METER.reset(token)


def current_meter() -> Meter:
    """The meter the caller named with `metered`. A link used outside one is refused: what it sends would be
    counted nowhere, and the ledger's tests would pass on a count that misses it."""
    meter = _METER.get()
    if meter is None:
        raise RuntimeError("a link was used outside `metered(ledger, link)`: name the ledger and link it counts into")
    return meter


def ring_all_reduce_elements(count: int, size: int) -> float:
    """Elements each rank sends in a ring all-reduce of `count` elements over `size` ranks."""
    return 2 * (size - 1) * count / size
