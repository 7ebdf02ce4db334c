"""Each link's backward is the gradient one-device autograd computes for the same function.

Two ranks each hold a part x_r; rank r's loss is sum(link output * w_r), and the total loss is the
sum over ranks. One-device autograd of that total gives the expected gradient of every part.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from alexnet_mp.links import (
    AllGatherForwardReduceScatterBackward,
    GatherToFirstForwardScatterBackward,
    GradientAllReduce,
    Ledger,
    RoundExchange,
)
from alexnet_mp.processes import run_distributed

WORLD = 2


def parts(shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(WORLD)]


def weights(shape: tuple[int, ...]) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(8)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for _ in range(WORLD)]


def expected_gradients(dim: int, loss_on_every_rank: bool) -> list[torch.Tensor]:
    xs = [x.requires_grad_() for x in parts((2, 3))]
    full = torch.cat(xs, dim)
    ranks = range(WORLD) if loss_on_every_rank else [0]
    sum((full * weights(full.shape)[r]).sum() for r in ranks).backward()
    return [x.grad for x in xs]


def link_gradients() -> dict[str, torch.Tensor]:
    rank, group, ledger = dist.get_rank(), dist.group.WORLD, Ledger()
    out = {}
    for dim in (0, 1):
        x = parts((2, 3))[rank].requires_grad_()
        full = AllGatherForwardReduceScatterBackward.apply(x, dim, group, ledger, "test")
        (full * weights(full.shape)[rank]).sum().backward()
        out[f"all-gather-{dim}"] = x.grad
    x = parts((2, 3))[rank].requires_grad_()
    first = GatherToFirstForwardScatterBackward.apply(x, 1, group, ledger, "test")
    loss = (first * weights((2, 6))[0]).sum() if rank == 0 else first.sum()
    loss.backward()
    out["gather-to-first"] = x.grad
    for scheme in RoundExchange.SCHEMES:
        x = parts((2, 3))[rank].requires_grad_()
        exchange = RoundExchange(scheme, group, ledger)
        launched = exchange.start(x)
        order = exchange.sample_order(2 * WORLD)
        rounds = torch.cat([exchange.round(launched, j) for j in range(WORLD)])
        full = rounds[order.flatten().argsort()]  # back to rank order, as one all-gather along dim 0
        (full * weights(full.shape)[rank]).sum().backward()
        out[scheme] = x.grad
    for average in (False, True):
        param = torch.nn.Parameter(parts((3,))[rank].clone())
        sync = GradientAllReduce([param], group, average, ledger, "test")
        (param * weights((3,))[rank]).sum().backward()
        sync.wait()
        out[f"all-reduce-average-{average}"] = param.grad
    return out


@pytest.fixture(scope="module")
def gradients(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, torch.Tensor]]:
    return run_distributed(link_gradients, WORLD, tmp_path_factory.mktemp("links"))


@pytest.mark.parametrize("dim", [0, 1])
def test_all_gather_backward_is_the_reduce_scatter_of_every_ranks_gradient(gradients, dim):
    for rank, expected in enumerate(expected_gradients(dim, loss_on_every_rank=True)):
        torch.testing.assert_close(gradients[rank][f"all-gather-{dim}"], expected)


def test_gather_to_first_backward_sends_each_rank_the_gradient_of_its_part(gradients):
    for rank, expected in enumerate(expected_gradients(1, loss_on_every_rank=False)):
        torch.testing.assert_close(gradients[rank]["gather-to-first"], expected)


@pytest.mark.parametrize("scheme", RoundExchange.SCHEMES)
def test_round_exchange_gradients_equal_one_all_gather(gradients, scheme):
    for rank, expected in enumerate(expected_gradients(0, loss_on_every_rank=True)):
        torch.testing.assert_close(gradients[rank][scheme], expected)


@pytest.mark.parametrize("average", [False, True])
def test_gradient_all_reduce_sums_or_averages_over_ranks(gradients, average):
    total = sum(weights((3,)))
    for rank in range(WORLD):
        expected = total / WORLD if average else total
        torch.testing.assert_close(gradients[rank][f"all-reduce-average-{average}"], expected)


def test_the_ledger_counts_blocked_time_per_link_and_in_total():
    ledger = Ledger()
    with ledger.waiting("fc6-input"):
        time.sleep(0.01)
    with ledger.waiting("fc7-input"):
        pass
    assert ledger.waits["fc6-input"] >= 0.01 and ledger.wait_s == sum(ledger.waits.values())
    ledger.reset()
    assert ledger.wait_s == 0
