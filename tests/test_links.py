"""Each link's backward is the gradient one-device autograd computes for the same function.

Two ranks each hold a part x_r; rank r's loss is sum(link output * w_r), and the total loss is the
sum over ranks. One-device autograd of that total gives the expected gradient of every part.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from alexnet_mp.ledger import BACKWARD, FORWARD, Ledger, Meter, metered
from alexnet_mp.links import all_gather, gather_to_first
from alexnet_mp.processes import run_distributed
from alexnet_mp.strategies.replicas import MeteredAllReduce, all_reduce_hook
from alexnet_mp.strategies.weird_trick import RoundExchange, round_rows

WORLD = 2
CONV_SHAPE = (2, 3, 2, 2)


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


def features(world: int) -> torch.Tensor:
    """Every rank's conv features: `world` rows each (so that scheme (c) splits them N ways), rank 0's first."""
    return torch.randn(world * world, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(7))


def round_gradient(world: int, j: int, rank: int) -> torch.Tensor:
    """What rank `rank` computes as round j's feature gradient (its FC shard's part of it)."""
    return torch.randn(world, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(100 * j + rank))


def exchange_rounds(world: int) -> dict[str, tuple[list[torch.Tensor], torch.Tensor]]:
    """Per scheme, on this rank: the rounds' features as received, and this rank's feature gradient once every
    round's has come back."""
    rank, out = dist.get_rank(), {}
    for scheme in RoundExchange.SCHEMES:
        exchange = RoundExchange(scheme, dist.group.WORLD, Meter(Ledger(), "test"))
        mine = features(world)[rank * world:(rank + 1) * world]
        exchange.launch(mine)
        received = [exchange.receive(j).clone() for j in range(world)]
        for j in range(world):
            exchange.send_back(j, round_gradient(world, j, rank))
        out[scheme] = (received, exchange.gradient(mine.shape))
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=str)
def rounds(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[int, list]:
    world = request.param
    return world, run_distributed(exchange_rounds, world, tmp_path_factory.mktemp("rounds"), world)


def link_gradients() -> dict[str, torch.Tensor]:
    rank, group, ledger = dist.get_rank(), dist.group.WORLD, Ledger()
    out = {}
    for dim in (0, 1):
        x = parts((2, 3))[rank].requires_grad_()
        with metered(ledger, f"all-gather-{dim}"):
            full = all_gather(x, dim, group)
        (full * weights(full.shape)[rank]).sum().backward()
        out[f"all-gather-{dim}"] = x.grad
    x = parts((2, 3))[rank].requires_grad_()
    with metered(ledger, "gather-to-first"):
        first = gather_to_first(x, 1, group)
    loss = (first * weights((2, 6))[0]).sum() if rank == 0 else first.sum()
    loss.backward()
    out["gather-to-first"] = x.grad
    out["sent"] = ledger.sent()
    for average in (False, True):
        weighted, sync = replicated(parts((3,))[rank].clone(), average)
        weighted(weights((3,))[rank]).sum().backward()
        sync.settle()
        out[f"all-reduce-average-{average}"] = weighted.module.weight.grad
        out[f"all-reduce-ledger-{average}"] = (sync.ledger.sent(), dict(sync.ledger.blocked))
    for set_to_none in (True, False):
        out[f"all-reduce-second-step-set-to-none-{set_to_none}"] = second_step_gradient(set_to_none)
    return out


class Weighted(torch.nn.Module):
    """x * weight: its gradient for a loss sum(x * weight) is x."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight


def replicated(weight: torch.Tensor, average: bool) -> tuple[DistributedDataParallel, MeteredAllReduce]:
    """`Weighted(weight)` replicated over every rank as the layouts replicate: DDP with the metered hook."""
    module = DistributedDataParallel(Weighted(weight), init_sync=False, gradient_as_bucket_view=True)
    sync = MeteredAllReduce(dist.group.WORLD, average, Ledger(), "test")
    module.register_comm_hook(sync, all_reduce_hook)
    return module, sync


def second_step_gradient(set_to_none: bool) -> torch.Tensor:
    """A channels_last conv weight's all-reduced gradient at the second of two steps (rank r's loss at
    step s: (s + 1) * sum(weight * w_r)), zeroed between the steps as an optimizer does: set to None,
    or zeroed in place, which keeps it a view of DDP's bucket."""
    weighted, sync = replicated(parts(CONV_SHAPE)[dist.get_rank()].contiguous(memory_format=torch.channels_last),
                                average=False)
    conv = weighted.module.weight
    for step in range(2):
        if conv.grad is not None:
            conv.grad = None if set_to_none else conv.grad.zero_()
        weighted((step + 1) * weights(CONV_SHAPE)[dist.get_rank()]).sum().backward()
        sync.settle()
    return conv.grad


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


