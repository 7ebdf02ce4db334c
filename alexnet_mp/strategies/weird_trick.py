"""weird-trick: the layout of Krizhevsky 2014, "One weird trick for parallelizing convolutional
neural networks". The conv layers are data parallel (replicated, each rank its own slice of the batch,
gradients summed); fc6 and fc7 are model parallel (rank r holds 1/N of their units) and see every
rank's samples; fc8 lives whole on rank 0 with the loss, as in cuda-convnet2's
layers-imagenet-4gpu-data-model.cfg.

--exchange all            (scheme a) one all-gather of every rank's conv features; the FC layers run once
                          over the global batch;
--exchange one-at-a-time  (scheme b) round j carries rank j's features to every rank, and all the FC layers
                          and the loss run forward and backward on it while the next round travels; each
                          round's feature gradient goes back to its owner while the next round computes;
--exchange slice          (scheme c) round j carries the j-th 1/N of every rank's features, then as (b).
--fc-update per-step      (default) the FC layers' gradients add up over the rounds and every layer takes one
                          SGD step: the one-device net's mathematics;
--fc-update per-round     (b, c) the FC layers take an SGD step after each round, on that round's mean loss:
                          the paper's variable batch size (convs B, FC layers B/N), not the one-device net's.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic
from alexnet_mp.errors import UsageError
from alexnet_mp.ledger import BACKWARD, FORWARD, Meter, metered
from alexnet_mp.model import AlexNet, Architecture, MaskDraw
from alexnet_mp.strategies.base import Claim, Layout, bytes_on_rank_0, check_fc_units_split, link_inputs, shard_layers
from alexnet_mp.strategies.costs import CONV_FEATURES, FC_LINKS, Costs, data_parallel_convs_traffic, fc_traffic
from alexnet_mp.strategies.data_parallel import DataParallel
from alexnet_mp.strategies.options import Option

ALL = "all"  # scheme (a), the default
ROUND_SCHEMES = ("one-at-a-time", "slice")  # (b) and (c): `RoundExchange`
PER_STEP, PER_ROUND = "per-step", "per-round"
EXCHANGE = Option("exchange", "all (scheme a), one-at-a-time (b), slice (c)", ALL,
                  choices=(ALL, *ROUND_SCHEMES), compared=(ALL, *ROUND_SCHEMES))
FC_UPDATE = Option("fc_update", "with (b) or (c): per-step (default: one SGD step of every layer, the one-device "
                                "net's), or per-round (the FC layers step after every round, on batches of B/N: the "
                                "2014 paper's variable batch size)", PER_STEP, choices=(PER_STEP, PER_ROUND),
                   label="FC {}")


def in_rounds(config: TrainConfig) -> bool:
    """Whether the conv features travel in rounds (schemes b and c), not in one all-gather (a)."""
    return EXCHANGE.value(config.options) != ALL


def hidden(per_link: str) -> Callable[[Any, Any], float]:
    """The share of scheme (a)'s time on the conv features' link (a measurement's `per_link` seconds) that a
    scheme in rounds no longer spends."""
    def share(rounds: Any, a: Any) -> float:
        theirs = getattr(a, per_link).get(CONV_FEATURES.name, 0.0)
        return 1 - getattr(rounds, per_link).get(CONV_FEATURES.name, 0.0) / theirs if theirs else 0.0

    return share


def transfer_detail(rounds: Any, a: Any) -> str:
    moving, moving_a = (m.link_transfer_s.get(CONV_FEATURES.name, 0.0) for m in (rounds, a))
    return f"{CONV_FEATURES.name} blocked after the last rank arrived {1000 * moving:.1f} vs {1000 * moving_a:.1f} ms"


def wait_detail(rounds: Any, a: Any) -> str:
    wait, wait_a = (m.link_wait_s.get(CONV_FEATURES.name, 0.0) for m in (rounds, a))
    return (f"{CONV_FEATURES.name} blocked {1000 * wait:.1f} vs {1000 * wait_a:.1f} ms; all links "
            f"{1000 * rounds.comm_wait_s:.1f} vs {1000 * a.comm_wait_s:.1f} ms")


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

    SCHEMES = ROUND_SCHEMES

    def __init__(self, scheme: str, group: dist.ProcessGroup, meter: Meter) -> None:
        self.scheme, self.group, self.meter = scheme, group, meter
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
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


class AllSamples(nn.Module):
    """Every rank's conv features concatenated along the batch (scheme a's exchange, and every scheme's
    evaluation), counted as the exchange's link."""

    def __init__(self, group: dist.ProcessGroup, layout: Layout) -> None:
        super().__init__()
        self.group, self.layout = group, layout

    def forward(self, features: Tensor) -> Tensor:
        with metered(self.layout.ledger, CONV_FEATURES.name):
            return CONV_FEATURES.over(features, self.group)


