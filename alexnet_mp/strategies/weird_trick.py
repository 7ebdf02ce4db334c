"""weird-trick: the layout of Krizhevsky 2014, "One weird trick for parallelizing convolutional
neural networks". The conv column is data parallel (replicated, each rank its own slice of the
batch, gradients summed); fc6 and fc7 are model parallel (rank r holds 1/N of their units) and see
every rank's samples; fc8 lives whole on rank 0 with the loss over the global batch, as in
cuda-convnet2's layers-imagenet-4gpu-data-model.cfg.

--exchange all            (scheme a) one all-gather of every rank's conv features;
--exchange one-at-a-time  (scheme b) rank j's features in round j; fc6 runs on each round as it
                          arrives, a rank's own round first, so the transfers overlap fc6's work;
--exchange slice          (scheme c) the j-th 1/N of every rank's features in round j, then as (b).
In (b) and (c) fc7 and fc8 then run once over the whole global batch, as in (a).
"""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor

from alexnet_mp.errors import UsageError
from alexnet_mp.links import ProcessLink, RoundExchange
from alexnet_mp.model import Piece, rows
from alexnet_mp.strategies.base import Setup, Strategy, classifier_after_fc6, sharded_classifier

EXCHANGES = ("all", *RoundExchange.SCHEMES)


class WeirdTrick(Strategy):
    name = "weird-trick"
    exchanges = EXCHANGES

    @classmethod
    def check(cls, world_size: int, setup: Setup) -> None:
        super().check(world_size, setup)
        if setup.exchange not in (None, *EXCHANGES):
            raise UsageError(f"--exchange {setup.exchange} is not one of: {', '.join(EXCHANGES)}")
        if world_size < 2:
            raise UsageError("--mode weird-trick needs 2 or more processes; use --mode single for one")
        widths = setup.architecture.fc_units
        if any(width % world_size for width in widths):
            working = [n for n in (1, 2, 4, 8, 16, 32) if all(w % n == 0 for w in widths)]
            raise UsageError(f"--mode weird-trick splits fc6/fc7 ({widths[0]} units) into equal shards: "
                             f"{world_size} ranks do not divide them; use one of {working}")

    def __init__(self, setup: Setup) -> None:
        super().__init__(setup)
        self.exchange = setup.exchange or "all"
        self.build([Piece(None, (self.rank, self.world_size))], [setup.device])
        (column,) = self.modules()
        group = dist.group.WORLD
        self.link = ProcessLink(group, self.ledger)
        self.rounds = RoundExchange(self.exchange, group, self.ledger) if self.exchange != "all" else None
        conv_params = [p for name, p in column.named_parameters() if not name.startswith("fc")]
        # Each rank's gradient is already its part of the global-mean loss's: sum, don't average.
        self.sync = self.replicate_gradients(conv_params, group, average=False, name="conv-gradients")

    def batch_multiple(self) -> int:
        # scheme (c) sends 1/N of every rank's slice per round
        return self.world_size ** 2 if self.exchange == "slice" else self.world_size

    def image_rows(self, global_batch: int) -> slice:
        return rows(global_batch, self.rank, self.world_size)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch) if self.rank == 0 else slice(0, 0)

    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        (column,) = self.modules()
        features = column.features(images)
        dropout = self.dropout(step, global_batch, slice(None))
        if self.rounds is None:
            gathered = self.link.gather([features], 0, "fc6-input")
            return sharded_classifier([column], gathered, self.link, dropout)
        fc6 = column.activate(self.rounds.linear(features, column.fc6), 0, dropout)
        return classifier_after_fc6([column], [fc6], self.link, dropout)

    def after_backward(self) -> None:
        if self.sync is not None:
            self.sync.wait()
