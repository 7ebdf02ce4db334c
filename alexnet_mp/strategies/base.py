"""What a layout is and runs, and what more than one layout does to the net.

A layout answers, as class methods that need no process group, what every command asks of it: its
options, which world sizes and batches it runs (`check`), and what the benchmark judges it by (`claims`);
what it costs is its `costs` (strategies/costs.py).

On a rank, a layout is built around the whole net: its `parallelize` places, shards, links and wraps
the net, and the training loop enters the result through `forward`, never a layer of it.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, nullcontext
from datetime import timedelta
from typing import Any, ClassVar, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from alexnet_mp.blocks import Block
from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.ledger import BACKWARD, FORWARD, Ledger, metered
from alexnet_mp.links import Link
from alexnet_mp.model import ARCHITECTURES, AlexNet, MaskDraw, SeededDropout
from alexnet_mp.speed import apply_speed
from alexnet_mp.strategies.costs import Costs
from alexnet_mp.strategies.options import Option, label
from alexnet_mp.strategies.replicas import MeteredAllReduce, all_reduce_hook
from alexnet_mp.timing import clock_for
from alexnet_mp.world import current

Shard = Callable[[str, torch.Size, int, int], Block | None]  # (key, whole shape, part, parts) -> block



class Claim(NamedTuple):
    """A ratio the benchmark holds a layout to: of two of its measurements, by name (`Layout.run_name`), their
    images/s unless `ratio` says how; against `target` where one is set. `ratio` and `detail` are given the two
    measurements (bench.measure.Measurement)."""

    what: str
    ours: str
    theirs: str
    target: float | None = None
    detail: Callable[[Any, Any], str] | None = None
    ratio: Callable[[Any, Any], float] | None = None


class Layout(ABC):
    """A layout of the net on ranks. Each step the loop calls `forward_backward(images, labels, step,
    global_batch)` with the rows `image_rows` and `label_rows` of the global batch (by default `forward`,
    `loss`, its backward and `finish_backward`), then the optimizer on `parameters()`; evaluation calls
    `forward`. `logits` is empty on a rank without fc8: its backward starts from the gradients that come
    back over the links."""

    name: ClassVar[str]
    options: ClassVar[tuple[Option, ...]] = ()  # its own settings (TrainConfig.options), declared in its module
    fixed_world_size: ClassVar[int | None] = None  # the one world size it runs on, if only one
    costs: ClassVar[type[Costs]]  # what it holds, sees, sends and computes per step: its module's Costs

    # -- what every command asks, before any process group --

    @classmethod
    def compared(cls) -> list[dict[str, Any]]:
        """The settings of its options a comparison of layouts runs: every combination of the values each
        option's `compared` names (one run with none given, where it names none)."""
        varied = [option for option in cls.options if option.compared]
        return [dict(zip((option.name for option in varied), values, strict=True))
                for values in itertools.product(*(option.compared for option in varied))]

    @classmethod
    def run_name(cls, ranks: int, options: Mapping[str, Any] | None = None) -> str:
        """The name of its measurement on `ranks` ranks with `options` given: 'weird-trick (slice) x4'."""
        return label(cls.name, cls.options, options or {}) + (", 1 process" if ranks == 1 else f" x{ranks}")

    @classmethod
    def claims(cls, ranks: int) -> list[Claim]:
        """What the benchmark compares its measurements on `ranks` ranks with (1: parts held by one process)."""
        return []

    @classmethod
    def check(cls, world_size: int, config: TrainConfig) -> None:
        """Refuses in one line, naming what would work, a run this layout cannot make: raises UsageError."""
        cls.check_world(world_size, config)
        multiple = cls.batch_multiple(world_size, config)
        if config.batch_size % multiple:
            raise UsageError(f"--batch-size {config.batch_size} does not split evenly for --mode {cls.name} on "
                             f"{world_size} processes: use a multiple of {multiple}")

    @classmethod
    def check_world(cls, world_size: int, config: TrainConfig) -> None:
        """Refuses a world size, an architecture or an option's value this layout cannot run."""

    @classmethod
    def batch_multiple(cls, world_size: int, config: TrainConfig) -> int:
        """The global batch must be a multiple of this (every rank takes an equal slice)."""
        return world_size

    # -- on a rank --

    def __init__(self, model: AlexNet, config: TrainConfig, device: torch.device) -> None:
        """Lays `model` (the whole net, with its initial weights) out on this rank: `parallelize`."""
        here = current()
        self.config, self.device, self.rank, self.world_size = config, device, here.rank, here.size
        self.ledger = Ledger(clock=clock_for(device))
        self.shapes = {key: value.shape for key, value in model.state_dict().items()}
        self.parts_held: list[tuple[int, nn.Module]] = []  # (part, its layers under the whole net's names)
        self.sync: MeteredAllReduce | None = None
        self.model = self.parallelize(model)
        self.dropouts = [module for module in self.model.modules() if isinstance(module, SeededDropout)]

    @abstractmethod
    def parallelize(self, model: AlexNet) -> nn.Module:
        """Places, shards, links and wraps the whole net for this rank; sets `parts_held` (and `sync`, where
        `replicate` wraps it). Returns the module the loop enters."""

    @abstractmethod
    def image_rows(self, global_batch: int) -> slice:
        """Rows of the global batch whose images this rank takes."""

    @abstractmethod
    def label_rows(self, global_batch: int) -> slice:
        """Rows of the global batch whose labels this rank's loss needs (empty if it has no loss)."""

    def dropout_rows(self, global_batch: int) -> slice:
        """Rows of the global batch the fully connected layers' inputs hold here."""
        return self.image_rows(global_batch)

    def forward(self, images: Tensor, step: int, global_batch: int) -> Tensor:
        """Logits for `label_rows` (empty on a rank without fc8), with step `step`'s dropout masks."""
        self.draw_masks(MaskDraw(self.config.seed, step, global_batch, self.dropout_rows(global_batch)))
        return self.model(images)

    def draw_masks(self, draw: MaskDraw) -> None:
        """The dropout masks the next forward applies: those of `draw`'s step and rows."""
        for dropout in self.dropouts:
            dropout.draw = draw

    def forward_backward(self, images: Tensor, labels: Tensor, step: int, global_batch: int,
                         loss_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                         ) -> tuple[Tensor, Tensor]:
        """Forward and backward of global batch `step`, gradient communication finished: this rank's logits and
        (unscaled) loss. The backward starts from the loss times `loss_scale` (fp16's). `optimizer` is for a
        layout that updates some layers within the step (the weird trick's per-round FC updates)."""
        with self.counting(FORWARD):
            logits = self.forward(images, step, global_batch)
            loss = self.loss(logits, labels)
        with self.counting(BACKWARD):
            (loss * loss_scale).backward()  # x 1.0 is exact
        self.finish_backward()
        return logits.detach(), loss.detach()

    def counting(self, direction: str) -> AbstractContextManager:
        """Where a layout's engine issues collectives the links do not see (FSDP's, DTensor's): the context in
        which they count into the ledger, as `direction`'s."""
        return nullcontext()

    def loss(self, logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
        """Cross-entropy over the rows this rank holds (their mean, or with `reduction="sum"` their sum); on a
        rank without fc8, a zero that starts its backward pass from the links."""
        if logits.numel() == 0:
            return logits.sum()
        # at least float32 for the softmax (bf16/fp16 logits under autocast), never lower than given
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits, labels.to(logits.device), reduction=reduction)

    def learning_rates(self) -> dict[Tensor, float]:
        """Parameters whose learning rate is not the run's (`TrainConfig.scaled_lr`), with theirs."""
        return {}

    def finish_backward(self) -> None:
        """After the backward pass, whose gradients are then the global batch's: the ledger learns how long it
        waited on the replicas' reductions."""
        if self.sync is not None:
            self.sync.settle()

    def parameters(self) -> Iterator[nn.Parameter]:
        return self.model.parameters()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    def loss_replicas(self) -> tuple[dist.ProcessGroup | None, int]:
        """The group over which per-rank sums (loss, correct predictions, ...) add up to the global batch's
        (ranks without a loss add zeros; None: this rank's alone), and how many of its ranks hold a loss
        over different rows."""
        return None, 1

    def sum_over_replicas(self, values: Tensor) -> Tensor:
        """Sums per-rank sums (loss, correct predictions, ...) over `loss_replicas`' group."""
        group, _ = self.loss_replicas()
        values = values.detach().clone()
        if group is not None and dist.get_world_size(group) > 1:
            dist.all_reduce(values, group=group)
        return values

    def global_loss(self, loss: Tensor) -> Tensor:
        """The loss over the global batch, on the main process (for logging)."""
        return self.sum_over_replicas(loss) / self.loss_replicas()[1]

    def blocks(self) -> Iterator[tuple[str, Block, nn.Parameter, bool]]:
        """(whole-net key, block, parameter, whether this process writes it to a checkpoint) for every
        parameter this process holds."""
        parts = self.costs.parts(self.world_size)
        for part, module in self.parts_held:
            for key, param in module.named_parameters():
                shape = self.shapes[key]
                yield key, self.costs.shard(key, shape, part, parts), param, self.costs.writes(key, shape, part, parts)

    # -- what the layouts share --

    def place(self, model: AlexNet, device: torch.device | None = None) -> AlexNet:
        """`model` on this rank's device (or `device`), with the speed-ups the run asks for."""
        return apply_speed(model.to(device or self.device), self.config.speed)

    def replicate(self, module: nn.Module, group: dist.ProcessGroup | None, average: bool, link: str,
                  local: Iterable[str] = ()) -> nn.Module:
        """`module` replicated over `group` by DistributedDataParallel (itself, for a group of one): its gradients,
        but those of the parameters named in `local` (held by this rank alone), all-reduced in buckets while
        backward goes on (`replicas.MeteredAllReduce`: averaged, or summed), counted as `link`. No broadcast at
        construction (init_sync=False): every rank starts from the same seeded weights already."""
        if group is None or dist.get_world_size(group) == 1:
            return module
        if local:  # private, and the only way DDP leaves some of a module's parameters out of its reduction
            DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(local))
        replicas = DistributedDataParallel(module, process_group=group, init_sync=False, gradient_as_bucket_view=True)
        self.sync = MeteredAllReduce(group, average, self.ledger, link)
        replicas.register_comm_hook(self.sync, all_reduce_hook)
        return replicas

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.config.timeout_s)


