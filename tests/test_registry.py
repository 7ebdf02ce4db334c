"""Adding a layout is one new module and one line in the registry: a toy layout, registered here, is
checked, planned, run by the experiment runner, trained, checkpointed and held to the one-device
reference like the project's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from alexnet_mp.blocks import WHOLE, Block
from alexnet_mp.config import TrainConfig
from alexnet_mp.cost import Traffic
from alexnet_mp.model import AlexNet, Architecture
from alexnet_mp.processes import run_distributed
from alexnet_mp.strategies import STRATEGIES, Strategy
from alexnet_mp.strategies.base import new_traffic
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import FLOAT64_TOLERANCE, assert_same, layout_logits, merged, relative_error, run_layout
from tests.launching import in_process, metrics, process_state_restored

pytestmark = pytest.mark.slow  # a toy layout trained under train, plan, bench and experiment


class EveryRankWhole(Strategy):
    """A toy layout: every rank runs the whole net on the whole global batch, and nothing is exchanged."""

    name = "toy-every-rank-whole"

    @classmethod
    def shard(cls, key: str, shape: torch.Size, part: int, parts: int) -> Block | None:
        return WHOLE

    @classmethod
    def samples(cls, part: int, parts: int, batch: int) -> tuple[int, int]:
        return batch, batch

    @classmethod
    def traffic(cls, arch: Architecture, part: int, parts: int, batch: int, num_classes: int) -> Traffic:
        return new_traffic()

    def parallelize(self, model: AlexNet) -> nn.Module:
        model = self.place(model)
        self.parts_held = [(self.rank, model)]
        return model

    def image_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)

    def label_rows(self, global_batch: int) -> slice:
        return slice(0, global_batch)


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(STRATEGIES, EveryRankWhole.name, EveryRankWhole)
    return EveryRankWhole.name


def test_a_registered_layout_is_checked_and_planned_like_the_others(registered):
    from alexnet_mp.experiment import planned_runs
    from alexnet_mp.plan import layouts, predict
    from alexnet_mp.strategies import check_layout

    check_layout(TrainConfig(mode=registered, batch_size=6), 3)
    assert registered in layouts(2, "paper")
    single, toy = predict("single", "paper", 1, 128, 1.0), predict(registered, "paper", 2, 128, 1.0)
    assert toy.bytes_per_rank == [0.0, 0.0] and toy.compute_s == pytest.approx(single.compute_s)
    assert [(mode, processes) for mode, processes, _ in planned_runs([registered], [2, 4], Path("runs"))] == [
        (registered, 2), (registered, 4)]


def test_a_registered_layout_trains_from_the_command_line_and_its_checkpoint_loads_in_another(registered, tmp_path,
                                                                                              capsys):
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", registered, "--batch-size", "2", "--num-classes", "10",
                            "--steps", "2", "--workers", "0", "--output-dir", str(tmp_path / "toy"))
    assert result.returncode == 0, result.stderr[-3000:]
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--batch-size", "2", "--num-classes", "10",
                            "--steps", "3", "--workers", "0", "--resume", str(tmp_path / "toy"),
                            "--output-dir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in metrics(tmp_path / "single")] == [2]


def run_registered(*args: object) -> object:
    """In a rank process, which imports the registry afresh: the line a new layout adds, then its run."""
    STRATEGIES[EveryRankWhole.name] = EveryRankWhole
    return run_layout(*args)


def test_a_registered_layout_on_two_processes_is_held_to_the_one_device_reference(references, tmp_path):
    ranks = run_distributed(run_registered, 2, tmp_path, EveryRankWhole.name, "paper", BATCH, 2, torch.float64)
    reference = references("paper")["float64"]
    assert relative_error(layout_logits(ranks[:1], 0, BATCH), reference.logits[0]) <= FLOAT64_TOLERANCE
    assert_same(merged(ranks[0].weights, "paper"), merged(reference.weights, "paper"), FLOAT64_TOLERANCE)
    assert ranks[1].weights == [] and ranks[1].checksum == pytest.approx(ranks[0].checksum, rel=1e-12)