def test_a_link_counts_what_it_sends_both_ways_under_the_name_it_was_used_with(gradients):
    """Its backward too, which autograd runs after the `metered` block has ended."""
    rank0, rank1 = (gradients[rank]["sent"] for rank in range(WORLD))
    for dim in (0, 1):
        assert rank0[f"all-gather-{dim}", FORWARD] == rank0[f"all-gather-{dim}", BACKWARD] == 6
    assert (rank0.get(("gather-to-first", FORWARD)), rank0["gather-to-first", BACKWARD]) == (None, 6)
    assert (rank1["gather-to-first", FORWARD], rank1.get(("gather-to-first", BACKWARD))) == (6, None)


@pytest.mark.parametrize("scheme", RoundExchange.SCHEMES)
def test_round_j_brings_every_rank_the_rows_it_names(rounds, scheme):
    world, found = rounds
    for rank in range(world):
        for j, received in enumerate(found[rank][scheme][0]):
            torch.testing.assert_close(received, features(world)[round_rows(scheme, j, world, world * world)])


@pytest.mark.parametrize("scheme", RoundExchange.SCHEMES)
def test_each_rank_gets_back_the_sum_over_ranks_of_its_rows_gradients(rounds, scheme):
    world, found = rounds
    whole = torch.zeros(world * world, 3, dtype=torch.float64)
    for j in range(world):
        every_ranks = sum(round_gradient(world, j, rank) for rank in range(world))
        whole[round_rows(scheme, j, world, world * world)] += every_ranks
    for rank in range(world):
        torch.testing.assert_close(found[rank][scheme][1], whole[rank * world:(rank + 1) * world])


@pytest.mark.parametrize("average", [False, True])
def test_replicated_gradients_are_summed_or_averaged_over_ranks(gradients, average):
    total = sum(weights((3,)))
    for rank in range(WORLD):
        expected = total / WORLD if average else total
        torch.testing.assert_close(gradients[rank][f"all-reduce-average-{average}"], expected)


def test_the_replicas_reduction_counts_a_ring_all_reduce_and_the_time_it_outlasted_backward(gradients):
    for rank in range(WORLD):
        sent, blocked = gradients[rank]["all-reduce-ledger-True"]
        assert sent == {("test", BACKWARD): 3.0}  # 2 x (N - 1) / N x 3 elements
        assert blocked["test", BACKWARD] >= 0.0


def test_the_ledger_counts_blocked_time_per_link_and_direction_and_in_total():
    ledger = Ledger()
    with ledger.waiting("fc6-input", FORWARD):
        time.sleep(0.01)
    with ledger.waiting("fc6-input", BACKWARD):
        pass
    with ledger.waiting("fc7-input", FORWARD):
        pass
    assert ledger.blocked["fc6-input", FORWARD] >= 0.01
    assert ledger.waits["fc6-input"] == ledger.blocked["fc6-input", FORWARD] + ledger.blocked["fc6-input", BACKWARD]
    assert ledger.wait_s == sum(ledger.waits.values())
    ledger.reset()
    assert ledger.wait_s == 0 and not ledger.arrivals


