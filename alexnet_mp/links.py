"""The communication links between the parts of a layout, and the ledger that counts them.

Each link is a small autograd Function of (tensor, dim, group) whose name says its forward and its
backward (after Megatron-LM's tensor_parallel/mappings.py); tests/test_links.py proves each backward
against autograd on one device. Plain `dist.*` calls inside a forward pass pass no gradient back.
Hand-written rather than torch's: `_functional_collectives.all_gather_tensor_autograd` has the
all-gather's backward but is private and has no gather to one rank; nothing in torch exchanges a
batch in rounds for layers that work round by round (the weird trick's schemes b and c); and every
collective here is counted. Parts held by one process (the one-process paper split) exchange by `torch.cat` and `.to()`,
whose autograd backward sums and splits exactly as the collectives' do.

Counting is not a parameter of the links: a layout names a link and its ledger with `metered`, and
the collectives inside count into it, forward at once and backward whenever autograd runs it.
Convention: the elements and bytes each part *sends*, as if point to point: an all-gather of n
elements over N parts sends n(N-1); its reduce-scatter sends the same; a gather to the first part
sends n from every other part; its scatter sends n(N-1) from the first part; a ring all-reduce of n
elements sends 2n(N-1)/N (a fraction, hence float counts).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function
from torch.utils._python_dispatch import TorchDispatchMode

FORWARD, BACKWARD = "forward", "backward"


@dataclass
class Ledger:
    """Elements and bytes sent, per (part, link, direction), and seconds spent blocked waiting for
    communication, per (link, direction), since the last `reset`. The wait is measured without barriers:
    a synchronous collective counts whole, an asynchronous one only for the time `wait()` blocks, so an
    exchange hidden behind computation shows as less wait.

    A wait includes the time until the slowest peer reaches the collective, which is imbalance, not
    communication. To tell them apart, `arrivals` holds the wall-clock time (`time.time`, one clock for
    every process of a host) at which this process first reached each (link, direction) since the
    reset: entering a synchronous collective, or launching an asynchronous one. The benchmark compares
    them between ranks."""

    elements: dict[tuple[int, str, str], float] = field(default_factory=lambda: defaultdict(float))
    bytes: dict[tuple[int, str, str], float] = field(default_factory=lambda: defaultdict(float))
    blocked: dict[tuple[str, str], float] = field(default_factory=lambda: defaultdict(float))  # seconds
    arrivals: dict[tuple[str, str], float] = field(default_factory=dict)  # time.time()

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
        started = time.perf_counter()
        try:
            yield
        finally:
            self.blocked[link, direction] += time.perf_counter() - started

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
        self.blocked.clear()
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


def _meter() -> Meter:
    """The meter the caller named, or one into a ledger nobody reads (a link used outside `metered`)."""
    return _METER.get() or Meter(Ledger(), "unnamed")


def _group_size(group: dist.ProcessGroup) -> int:
    return dist.get_world_size(group)


def _group_rank(group: dist.ProcessGroup) -> int:
    return dist.get_rank(group)


class AllGatherForwardReduceScatterBackward(Function):
    """Forward: every rank gets all ranks' tensors concatenated along `dim`.
    Backward: every rank computed a gradient for the whole concatenation; the true gradient of
    its own part is the sum over ranks of that part, i.e. a reduce-scatter."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group, ctx.meter = dim, group, _meter()
        size = _group_size(group)
        # collectives take dense row-major tensors: channels_last maps are copied (conv3's input is
        # the only 4-D link), and conv3's channels_last weight restores the layout
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        with ctx.meter.waiting(FORWARD):
            dist.all_gather(parts, x, group=group)
        ctx.meter.sent(FORWARD, x.numel() * (size - 1), x.element_size())
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        size = _group_size(ctx.group)
        chunks = [chunk.contiguous() for chunk in grad.chunk(size, ctx.dim)]
        mine = torch.empty_like(chunks[0])
        with ctx.meter.waiting(BACKWARD):
            dist.reduce_scatter(mine, chunks, group=ctx.group)
        ctx.meter.sent(BACKWARD, mine.numel() * (size - 1), mine.element_size())
        return mine, None, None


