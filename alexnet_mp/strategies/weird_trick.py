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

import torch
import torch.distributed as dist
from torch import Tensor, nn

from alexnet_mp.blocks import WHOLE, Block, part_size, rows
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic
from alexnet_mp.errors import UsageError
from alexnet_mp.links import Meter, RoundExchange, metered
from alexnet_mp.model import AlexNet, Architecture, MaskDraw
from alexnet_mp.strategies.base import (
    CONV_FEATURES,
    FC_LINKS,
    Strategy,
    check_fc_units_split,
    data_parallel_convs_traffic,
    fc_traffic,
    link_inputs,
    shard_layers,
)

ALL = "all"  # scheme (a), the default
EXCHANGES = (ALL, *RoundExchange.SCHEMES)
PER_STEP, PER_ROUND = "per-step", "per-round"
FC_UPDATES = (PER_STEP, PER_ROUND)


def in_rounds(config: TrainConfig) -> bool:
    """Whether the conv features travel in rounds (schemes b and c), not in one all-gather (a)."""
    return (config.exchange or ALL) != ALL


class AllSamples(nn.Module):
    """Every rank's conv features concatenated along the batch (scheme a's exchange, and every scheme's
    evaluation), counted as the exchange's link."""

    def __init__(self, group: dist.ProcessGroup, strategy: Strategy) -> None:
        super().__init__()
        self.group, self.strategy = group, strategy

    def forward(self, features: Tensor) -> Tensor:
        with metered(self.strategy.ledger, CONV_FEATURES.name):
            return CONV_FEATURES.over(features, self.group)


class WeirdTrick(Strategy):
    name = "weird-trick"
    options = ("exchange", "fc_update")
    compared = {"exchange": EXCHANGES}

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        if config.exchange not in (None, *EXCHANGES):
            raise UsageError(f"--exchange {config.exchange} is not one of: {', '.join(EXCHANGES)}")
        if config.fc_update not in (None, *FC_UPDATES):
            raise UsageError(f"--fc-update {config.fc_update} is not one of: {', '.join(FC_UPDATES)}")
        if config.fc_update == PER_ROUND and not in_rounds(config):
            raise UsageError("--fc-update per-round needs rounds: add --exchange one-at-a-time or slice")
        if config.fc_update == PER_ROUND and config.mixed_precision == "fp16":
            raise UsageError("--fc-update per-round runs in fp32 or bf16: fp16's loss scale skips whole steps, "
                             "not rounds")
        check_fc_units_split(cls.name, world_size, config)

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        # scheme (c) sends 1/N of every rank's slice per round
        return world_size ** 2 if config.exchange == "slice" else world_size

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

    def parallelize(self, model: AlexNet) -> nn.Module:
        group = dist.group.WORLD
        column = self.place(shard_layers(model, self.shard, self.rank, self.world_size))
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
            self.rounds = RoundExchange(self.config.exchange, exchange_group, Meter(self.ledger, CONV_FEATURES.name))
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
        return self.config.fc_update == PER_ROUND

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
