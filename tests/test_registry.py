"""Adding a layout is one new module and one line in the registry: a toy layout (tests/toy_layout.py), with an
option of its own and a real link, registered (tests/toy_train.py), is checked, planned, benchmarked, run by the
experiment runner, trained, checkpointed and held to the one-device reference like the project's own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.processes import run_distributed
from alexnet_mp.strategies import LAYOUTS, check_layout
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import (
    FLOAT64_TOLERANCE,
    PAPER_NET,
    assert_same,
    layout_logits,
    ledger_of,
    merged,
    relative_error,
    run_layout,
)
from tests.launching import in_process, metrics, process_state_restored, run_ranks
from tests.toy_layout import ConvsApart

pytestmark = pytest.mark.slow  # a toy layout trained under train, plan, bench and experiment

TOY = ConvsApart.name
TOY_TRAIN = ("-m", "tests.toy_train")


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(LAYOUTS, TOY, ConvsApart)
    return TOY


def test_a_registered_layouts_option_is_a_flag_of_train_and_plan(registered, capsys):
    for command in ("train", "plan"):
        assert "--toy-slices" in in_process(capsys, command, "--help").stdout


def test_a_registered_layouts_option_is_checked_with_it(registered):
    check_layout(TrainConfig(mode=TOY, batch_size=8, options={"toy_slices": 2}), 2)
    with pytest.raises(UsageError, match="use a multiple of 4"):
        check_layout(TrainConfig(mode=TOY, batch_size=6, options={"toy_slices": 2}), 2)
    with pytest.raises(UsageError, match=f"--toy-slices applies to --mode {TOY} only"):
        check_layout(TrainConfig(mode="data-parallel", batch_size=8, options={"toy_slices": 2}), 2)


def test_a_registered_layout_is_planned_with_its_option(registered, capsys):
    result = in_process(capsys, "plan", "--gpus", "2", "--batch", "128", "--toy-slices", "2")
    assert result.returncode == 0 and f"| {TOY} (2 slices) | 2 | 128 |" in result.stdout


def test_a_registered_layout_is_benchmarked_at_each_value_its_option_compares(registered):
    from alexnet_mp.bench.matrix import QUICK, layout_runs

    skipped: list[str] = []
    names = [name for name, _, mode, _ in layout_runs(QUICK, "cpu", skipped) if mode == TOY]
    assert names == [f"{TOY} (1 slices) x2", f"{TOY} (2 slices) x2", f"{TOY} (1 slices) x4"]
    assert any(line.startswith(f"{TOY} (2 slices) x4: ") for line in skipped)  # quick's batch of 4 is too small


def test_a_registered_layout_is_run_by_the_experiment_runner(registered):
    from alexnet_mp.experiment import planned_runs
    from alexnet_mp.preflight import check_run

    runs = planned_runs([TOY], [2, 4], Path("runs"))
    assert [(mode, processes) for mode, processes, _ in runs] == [(TOY, 2), (TOY, 4)]
    for mode, processes, directory in runs:
        check_run(TrainConfig(mode=mode, batch_size=8, output_dir=str(directory)), processes)


def test_a_registered_layout_trains_under_train_and_its_checkpoint_resumes_in_another(tmp_path, capsys):
    common = ("--arch", PAPER_NET, "--batch-size", "4", "--num-classes", "10", "--workers", "0")
    result = run_ranks("--mode", TOY, "--toy-slices", "2", *common, "--steps", "2",
                       "--output-dir", str(tmp_path / "toy"), processes=2, program=TOY_TRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", *common, "--steps", "3",
                            "--resume", str(tmp_path / "toy"), "--output-dir", str(tmp_path / "single"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [row["step"] for row in metrics(tmp_path / "single")] == [2]


def run_registered(*args: object) -> object:
    """In a rank process, which imports the registry afresh: the line a new layout adds, then its run."""
    LAYOUTS[TOY] = ConvsApart
    return run_layout(*args)


@pytest.fixture(scope="module")
def toy_ranks(tmp_path_factory: pytest.TempPathFactory) -> list:
    return run_distributed(run_registered, 2, tmp_path_factory.mktemp("toy"), TOY, PAPER_NET, BATCH, 2, torch.float64)


def test_a_registered_layout_on_two_processes_is_held_to_the_one_device_reference(toy_ranks, references):
    reference = references(PAPER_NET)["float64"]
    assert relative_error(layout_logits(toy_ranks[:1], 0, BATCH), reference.logits[0]) <= FLOAT64_TOLERANCE
    assert_same(merged(toy_ranks[0].weights, PAPER_NET), merged(reference.weights, PAPER_NET), FLOAT64_TOLERANCE)


def test_a_registered_layouts_ledger_counts_what_its_traffic_formula_says(toy_ranks):
    expected = ConvsApart.costs.expected_traffic(PAPER_NET, 2, BATCH, num_classes=10)
    assert expected[1][("fc6-input", "forward")] == 9216 * BATCH // 2
    for rank, run in enumerate(toy_ranks):
        assert ledger_of(run).sent() == pytest.approx(expected[rank]), f"rank {rank}"
