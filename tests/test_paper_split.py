"""The paper split computes exactly what the one-device AlexNet2012 computes (tolerances in
tests/equivalence.py), on two real processes over gloo and in one process."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.blocks import merge
from alexnet_mp.model import AlexNet2012, build_model, full_shapes
from alexnet_mp.plan import predict
from alexnet_mp.processes import run_distributed
from alexnet_mp.strategies import LAYOUTS
from alexnet_mp.strategies.paper_split import PaperSplit, take_tower
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import (
    FLOAT32_TOLERANCE,
    FLOAT64_TOLERANCE,
    STEPS,
    assert_same,
    layout_logits,
    ledger_of,
    merged,
    relative_error,
    run_layout_both_precisions,
)

pytestmark = pytest.mark.slow  # the towers on real processes


@pytest.fixture(scope="module")
def reference(references) -> dict:
    return references("paper")


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_distributed(run_layout_both_precisions, 2, tmp_path_factory.mktemp("paper-split-2"),
                           "paper-split", "paper", BATCH)


@pytest.fixture(scope="module")
def one_process() -> list[dict]:
    return [run_layout_both_precisions("paper-split", "paper", BATCH)]


@pytest.fixture(params=["two_processes", "one_process"])
def split(request: pytest.FixtureRequest) -> list[dict]:
    return request.getfixturevalue(request.param)


def test_paper_split_logits_and_loss_equal_single_device(split, reference):
    for precision, tolerance in (("float32", FLOAT32_TOLERANCE), ("float64", FLOAT64_TOLERANCE)):
        runs = [ranks[precision] for ranks in split]
        assert relative_error(layout_logits(runs, 0, BATCH), reference[precision].logits[0]) <= tolerance
        assert abs(runs[0].losses[0] - reference[precision].losses[0]) <= tolerance * reference[precision].losses[0]


def test_paper_split_gradients_equal_single_device(split, reference):
    for precision, tolerance in (("float32", FLOAT32_TOLERANCE), ("float64", FLOAT64_TOLERANCE)):
        gradients = merged([block for ranks in split for block in ranks[precision].gradients], "paper")
        assert_same(gradients, merged(reference[precision].gradients, "paper"), tolerance)


def test_paper_split_weights_after_two_sgd_steps_equal_single_device(split, reference):
    weights = merged([block for ranks in split for block in ranks["float64"].weights], "paper")
    assert_same(weights, merged(reference["float64"].weights, "paper"), FLOAT64_TOLERANCE)
    for step in range(STEPS):
        assert abs(split[0]["float64"].losses[step] - reference["float64"].losses[step]) <= 1e-10


def test_paper_split_ledger_equals_count_from_layer_shapes(two_processes):
    expected = LAYOUTS["paper-split"].costs.expected_traffic("paper", 2, BATCH, num_classes=10)
    for rank, ranks in enumerate(two_processes):
        assert ledger_of(ranks["float32"]).sent() == pytest.approx(expected[rank])


def test_plan_predicts_the_bytes_the_paper_split_ledger_measured(two_processes):
    predicted = predict("paper-split", "paper", 2, BATCH, device_tflops=1.0, num_classes=10)
    assert predicted.bytes_per_rank == pytest.approx([ranks["float32"].sent_bytes for ranks in two_processes])


def test_one_process_paper_split_ledger_counts_each_tower(one_process):
    expected = LAYOUTS["paper-split"].costs.expected_traffic("paper", 1, BATCH, num_classes=10)
    ledger = ledger_of(one_process[0]["float32"])
    for tower in range(2):
        assert ledger.sent(tower) == pytest.approx(expected[tower])


def test_paper_split_traffic_per_sample_is_the_papers_links():
    (tower0, tower1) = LAYOUTS["paper-split"].costs.expected_traffic("paper", 2, 1)
    forward = {link: count for (link, direction), count in tower1.items() if direction == "forward"}
    assert forward == {"conv3-input": 128 * 13 * 13, "fc6-input": 128 * 6 * 6, "fc7-input": 2048, "fc8-input": 2048}
    assert sum(c for (_, d), c in tower0.items() if d == "forward") == 128 * 13 * 13 + 128 * 6 * 6 + 2048
    for tower in (tower0, tower1):
        backward = sum(c for (_, d), c in tower.items() if d == "backward")
        assert backward == sum(c for (_, d), c in (tower1 if tower is tower0 else tower0).items() if d == "forward")


def test_towers_hold_half_of_every_conv_and_fc8_lives_on_tower_0():
    tower0, tower1 = (take_tower(AlexNet2012(), index) for index in range(2))
    assert [getattr(tower0, f"conv{i}").out_channels for i in range(1, 6)] == [48, 128, 192, 192, 128]
    assert tower0.conv3.in_channels == 256 and tower0.conv4.in_channels == 192  # conv3 reads both towers
    assert [getattr(tower0, f"conv{i}").groups for i in range(1, 6)] == [1] * 5
    assert tower0.conv1.lrn.groups == tower0.conv2.lrn.groups == 1  # each tower normalises its own maps
    assert (tower0.fc6.out_features, tower0.fc7.in_features, tower0.fc7.out_features) == (2048, 4096, 2048)
    assert tower0.fc8.in_features == 4096 and isinstance(tower1.fc8, torch.nn.Identity)
    assert tower1.dropout6.units == slice(2048, 4096)


def test_the_towers_blocks_make_up_the_one_device_net_exactly():
    whole = build_model("paper", 10, seed=0).state_dict()
    shapes = full_shapes("paper", 10)
    towers = [take_tower(build_model("paper", 10, seed=0), index).state_dict() for index in range(2)]
    blocks = [(key, PaperSplit.costs.shard(key, shapes[key], index, 2), value)
              for index, tower in enumerate(towers) for key, value in tower.items()]
    merged_net = merge(blocks, shapes)
    assert list(merged_net) == list(whole)
    assert all(torch.equal(merged_net[key], value) for key, value in whole.items())
