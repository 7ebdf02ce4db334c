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
from alexnet_mp.strategies import Layout, build
from tests.equivalence import CLASSES, PAPER_NET, global_batch

pytestmark = pytest.mark.slow  # checkpoints saved and loaded across layouts on real processes

BATCH = 4
LAYOUTS = ("data-parallel", "paper-split", "weird-trick", "fsdp", "pipeline", "tensor-parallel")
# Each moves into and from every other layout; the others' moves among themselves: tests/test_training.py
NEW = ("fsdp", "pipeline", "tensor-parallel")


def trained(mode: str, steps: int, folder: Path | None = None) -> tuple[Layout, torch.optim.Optimizer]:
    """`mode` on this rank, `steps` SGD steps taken (from the checkpoint in `folder`, if given)."""
    config = TrainConfig(mode=mode, arch=PAPER_NET, num_classes=CLASSES, batch_size=BATCH, timeout_s=60)
    layout = build(config, torch.device("cpu"))
    layout.train()
    optimizer = make_optimizer(layout.parameters(), config)
    start = 0
    if folder is not None:
        found = checkpoint.find("latest", folder)
        checkpoint.load(found, layout, optimizer)
        start = found.step
    images, labels = global_batch(BATCH, torch.float32)
    for step in range(start, start + steps):
        train_step(layout, optimizer, images[layout.image_rows(BATCH)], labels[layout.label_rows(BATCH)], step,
                   BATCH)
    return layout, optimizer


def held(layout: Layout, optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple, torch.Tensor, torch.Tensor]]:
    """(key, block, weights, momentum) of every block this rank holds."""
    return [(key, block, local(param).detach().clone(), local(optimizer.state[param]["momentum_buffer"]).clone())
            for key, block, param, _ in layout.blocks()]


def moves() -> list[tuple[str, str]]:
    """(saving layout, loading layout): each new layout's checkpoint into every layout, every other's into it."""
    pairs = [(new, loader) for new in NEW for loader in LAYOUTS] + [(saver, new) for new in NEW for saver in LAYOUTS]
    return list(dict.fromkeys(pairs))


def differing(blocks: list, expected: list) -> list[str]:
    """The keys whose weights or momentum differ between two lists of this rank's blocks."""
    return [key for (key, _, values, buffer), (_, _, want, want_buffer) in zip(blocks, expected, strict=True)
            if not (torch.equal(values, want) and torch.equal(buffer, want_buffer))]


def save_then_load(folder: str) -> dict[tuple[str, str], list[str]]:
    """Each layout takes a step and saves; then each move's loader loads its saver's checkpoint. Returns, per
    move, the keys of the loader's blocks that differ from the saved whole net's (compared here: shipping the
    blocks back would move gigabytes)."""
    for saver in LAYOUTS:
        layout, optimizer = trained(saver, 1)
        checkpoint.save(Path(folder) / saver, layout, optimizer, {"step": 1}, keep=1)
    found = {}
    for saver in LAYOUTS:  # one saved whole net in memory at a time, read once for all its loaders
        weights, momentum = checkpoint.full_state(checkpoint.find("latest", Path(folder) / saver))
        for loader in [loader for source, loader in moves() if source == saver]:
            blocks = held(*trained(loader, 0, Path(folder) / saver))
            found[saver, loader] = differing(blocks, [(key, block, weights[key][block], momentum[key][block])
                                                      for key, block, _, _ in blocks])
    return found


@pytest.fixture(scope="module")
def across_layouts(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("checkpoints")
    return run_distributed(save_then_load, 2, folder / "ranks", str(folder))


@pytest.mark.parametrize(("saver", "loader"), moves(), ids=[f"{saver}-to-{loader}" for saver, loader in moves()])
def test_a_checkpoint_loads_exactly_into_another_layout(across_layouts, saver, loader):
    assert [ranks[saver, loader] for ranks in across_layouts] == [[], []]


def straight_and_resumed(folder: str) -> dict[str, list[str]]:
    """Per new layout: 2 steps straight, and a step, a checkpoint, a fresh layout loading it, a step. Returns the
    keys whose weights or momentum differ at the end of the two."""
    runs = {}
    for mode in NEW:
        straight = held(*trained(mode, 2))
        layout, optimizer = trained(mode, 1)
        checkpoint.save(Path(folder) / mode, layout, optimizer, {"step": 1}, keep=1)
        runs[mode] = differing(held(*trained(mode, 1, Path(folder) / mode)), straight)
    return runs


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    folder = tmp_path_factory.mktemp("resumed")
    return run_distributed(straight_and_resumed, 2, folder / "ranks", str(folder))


@pytest.mark.parametrize("mode", NEW)
def test_a_run_resumed_from_its_checkpoint_goes_on_as_the_straight_run(resumed_runs, mode):
    assert [ranks[mode] for ranks in resumed_runs] == [[], []]
