"""What every layout shares: the interface the training loop uses, and the pieces of a forward pass
that more than one layout runs (the sharded fully connected layers, the gradient all-reduce)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import ClassVar

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from alexnet_mp.errors import UsageError
from alexnet_mp.links import GradientAllReduce, Ledger, Link
from alexnet_mp.model import (
    ARCHITECTURES,
    AlexNet,
    Architecture,
    DropoutMasks,
    Piece,
    initial_state_dict,
    merge_state_dicts,
    shard_state_dict,
)
from alexnet_mp.speed import Speed, apply_speed
from alexnet_mp.world import current


@dataclass(frozen=True)
class Setup:
    """What a strategy is built from."""

    arch: str = "paper"
    num_classes: int = 1000
    seed: int = 0
    device: torch.device = torch.device("cpu")
    dtype: torch.dtype = torch.float32  # of the parameters; the equivalence tests use float64
    exchange: str | None = None  # weird-trick only
    init: str = "paper"  # model.INITS
    speed: Speed = Speed()  # how the pieces run (channels_last, compiled): never what they compute
    timeout: timedelta = timedelta(minutes=10)

    @property
    def architecture(self) -> Architecture:
        return ARCHITECTURES[self.arch]


class Strategy(ABC):
    """How the network is laid out on ranks and linked. The loop calls, each step:
    `logits = forward(images, step, global_batch)`, `loss = loss(logits, labels)`,
    `loss.backward()`, `after_backward()`, then the optimizer on `parameters()`.

    `images` holds the rows `image_rows(global_batch)` of the global batch; `labels` the rows
    `label_rows(global_batch)`. `logits` is empty on a rank that does not hold fc8: its backward starts
    from the gradients that come back over the links.
    """

    name: ClassVar[str]
    exchanges: ClassVar[tuple[str, ...]] = ()

    def __init__(self, setup: Setup) -> None:
        self.setup = setup
        here = current()
        self.rank, self.world_size = here.rank, here.size
        self.ledger = Ledger()
        self.pieces: list[tuple[Piece, AlexNet]] = []

    # -- what a layout declares --

    @classmethod
    def check(cls, world_size: int, setup: Setup) -> None:
        """Raises UsageError naming what would work if this layout cannot run as asked."""
        if setup.exchange is not None and not cls.exchanges:
            raise UsageError(f"--exchange applies to --mode weird-trick only, not {cls.name}")

    def batch_multiple(self) -> int:
        """The global batch must be a multiple of this (every rank takes an equal slice)."""
        return self.world_size

    def check_batch(self, global_batch: int) -> None:
        if global_batch % self.batch_multiple():
            raise UsageError(f"--batch-size {global_batch} does not split evenly for --mode {self.name} on "
                             f"{self.world_size} processes: use a multiple of {self.batch_multiple()}")

    @abstractmethod
    def image_rows(self, global_batch: int) -> slice:
        """Rows of the global batch whose images this rank takes."""

    @abstractmethod
    def label_rows(self, global_batch: int) -> slice:
        """Rows of the global batch whose labels this rank's loss needs (empty if it has no loss)."""

    @abstractmethod
    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        """Logits for `label_rows`, or an empty tensor on a rank without fc8."""

    def after_backward(self) -> None:
        """Finishes any gradient communication still in flight."""

    def holds_distinct_shard(self) -> bool:
        """Whether this rank's pieces are not a replica of a lower rank's (only those are checkpointed)."""
        return True

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        """The group of ranks that hold a loss over different rows (reduced for logging), and its size."""
        return None, 1

    def sum_over_replicas(self, values: Tensor) -> Tensor:
        """Sums per-rank sums (loss, correct predictions, ...) over the ranks that hold a loss."""
        group, size = self.loss_replicas()
        values = values.detach().clone()
        if size > 1:  # ranks without a loss reduce their zeros within their own group
            dist.all_reduce(values, group=group)
        return values

    def global_loss(self, loss: Tensor) -> Tensor:
        """The loss over the global batch, on the main process (for logging)."""
        return self.sum_over_replicas(loss) / self.loss_replicas()[1]

    # -- shared behaviour --

    def modules(self) -> list[AlexNet]:
        return [module for _, module in self.pieces]

    def parameters(self) -> Iterator[nn.Parameter]:
        for module in self.modules():
            yield from module.parameters()

    def train(self, mode: bool = True) -> None:
        for module in self.modules():
            module.train(mode)

    def loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Mean cross-entropy over the rows this rank holds; on a rank without fc8, a zero that
        starts its backward pass from the links."""
        if logits.numel() == 0:
            return logits.sum()
        # at least float32 for the softmax (bf16/fp16 logits under autocast), never lower than given
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels.to(logits.device))

    def dropout(self, step: int, global_batch: int, samples: slice) -> DropoutMasks:
        return DropoutMasks(self.setup.seed, step, global_batch, samples)

    def build(self, pieces: list[Piece], devices: list[torch.device]) -> None:
        """Creates this rank's pieces, each from the same seeded whole-net init sliced to the piece,
        so every layout starts from the reference's exact weights, then applies the speed-ups."""
        arch, num_classes = self.setup.architecture, self.setup.num_classes
        full = initial_state_dict(arch, num_classes, self.setup.seed, self.setup.init)
        for piece, device in zip(pieces, devices, strict=True):
            with torch.device("meta"):  # no init work: the weights come from `full`
                module = AlexNet(arch, num_classes, piece)
            module.to_empty(device=device).to(self.setup.dtype)
            module.load_state_dict(shard_state_dict(full, arch, piece))
            apply_speed(module, self.setup.speed)
            self.pieces.append((piece, module))

    def local_state(self) -> list[tuple[Piece, dict[str, Tensor]]]:
        return [(piece, module.state_dict()) for piece, module in self.pieces]

    def full_state_dict(self, pieces: list[tuple[Piece, dict[str, Tensor]]]) -> dict[str, Tensor]:
        return merge_state_dicts(pieces, self.setup.architecture, self.setup.num_classes)

    def replicate_gradients(self, params: list[nn.Parameter], group: dist.ProcessGroup | None,
                            average: bool, name: str) -> GradientAllReduce | None:
        """Gradient all-reduce over `group` for replicated parameters; None for a group of one."""
        if group is None or dist.get_world_size(group) == 1:
            return None
        return GradientAllReduce(params, group, average, self.ledger, name)


def sharded_classifier(pieces: list[AlexNet], inputs: list[Tensor], link: Link,
                       dropout: DropoutMasks) -> Tensor:
    """fc6 -> fc7 -> fc8 over FC shards: each piece computes its units of fc6 and fc7 from all of
    the previous layer (gathered by the link); fc8 reads all fc7 units on the first piece."""
    hidden = [piece.hidden(x, 0, dropout) for piece, x in zip(pieces, inputs, strict=True)]
    return classifier_after_fc6(pieces, hidden, link, dropout)


def classifier_after_fc6(pieces: list[AlexNet], hidden: list[Tensor], link: Link, dropout: DropoutMasks) -> Tensor:
    """fc7 -> fc8 over FC shards, from each piece's fc6 units (activated)."""
    hidden = link.gather(hidden, 1, "fc7-input")
    hidden = [piece.hidden(x, 1, dropout) for piece, x in zip(pieces, hidden, strict=True)]
    fc8_input = link.gather_to_first(hidden, 1, "fc8-input")
    first = pieces[0]
    return first.fc8(fc8_input) if first.fc8 is not None else fc8_input