def shard_layers(model: AlexNet, shard: Shard, part: int, parts: int) -> AlexNet:
    """`model` cut down, in place, to the blocks `part` holds: each layer's weight and bias to its block (output
    channels, units), the layer's sizes to match (a grouped conv keeps the groups it holds, and so does its
    LRN), a layer the part holds nothing of replaced by an Identity (its input, an empty tensor there, passes
    through), and each dropout told which units it drops."""
    set_dropout_units(model, shard, part, parts)
    for name, layer in model.layers().items():
        blocks = {kind: shard(f"{name}.{kind}", param.shape, part, parts) for kind, param in layer.named_parameters()}
        if all(block is None for block in blocks.values()):
            setattr(model, name, nn.Identity())
            continue
        whole_rows = layer.weight.shape[0]
        for kind, block in blocks.items():
            setattr(layer, kind, nn.Parameter(getattr(layer, kind).detach()[block].clone()))
        held_rows = layer.weight.shape[0]
        if isinstance(layer, nn.Linear):
            layer.out_features = held_rows
            continue
        layer.out_channels, layer.groups = held_rows, max(1, layer.groups * held_rows // whole_rows)
        layer.in_channels = layer.weight.shape[1] * layer.groups
        if layer.lrn is not None:
            layer.lrn.groups = max(1, layer.lrn.groups * held_rows // whole_rows)
    return model


def set_dropout_units(model: AlexNet, shard: Shard, part: int, parts: int) -> None:
    """Each dropout of the whole net `model` told which of its layer's units the part holds: the rows of the
    layer's weight it holds."""
    for name, dropout in model.dropouts().items():
        block = shard(f"{name}.weight", getattr(model, name).weight.shape, part, parts)
        dropout.units = block[0] if block else slice(0, dropout.units_total)


def link_inputs(model: nn.Module, links: Iterable[Link], group: dist.ProcessGroup, ledger: Ledger) -> None:
    """Each link at its layer's input, across `group`'s ranks, counted in `ledger` under the link's name."""
    for link in links:
        def exchange(module: nn.Module, args: tuple[Tensor, ...], link: Link = link) -> tuple[Tensor]:
            with metered(ledger, link.name):
                return (link.over(args[0], group),)

        model.get_submodule(link.layer).register_forward_pre_hook(exchange)


def check_fc_units_split(mode: str, world_size: int, config: TrainConfig) -> None:
    """Refuses a world size that a layout splitting fc6's and fc7's units into one equal shard per rank cannot
    run."""
    if world_size < 2:
        raise UsageError(f"--mode {mode} needs 2 or more processes; use --mode single for one")
    widths = ARCHITECTURES[config.arch].fc_units
    if any(width % world_size for width in widths):
        working = [n for n in (1, 2, 4, 8, 16, 32) if all(w % n == 0 for w in widths)]
        raise UsageError(f"--mode {mode} splits fc6/fc7 ({widths[0]} units) into equal shards: "
                         f"{world_size} ranks do not divide them; use one of {working}")


def bytes_on_rank_0(ours: Any, theirs: Any) -> str:
    """Two measurements' bytes sent per step by rank 0, for a claim's detail."""
    return f"bytes/step on rank 0: {ours.bytes_per_rank[0]:,.0f} vs {theirs.bytes_per_rank[0]:,.0f}"