class GatherToFirstForwardScatterBackward(Function):
    """Forward: the group's first rank gets all ranks' tensors concatenated along `dim`; the others get
    an empty tensor (their backward starts from it). Backward: the first rank sends every rank the
    gradient of its part."""

    @staticmethod
    def forward(ctx, x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
        ctx.dim, ctx.group, ctx.meter = dim, group, _meter()
        ctx.shape, first = x.shape, _group_rank(group) == 0
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(_group_size(group))] if first else None
        with ctx.meter.waiting(FORWARD):
            dist.gather(x, parts, dst=dist.get_global_rank(group, 0), group=group)
        if first:
            return torch.cat(parts, dim)
        ctx.meter.sent(FORWARD, x.numel(), x.element_size())
        return x.new_empty(0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        size, first = _group_size(ctx.group), _group_rank(ctx.group) == 0
        mine = grad.new_empty(ctx.shape)
        chunks = [chunk.contiguous() for chunk in grad.chunk(size, ctx.dim)] if first else None
        with ctx.meter.waiting(BACKWARD):
            dist.scatter(mine, chunks, src=dist.get_global_rank(ctx.group, 0), group=ctx.group)
        if first:
            ctx.meter.sent(BACKWARD, mine.numel() * (size - 1), mine.element_size())
        return mine, None, None


def all_gather(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return AllGatherForwardReduceScatterBackward.apply(x, dim, group)


def gather_to_first(x: Tensor, dim: int, group: dist.ProcessGroup) -> Tensor:
    return GatherToFirstForwardScatterBackward.apply(x, dim, group)


def _count_local(meter: Meter, sender: int, x: Tensor, receivers: int, backward_sender: int) -> None:
    """What a part held in this process would send: forward now, backward when x's gradient is computed."""
    count = x.numel() * receivers
    meter.sent(FORWARD, count, x.element_size(), part=sender)
    if x.requires_grad:
        x.register_hook(lambda grad: meter.sent(BACKWARD, count, grad.element_size(), part=backward_sender))


def all_gather_among(parts: list[Tensor], dim: int) -> list[Tensor]:
    """`all_gather` among parts one process holds: each gets every part's tensor, on its own device."""
    meter = _meter()
    for part, x in enumerate(parts):
        _count_local(meter, part, x, len(parts) - 1, part)
    return [torch.cat([p.to(x.device) for p in parts], dim) for x in parts]


def gather_to_first_among(parts: list[Tensor], dim: int) -> list[Tensor]:
    """`gather_to_first` among parts one process holds: the first gets every part's tensor; the others send
    theirs and get an empty tensor, and the first part sends each its gradient back."""
    meter = _meter()
    for part, x in enumerate(parts[1:], start=1):
        _count_local(meter, part, x, 1, 0)
    return [torch.cat([p.to(parts[0].device) for p in parts], dim), *(x.new_empty(0) for x in parts[1:])]


@dataclass(frozen=True)
class Link:
    """Where a layout's parts exchange a tensor: at the input of `layer`, along `dim`. Every part gets every
    part's tensor (an all-gather) or, `to_first`, the first part alone (a gather: fc8's input, where fc8 and
    the loss live on the first part)."""

    layer: str
    dim: int
    to_first: bool = False

    @property
    def name(self) -> str:
        return f"{self.layer}-input"

    def over(self, x: Tensor, group: dist.ProcessGroup) -> Tensor:
        """Across the ranks of `group`, one part each."""
        return (gather_to_first if self.to_first else all_gather)(x, self.dim, group)

    def among(self, parts: list[Tensor]) -> list[Tensor]:
        """Among parts held by this process."""
        return (gather_to_first_among if self.to_first else all_gather_among)(parts, self.dim)


def ring_all_reduce_elements(count: int, size: int) -> float:
    """Elements each rank sends in a ring all-reduce of `count` elements over `size` ranks."""
    return 2 * (size - 1) * count / size


class MeteredAllReduce:
    """The state of `all_reduce_hook`, DistributedDataParallel's communication hook here: each bucket of
    replicated gradients is averaged over the group (each rank's loss is the mean over its own samples) or
    summed (each rank's loss term is already its part of the global mean: the weird trick's conv column),
    all-reduced asynchronously as DDP's default hook does, and counted in a ledger as `link`: the elements a
    ring all-reduce sends, the moment the first bucket leaves (the link's arrival), and as the time blocked,
    how long the last bucket's reduction outlasted the backward pass that produced it. DDP waits for the
    reductions inside backward, where no caller can time the wait itself; `settle` records it after."""

    def __init__(self, group: dist.ProcessGroup, average: bool, ledger: Ledger, link: str) -> None:
        self.group, self.average, self.ledger, self.link = group, average, ledger, link
        self.size = dist.get_world_size(group)
        self.last_ready = self.last_done = 0.0

    def reduce(self, buffer: Tensor) -> torch.futures.Future[Tensor]:
        if self.average:
            buffer.div_(self.size)
        self.ledger.arrive(self.link, BACKWARD)
        self.ledger.record(0, self.link, BACKWARD, ring_all_reduce_elements(buffer.numel(), self.size),
                           buffer.element_size())
        self.last_ready = time.perf_counter()
        return dist.all_reduce(buffer, group=self.group, async_op=True).get_future().then(self._done)

    def _done(self, future: torch.futures.Future[list[Tensor]]) -> Tensor:
        self.last_done = max(self.last_done, time.perf_counter())
        return future.value()[0]

    def settle(self) -> None:
        """After a backward pass: the time it was blocked on its last reduction, into the ledger."""
        self.ledger.blocked[self.link, BACKWARD] += max(0.0, self.last_done - self.last_ready)
        self.last_ready = self.last_done = 0.0


def all_reduce_hook(state, bucket):  # unannotated: DDP compares annotations it finds with its own types
    """DistributedDataParallel's communication hook: `MeteredAllReduce.reduce` of the bucket's flat buffer."""
    return state.reduce(bucket.buffer())


_FUNCTIONAL = torch.ops._c10d_functional
_KINDS = {_FUNCTIONAL.all_gather_into_tensor: "all-gather", _FUNCTIONAL.reduce_scatter_tensor: "reduce-scatter",
          _FUNCTIONAL.all_reduce: "all-reduce"}


class FunctionalCollectives(TorchDispatchMode):
    """While on, counts into a ledger the functional collectives issued (DTensor's redistributions go through
    them), each under the link the layout names for its kind ("all-gather", "reduce-scatter", "all-reduce")
    and in `direction`, over a group of `size` ranks: elements sent as the links count them. A functional
    collective returns at once; the time its `wait_tensor` blocks is the time waited. Like torch's
    CommDebugMode, which counts the same ops but not what they move."""

    def __init__(self, ledger: Ledger, links: dict[str, str], size: int) -> None:
        super().__init__()
        self.ledger, self.links, self.size = ledger, links, size
        self.direction = FORWARD
        self.in_flight: list[str] = []

    def sent(self, kind: str, tensor: Tensor) -> float:
        """Elements this rank sends in a collective of `kind` whose input is `tensor`."""
        if kind == "all-reduce":
            return ring_all_reduce_elements(tensor.numel(), self.size)
        shard = tensor.numel() if kind == "all-gather" else tensor.numel() // self.size
        return shard * (self.size - 1)

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        packet = func._overloadpacket
        if packet is _FUNCTIONAL.wait_tensor:
            with self.ledger.waiting(self.in_flight.pop(0) if self.in_flight else "unnamed", self.direction):
                return func(*args, **(kwargs or {}))
        if packet in _KINDS:
            kind, tensor = _KINDS[packet], args[0]
            link = self.links[kind]
            self.ledger.arrive(link, self.direction)
            self.ledger.record(0, link, self.direction, self.sent(kind, tensor), tensor.element_size())
            self.in_flight.append(link)
        return func(*args, **(kwargs or {}))


def round_rows(scheme: str, j: int, size: int, global_batch: int) -> Tensor:
    """The rows of the global batch that round j of `RoundExchange` carries over `size` ranks, in the order it
    carries them (ranks own consecutive slices of the batch, rank 0's first)."""
    slice_size = global_batch // size
    if scheme == "one-at-a-time":
        return torch.arange(j * slice_size, (j + 1) * slice_size)
    part = slice_size // size
    return torch.cat([torch.arange(r * slice_size + j * part, r * slice_size + (j + 1) * part) for r in range(size)])


class RoundExchange:
    """The weird trick's exchange of conv features in rounds (Krizhevsky 2014, schemes b and c), for a layout
    that runs its fully connected layers, forward and backward, on one round at a time while the next travels.

    Round j's features reach every rank: in scheme "one-at-a-time" rank j's whole batch slice (a broadcast
    from rank j), in scheme "slice" the j-th 1/N of every rank's slice (an all-gather). `launch` starts every
    round's collective at once, asynchronously; `receive(j)` waits for round j alone. `send_back(j, grad)`
    returns round j's input gradient to its rows' owners asynchronously (a reduce to rank j, or a
    reduce-scatter), and `gradient` waits for them all. Give it a process group of its own: on NCCL a group is
    one stream, and the FC layers' collectives would otherwise queue behind the rounds still in flight.
    Counted into `meter` (link and ledger) as the elements each rank sends."""

    SCHEMES = ("one-at-a-time", "slice")

    def __init__(self, scheme: str, group: dist.ProcessGroup, meter: Meter) -> None:
        self.scheme, self.group, self.meter = scheme, group, meter
        self.size, self.rank = _group_size(group), _group_rank(group)
        self.forward_work: list[tuple[Tensor, dist.Work]] = []
        self.backward_work: list[tuple[int, Tensor, dist.Work]] = []

    def rows(self, j: int, global_batch: int) -> Tensor:
        return round_rows(self.scheme, j, self.size, global_batch)

    def _is_own(self, j: int) -> bool:
        """Whether round j carries this rank's own features, which it sends and never receives."""
        return self.scheme == "one-at-a-time" and j == self.rank

    def launch(self, features: Tensor) -> None:
        features = features.contiguous()
        self.meter.arrive(FORWARD)
        for j in range(self.size):
            if self.scheme == "one-at-a-time":
                buffer = features if self._is_own(j) else torch.empty_like(features)
                work = dist.broadcast(buffer, src=dist.get_global_rank(self.group, j), group=self.group, async_op=True)
            else:
                mine = features.chunk(self.size)[j].contiguous()
                buffer = torch.empty((self.size * mine.shape[0], *mine.shape[1:]), dtype=mine.dtype, device=mine.device)
                work = dist.all_gather(list(buffer.chunk(self.size)), mine, group=self.group, async_op=True)
            self.forward_work.append((buffer, work))
        self.meter.sent(FORWARD, features.numel() * (self.size - 1), features.element_size())

    def arrived(self, j: int) -> bool:
        """Whether round j is here (this rank's own always is)."""
        return self._is_own(j) or self.forward_work[j][1].is_completed()

    def receive(self, j: int) -> Tensor:
        """Round j's features, once here (this rank's own at once)."""
        buffer, work = self.forward_work[j]
        if not self._is_own(j):
            with self.meter.waiting(FORWARD):
                work.wait()
        return buffer

    def send_back(self, j: int, grad: Tensor) -> None:
        grad = grad.contiguous()
        self.meter.arrive(BACKWARD)
        if self.scheme == "one-at-a-time":
            work = dist.reduce(grad, dst=dist.get_global_rank(self.group, j), group=self.group, async_op=True)
            mine, sent = grad, 0 if j == self.rank else grad.numel()
        else:
            chunks = list(grad.chunk(self.size))
            mine = torch.empty_like(chunks[0])
            work = dist.reduce_scatter(mine, chunks, group=self.group, async_op=True)
            sent = mine.numel() * (self.size - 1)
        self.meter.sent(BACKWARD, sent, grad.element_size())
        self.backward_work.append((j, mine, work))

    def gradient(self, shape: torch.Size) -> Tensor:
        """The gradient of this rank's features, once every round's has come back; every collective done."""
        for _, work in self.forward_work:  # in scheme (b), this rank's own broadcast may still be sending
            with self.meter.waiting(FORWARD):
                work.wait()
        self.forward_work.clear()
        received = {}
        for j, mine, work in self.backward_work:
            with self.meter.waiting(BACKWARD):
                work.wait()
            received[j] = mine
        self.backward_work.clear()
        if self.scheme == "one-at-a-time":
            return received[self.rank]
        return torch.cat([received[j] for j in range(self.size)]).view(shape)
