"""One training step on any layout: what the loop runs each step, and what the equivalence tests run.
Kept apart from loop.py so that a process running steps imports no data pipeline or tracker."""

from __future__ import annotations

import torch
from torch import Tensor

from alexnet_mp.config import TrainConfig
from alexnet_mp.strategies import Strategy


def compute_gradients(strategy: Strategy, images: Tensor, labels: Tensor, step: int,
                      global_batch: int) -> tuple[Tensor, Tensor]:
    """Forward and backward of global batch `step`, gradient communication finished. `images` and
    `labels` are this rank's rows of the batch (`strategy.image_rows`, `strategy.label_rows`).
    Returns this rank's logits and loss."""
    logits = strategy.forward(images, step, global_batch)
    loss = strategy.loss(logits, labels)
    loss.backward()
    strategy.after_backward()
    return logits.detach(), loss.detach()


def train_step(strategy: Strategy, optimizer: torch.optim.Optimizer, images: Tensor, labels: Tensor,
               step: int, global_batch: int) -> Tensor:
    """One SGD step; returns this rank's loss."""
    _, loss = compute_gradients(strategy, images, labels, step, global_batch)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


def make_optimizer(strategy: Strategy, config: TrainConfig) -> torch.optim.SGD:
    """The paper's SGD (section 5): momentum 0.9, weight decay 5e-4 (see docs/reproduction.md for
    how torch's update relates to the paper's)."""
    return torch.optim.SGD(strategy.parameters(), lr=config.scaled_lr, momentum=config.momentum,
                           weight_decay=config.weight_decay)