class WeirdTrickCosts(Costs):
    @classmethod
    def passes(cls, layer: str, world_size: int, config: TrainConfig) -> int:
        """In schemes (b) and (c) the FC layers run round by round."""
        return cls.exchange_rounds(world_size, config) or 1 if layer.startswith("fc") else 1

    @classmethod
    def exchange_rounds(cls, world_size: int, config: TrainConfig) -> int:
        return world_size if in_rounds(config) else 0

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        layer = key.split(".")[0]
        if layer == "fc8":
            return WHOLE if part == 0 else None
        if layer in ("fc6", "fc7"):
            return (rows(shape[0], part, parts),)
        return WHOLE

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return part_size(batch, parts), batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        """Every exchange scheme moves the same elements, only in a different order: the FC layers' links
        carry the global batch's rows once a step, whether at once or round by round."""
        traffic = data_parallel_convs_traffic(cls, arch, part, parts, batch, num_classes)
        fc_traffic(traffic, arch, part, parts, batch)
        return traffic


class WeirdTrick(Layout):
    name = "weird-trick"
    options = (EXCHANGE, FC_UPDATE)
    costs = WeirdTrickCosts

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        per_round = FC_UPDATE.value(config.options) == PER_ROUND
        if per_round and not in_rounds(config):
            raise UsageError("--fc-update per-round needs rounds: add --exchange one-at-a-time or slice")
        if per_round and config.mixed_precision == "fp16":
            raise UsageError("--fc-update per-round runs in fp32 or bf16: fp16's loss scale skips whole steps, "
                             "not rounds")
        check_fc_units_split(cls.name, world_size, config)

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        # scheme (c) sends 1/N of every rank's slice per round
        return world_size ** 2 if EXCHANGE.value(config.options) == "slice" else world_size

    @classmethod
    def claims(cls, ranks: int) -> list[Claim]:
        """Scheme (a) against data-parallel; and how much of the conv features' exchange schemes (b) and (c) hide
        behind the FC layers' work on the rounds before, against (a), on that link alone (the FC layers' own
        gathers move the same in every scheme): of the transfer, the target's measure, and of the whole wait,
        which also holds the time spent waiting for a slower rank to finish its convs (imbalance)."""
        if ranks == 1:
            return []
        a = cls.run_name(ranks, {EXCHANGE.name: ALL})
        claims = [Claim(f"weird-trick (a) vs data-parallel at {ranks} ranks", a, DataParallel.run_name(ranks),
                        detail=bytes_on_rank_0)]
        for scheme, letter, target in (("one-at-a-time", "b", 0.5), ("slice", "c", None)):
            what = f"weird-trick ({letter}) vs (a) at {ranks} ranks"
            rounds = cls.run_name(ranks, {EXCHANGE.name: scheme})
            claims += [Claim(f"{what}: exchange transfer hidden", rounds, a, target, transfer_detail,
                             hidden("link_transfer_s")),
                       Claim(f"{what}: exchange wait hidden, slower ranks included", rounds, a, None, wait_detail,
                             hidden("link_wait_s"))]
        return claims

    def parallelize(self, model: AlexNet) -> nn.Module:
        group = dist.group.WORLD
        column = self.place(shard_layers(model, self.costs.shard, self.rank, self.world_size))
        link_inputs(column, FC_LINKS, group, self.ledger)
        self.parts_held = [(self.rank, column)]
        names = list(column._modules)
        convs, self.head = (nn.Sequential(OrderedDict((name, column.get_submodule(name)) for name in chosen))
                            for chosen in (names[:names.index("fc6")], names[names.index("fc6"):]))
        # The conv column is replicated; each rank's gradient is already its part of the global-mean loss's:
        # sum, don't average.
        self.convs = self.replicate(convs, group, average=False, link="conv-gradients")
        self.rounds = None
        if in_rounds(self.config):  # a group of its own, for the rounds in flight (RoundExchange)
            exchange_group = dist.new_group(list(range(self.world_size)), timeout=self.timeout)
            self.rounds = RoundExchange(EXCHANGE.value(self.config.options), exchange_group,
                                        Meter(self.ledger, CONV_FEATURES.name))
        self.above_fc6 = self.head[1:]  # what the rounds run on fc6's output
        return nn.Sequential(OrderedDict(convs=self.convs, exchange=AllSamples(group, self), head=self.head))

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.rank == 0 else slice(0, 0)

    def dropout_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)  # the FC layers see every rank's samples

    @property
    def per_round(self) -> bool:
        return FC_UPDATE.value(self.config.options) == PER_ROUND

    def learning_rates(self) -> dict[Tensor, float]:
        """Per round, the FC layers' updates average over a round's samples, B/N: their rate is scaled for
        that batch (`--lr-scaling`), the convs' for the global one (docs/reproduction.md)."""
        if not self.per_round:
            return {}
        rate = self.config.lr_for(self.config.batch_size // self.world_size)
        return {param: rate for param in self.head.parameters()}

    def forward_backward(self, images: Tensor, labels: Tensor, step: int, global_batch: int,
                         loss_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                         ) -> tuple[Tensor, Tensor]:
        """Schemes (b) and (c): the convs forward on this rank's slice; then round by round, every rank runs
        the FC layers and the loss forward and backward on the round's rows (the next round travelling
        meanwhile) and sends the round's feature gradient back to its owners; last, the convs' backward. With
        --fc-update per-round, `optimizer` steps the FC layers after every round but the last, whose update
        is the step's own (the convs have no gradient yet, so only the FC layers move)."""
        if self.rounds is None:
            return super().forward_backward(images, labels, step, global_batch, loss_scale, optimizer)
        features = self.convs(images)
        self.rounds.launch(features.detach())
        logits, losses = [], []
        # a round's loss: its part of the global mean, or per round the round's own mean (the FC layers'
        # batch), whose feature gradient is then scaled back to the global mean's
        divisor = global_batch // self.world_size if self.per_round else global_batch
        ahead: dict[int, tuple[Tensor, Tensor]] = {}
        for j in range(self.world_size):
            if not self.per_round:
                self.work_ahead(j, ahead)
            round_rows = self.rounds.rows(j, global_batch)
            received, fc6_out = ahead.pop(j) if j in ahead else self.fc6_on(j)
            self.draw_masks(MaskDraw(self.config.seed, step, global_batch, round_rows.to(self.device)))
            out = self.above_fc6(fc6_out)
            round_loss = self.loss(out, labels[round_rows.to(labels.device)] if out.numel() else labels, "sum")
            (round_loss * (loss_scale / divisor)).backward()
            self.rounds.send_back(j, received.grad * (divisor / global_batch))
            if self.per_round and j < self.world_size - 1 and optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            logits.append(out.detach())
            losses.append(round_loss.detach())
        features.backward(self.rounds.gradient(features.shape))
        self.finish_backward()
        return self.in_row_order(logits, global_batch), torch.stack(losses).sum() / global_batch

    def work_ahead(self, j: int, ahead: dict[int, tuple[Tensor, Tensor]]) -> None:
        """While round j travels, fc6 (which needs no collective) on the later rounds already here: in (b) this
        rank's own at once. Not per round, where a round's fc6 must wait for the updates of the rounds before."""
        while j not in ahead and not self.rounds.arrived(j):
            later = next((k for k in range(j + 1, self.world_size) if k not in ahead and self.rounds.arrived(k)), None)
            if later is None:
                return
            ahead[later] = self.fc6_on(later)

    def fc6_on(self, j: int) -> tuple[Tensor, Tensor]:
        """Round j's features, once here, as a leaf whose gradient is the round's to send back; and fc6's output."""
        received = self.rounds.receive(j).detach().requires_grad_()
        return received, self.head.fc6(received)

    def in_row_order(self, logits: list[Tensor], global_batch: int) -> Tensor:
        """The rounds' logits (empty on a rank without fc8) as the global batch's rows."""
        if logits[0].numel() == 0:
            return logits[0]
        order = torch.cat([self.rounds.rows(j, global_batch) for j in range(self.world_size)])
        ordered = torch.empty_like(torch.cat(logits))
        ordered[order.to(ordered.device)] = torch.cat(logits)
        return ordered
