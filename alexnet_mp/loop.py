"""The training loop: one step, evaluation, logging. It knows nothing of layouts: it asks the
strategy for logits, loss and parameters."""

from __future__ import annotations

import torch
from torch import Tensor

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
