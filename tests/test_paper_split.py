"""The paper split computes exactly what the one-device AlexNet2012 computes (tolerances in
tests/equivalence.py), on two real processes over gloo and in one process."""

from __future__ import annotations

import pytest

from alexnet_mp.cost import expected_traffic
from alexnet_mp.plan import predict
from alexnet_mp.processes import run_distributed
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
        gradients = merged([piece for ranks in split for piece in ranks[precision].gradients], "paper")
        assert_same(gradients, dict(reference[precision].gradients[0][1]), tolerance)


def test_paper_split_weights_after_two_sgd_steps_equal_single_device(split, reference):
    weights = merged([piece for ranks in split for piece in ranks["float64"].weights], "paper")
    assert_same(weights, dict(reference["float64"].weights[0][1]), FLOAT64_TOLERANCE)
    for step in range(STEPS):
        assert abs(split[0]["float64"].losses[step] - reference["float64"].losses[step]) <= 1e-10


def test_paper_split_ledger_equals_count_from_layer_shapes(two_processes):
    expected = expected_traffic("paper-split", "paper", 2, BATCH, num_classes=10)
    for rank, ranks in enumerate(two_processes):
        assert ledger_of(ranks["float32"]).sent() == pytest.approx(expected[rank])


def test_plan_predicts_the_bytes_the_paper_split_ledger_measured(two_processes):
    predicted = predict("paper-split", "paper", 2, BATCH, device_tflops=1.0, num_classes=10)
    assert predicted.bytes_per_rank == pytest.approx([ranks["float32"].sent_bytes for ranks in two_processes])


def test_one_process_paper_split_ledger_counts_each_tower(one_process):
    expected = expected_traffic("paper-split", "paper", 1, BATCH, num_classes=10)
    ledger = ledger_of(one_process[0]["float32"])
    for tower in range(2):
        assert ledger.sent(tower) == pytest.approx(expected[tower])


def test_paper_split_traffic_per_sample_is_the_papers_links():
    (tower0, tower1) = expected_traffic("paper-split", "paper", 2, 1)
    forward = {link: count for (link, direction), count in tower1.items() if direction == "forward"}
    assert forward == {"conv3-input": 128 * 13 * 13, "fc6-input": 128 * 6 * 6, "fc7-input": 2048, "fc8-input": 2048}
    assert sum(c for (_, d), c in tower0.items() if d == "forward") == 128 * 13 * 13 + 128 * 6 * 6 + 2048
    for tower in (tower0, tower1):
        backward = sum(c for (_, d), c in tower.items() if d == "backward")
        assert backward == sum(c for (_, d), c in (tower1 if tower is tower0 else tower0).items() if d == "forward")
