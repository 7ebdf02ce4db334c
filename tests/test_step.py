"""The training step's fp16 loss scale: ranks holding different shards skip the same steps."""

from __future__ import annotations

import torch

from alexnet_mp.processes import run_distributed
from alexnet_mp.step import LossScale


def _one_rank_overflows() -> tuple[bool, float]:
    rank = torch.distributed.get_rank()
    parameter = torch.nn.Parameter(torch.ones(3))
    parameter.grad = torch.full((3,), float("inf") if rank == 1 else 8.0)
    scale = LossScale(value=4.0)
    return scale.unscale_and_check([parameter]), scale.value


def test_an_overflow_on_one_rank_makes_every_rank_skip_the_step_and_halve_the_scale(tmp_path):
    assert run_distributed(_one_rank_overflows, 2, tmp_path) == [(False, 2.0), (False, 2.0)]


def test_clean_steps_unscale_the_gradients_and_grow_the_scale_after_the_interval():
    parameter = torch.nn.Parameter(torch.ones(2))
    scale = LossScale(value=4.0, growth_interval=2)
    for _ in range(2):
        parameter.grad = torch.full((2,), 8.0)
        assert scale.unscale_and_check([parameter])
        assert torch.equal(parameter.grad, torch.full((2,), 2.0))
    assert scale.value == 8.0 and scale.clean_steps == 0
