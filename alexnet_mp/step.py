"""One training step on any layout: what the loop runs each step, and what the equivalence tests run.
Kept apart from loop.py so that a process running steps imports no data pipeline or tracker."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from alexnet_mp.config import TrainConfig
from alexnet_mp.flag_types import COUNT, takes
from alexnet_mp.strategies import Layout
from alexnet_mp.world import current


class LossScale:
    """fp16's dynamic loss scale, the same on every rank. The loss is multiplied by `value` before the
    backward and the gradients divided by it after; if any rank's gradients overflowed (one
    all-reduce decides) every rank skips the step and halves the scale, and after `growth_interval`
    clean steps the scale doubles. Not accelerate's GradScaler: that one decides per rank, and ranks
    holding different shards must skip the same steps."""

    def __init__(self, value: float = 2.0 ** 16, growth_interval: int = 2000) -> None:
        self.value, self.growth_interval, self.clean_steps = value, growth_interval, 0

    def unscale_and_check(self, parameters: list[Tensor]) -> bool:
        """Divides the gradients by the scale; True if every rank's are finite."""
        grads = [p.grad for p in parameters if p.grad is not None]
        torch._foreach_mul_(grads, 1.0 / self.value)
        overflow = torch.stack([g.isfinite().all().logical_not() for g in grads]).any().float().reshape(1) \
            if grads else torch.zeros(1)
        if current().size > 1:
            dist.all_reduce(overflow, op=dist.ReduceOp.MAX)
        finite = not bool(overflow.item())
        if finite:
            self.clean_steps += 1
            if self.clean_steps == self.growth_interval:
                self.value, self.clean_steps = self.value * 2, 0
        else:
            self.value, self.clean_steps = self.value / 2, 0
        return finite

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value, self.clean_steps = state["value"], int(state["clean_steps"])

    @staticmethod
    def is_state(state: Any) -> bool:
        """Whether `state`, read back from a checkpoint (which may hold anything), is one `state_dict` writes."""
        return (isinstance(state, dict) and type(state.get("value")) is float and 0 < state["value"] < math.inf
                and takes(COUNT, state.get("clean_steps")))


def compute_gradients(layout: Layout, images: Tensor, labels: Tensor, step: int, global_batch: int,
                      loss_scale: float = 1.0, optimizer: torch.optim.Optimizer | None = None,
                      ) -> tuple[Tensor, Tensor]:
    """Forward and backward of global batch `step`, gradient communication finished. `images` and
    `labels` are this rank's rows of the batch (`layout.image_rows`, `layout.label_rows`); `optimizer`
    the step's, for a layout that updates some layers within the step. Returns this rank's logits and
    (unscaled) loss."""
    if layout.config.speed.cuda_graphs:
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the CUDA graphs may reuse their buffers
    return layout.forward_backward(images, labels, step, global_batch, loss_scale, optimizer)


def train_step(layout: Layout, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
               step: int, global_batch: int, scale: LossScale | None = None) -> Tensor:
    """One SGD step (skipped on every rank if fp16 gradients overflowed); returns this rank's loss."""
    _, loss = compute_gradients(layout, images, labels, step, global_batch, scale.value if scale else 1.0,
                                optimizer)
    if scale is None or scale.unscale_and_check(list(layout.parameters())):
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(parameters: Iterable[Tensor], config: TrainConfig,
                   rates: Mapping[Tensor, float] | None = None) -> torch.optim.SGD:
    """The paper's SGD (section 5): momentum 0.9, weight decay 5e-4 (see docs/reproduction.md for
    how torch's update relates to the paper's), at the run's rate but for the parameters `rates` gives
    another (`Layout.learning_rates`). Fused: one kernel over all parameters, the same update as the
    per-parameter loop and several times faster (docs/results/choices.md)."""
    rates = rates or {}
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for param in parameters:
        # DTensor parameters (fsdp, tensor-parallel) have no fused SGD kernel, and torch's foreach path takes no
        # mix of them with plain tensors: a group of each, the plain ones fused, the DTensors foreach; the same
        # update. Those with a rate of their own form groups of their own too: they may also step apart (the
        # fused kernel steps a group whose parameters all have momentum, or none)
        groups.setdefault((isinstance(param, DTensor), param in rates), []).append(param)
    return torch.optim.SGD([{"params": params, "lr": rates[params[0]] if own else config.scaled_lr,
                             "fused": not sharded, "foreach": sharded or None}
                            for (sharded, own), params in groups.items()],
                           lr=config.scaled_lr, momentum=config.momentum, weight_decay=config.weight_decay)
