"""A checkpoint of any layout loads into any other exactly (weights and momentum, each rank reading only
the blocks it holds), and a run resumed from one goes on as the straight run would: on real processes
over gloo, through checkpoint.save and checkpoint.load. The launched, whole-program resume is in
tests/test_training.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_mp import checkpoint
from alexnet_mp.blocks import local
from alexnet_mp.config import TrainConfig
from alexnet_mp.processes import run_distributed
from alexnet_mp.step import make_optimizer, train_step
from alexnet_mp.strategies import Strategy, build
from tests.equivalence import CLASSES, global_batch

BATCH = 4
LAYOUTS = ("data-parallel", "paper-split", "weird-trick", "fsdp")
NEW = "fsdp"  # into and from every other layout; the others' moves among themselves: tests/test_training.py


def trained(mode: str, steps: int, folder: Path | None = None) -> tuple[Strategy, torch.optim.Optimizer]:
    """`mode` on this rank, `steps` SGD steps taken (from the checkpoint in `folder`, if given)."""
    config = TrainConfig(mode=mode, num_classes=CLASSES, batch_size=BATCH, timeout_s=60)
    strategy = build(config, torch.device("cpu"))
    strategy.train()
    optimizer = make_optimizer(strategy.parameters(), config)
    start = 0
    if folder is not None:
        found = checkpoint.find("latest", folder)
        checkpoint.load(found, strategy, optimizer)
        start = found.step
    images, labels = global_batch(BATCH, torch.float32)
    for step in range(start, start + steps):
        train_step(strategy, optimizer, images[strategy.image_rows(BATCH)], labels[strategy.label_rows(BATCH)], step,
                   BATCH)
    return strategy, optimizer


def held(strategy: Strategy, optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple, torch.Tensor, torch.Tensor]]:
    """(key, block, weights, momentum) of every block this rank holds."""
    return [(key, block, local(param).detach().clone(), local(optimizer.state[param]["momentum_buffer"]).clone())
            for key, block, param, _ in strategy.blocks()]


def moves() -> list[tuple[str, str]]:
    """(saving layout, loading layout): the new layout's checkpoint into every layout, every other's into it."""
    return [(NEW, loader) for loader in LAYOUTS] + [(saver, NEW) for saver in LAYOUTS if saver != NEW]


def save_then_load(folder: str) -> dict[tuple[str, str], list]:
    """Each layout takes a step and saves; then each move's loader loads its saver's checkpoint. Returns, per
    move, the blocks the loader holds."""
    for saver in LAYOUTS:
        strategy, optimizer = trained(saver, 1)
        checkpoint.save(Path(folder) / saver, strategy, optimizer, {"step": 1}, keep=1)
    return {(saver, loader): held(*trained(loader, 0, Path(folder) / saver)) for saver, loader in moves()}


@pytest.fixture(scope="module")
def across_layouts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict]]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return folder, run_distributed(save_then_load, 2, folder / "ranks", str(folder))


@pytest.mark.parametrize(("saver", "loader"), moves(), ids=[f"{saver}-to-{loader}" for saver, loader in moves()])
def test_a_checkpoint_loads_exactly_into_another_layout(across_layouts, saver, loader):
    folder, ranks = across_layouts
    weights, momentum = checkpoint.full_state(checkpoint.find("latest", folder / saver))
    for rank, found in enumerate(ranks):
        for key, block, values, buffer in found[saver, loader]:
            assert torch.equal(values, weights[key][block]) and torch.equal(buffer, momentum[key][block]), \
                f"rank {rank}, {key}"


def straight_and_resumed(mode: str, folder: str) -> tuple[list, list]:
    """4 steps straight, and 2 steps, a checkpoint, a fresh layout loading it, 2 more steps: the blocks at the end."""
    straight = held(*trained(mode, 4))
    strategy, optimizer = trained(mode, 2)
    checkpoint.save(Path(folder), strategy, optimizer, {"step": 2}, keep=1)
    return straight, held(*trained(mode, 2, Path(folder)))


def test_fsdp_resumed_from_its_checkpoint_goes_on_as_the_straight_run(tmp_path):
    for straight, resumed in run_distributed(straight_and_resumed, 2, tmp_path / "ranks", "fsdp", str(tmp_path)):
        for (key, _, values, buffer), (_, _, resumed_values, resumed_buffer) in zip(straight, resumed, strict=True):
            assert torch.equal(values, resumed_values) and torch.equal(buffer, resumed_buffer), key