def test_the_ledger_keeps_the_time_a_link_was_first_reached_in_each_direction():
    ledger = Ledger()
    ledger.arrive("fc6-input", FORWARD)  # an asynchronous collective is launched
    launched = ledger.arrivals["fc6-input", FORWARD]
    time.sleep(0.01)
    with ledger.waiting("fc6-input", FORWARD):  # and waited for later
        pass
    with ledger.waiting("fc6-input", BACKWARD):
        pass
    assert ledger.arrivals["fc6-input", FORWARD] == launched
    assert ledger.arrivals["fc6-input", BACKWARD] >= launched + 0.01


@pytest.mark.parametrize("set_to_none", [True, False], ids=["set-to-none", "zeroed-in-place"])
def test_replicated_gradients_are_right_on_every_step_and_keep_channels_last_however_they_are_zeroed(
        gradients, set_to_none):
    for rank in range(WORLD):
        got = gradients[rank][f"all-reduce-second-step-set-to-none-{set_to_none}"]
        torch.testing.assert_close(got, 2 * sum(weights(CONV_SHAPE)))
        assert got.is_contiguous(memory_format=torch.channels_last)


def tensor_parallel_step_with_rank_1_late(late_s: float) -> dict:
    """A tensor-parallel step on the debug net after two of warm-up (DDP rebuilds its buckets in the second), rank 1
    starting it `late_s` after rank 0: the time each link of rank 0's ledger was blocked."""
    from alexnet_mp.config import TrainConfig
    from alexnet_mp.model import IMAGE_SIZE
    from alexnet_mp.step import make_optimizer, train_step
    from alexnet_mp.strategies import build
    from tests.equivalence import PAPER_NET

    torch.manual_seed(0)
    config = TrainConfig(mode="tensor-parallel", arch=PAPER_NET, num_classes=10, batch_size=4)
    layout = build(config, torch.device("cpu"))
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())
    images, labels = torch.randn(4, 3, IMAGE_SIZE, IMAGE_SIZE), torch.randint(0, 10, (4,))
    images, labels = images[layout.image_rows(4)], labels[layout.label_rows(4)]
    for step in range(2):
        train_step(layout, optimizer, images, labels, step, 4)
    layout.ledger.reset()
    if dist.get_rank() == 1:
        time.sleep(late_s)
    train_step(layout, optimizer, images, labels, 2, 4)
    return dict(layout.ledger.blocked)


def test_tensor_parallelism_times_the_wait_for_its_dtensor_collectives_under_their_links(tmp_path):
    """DTensor's all-gather of fc6's input returns at once; the matrix product that reads it waits for the late rank."""
    blocked = run_distributed(tensor_parallel_step_with_rank_1_late, 2, tmp_path, 0.5)[0]
    assert blocked.get(("fc6-input", FORWARD), 0.0) >= 0.3


def collectives_building_tensor_parallelism() -> dict[str, int]:
    """The collectives a rank calls while it builds the tensor-parallel layout, by op."""
    from torch.distributed.tensor.debug import CommDebugMode

    from alexnet_mp.config import TrainConfig
    from alexnet_mp.strategies import build
    from tests.equivalence import PAPER_NET

    with CommDebugMode() as comm:
        build(TrainConfig(mode="tensor-parallel", arch=PAPER_NET, num_classes=10, batch_size=4), torch.device("cpu"))
    return {str(op): count for op, count in comm.get_comm_counts().items()}


def test_tensor_parallelism_cuts_each_ranks_shards_from_its_own_seeded_copy_without_a_collective(tmp_path):
    """No scatter from rank 0, whose buffers for it would stay in its heap: every rank built the same net."""
    assert run_distributed(collectives_building_tensor_parallelism, 2, tmp_path) == [{}, {}]
