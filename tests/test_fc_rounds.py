"""The weird trick's FC layers round by round with an SGD step after each round (--fc-update per-round, the
2014 paper's variable batch size): not the one-device net's mathematics, so held to a one-device reference
written for it (tests/equivalence.py, `run_per_round_reference`), on real gloo processes."""

from __future__ import annotations

import pytest
import torch

from alexnet_mp.config import TrainConfig
from alexnet_mp.processes import run_distributed
from alexnet_mp.step import make_optimizer
from alexnet_mp.strategies import build
from alexnet_mp.strategies.weird_trick import round_rows
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import (
    CLASSES,
    FLOAT64_TOLERANCE,
    PAPER_NET,
    STEPS,
    assert_same,
    layout_logits,
    merged,
    relative_error,
    run_layout,
    run_per_round_reference,
)

pytestmark = pytest.mark.slow  # the weird trick's rounds on real processes

RANKS = 2


def per_round(scheme: str) -> list:
    return [run_layout("weird-trick", PAPER_NET, BATCH, STEPS, torch.float64, exchange=scheme, fc_update="per-round")]


@pytest.fixture(scope="module", params=["one-at-a-time", "slice"])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    scheme = request.param
    ranks = [result[0] for result in run_distributed(per_round, RANKS, tmp_path_factory.mktemp(scheme), scheme)]
    rounds = [round_rows(scheme, j, RANKS, BATCH) for j in range(RANKS)]
    return ranks, run_per_round_reference(PAPER_NET, BATCH, rounds, STEPS, torch.float64)


def test_per_round_logits_and_losses_equal_their_reference(runs):
    ranks, reference = runs
    for step in range(STEPS):
        assert relative_error(layout_logits(ranks, step, BATCH), reference.logits[step]) <= FLOAT64_TOLERANCE
    assert ranks[0].losses == pytest.approx(reference.losses, rel=FLOAT64_TOLERANCE)


def test_per_round_gradients_and_weights_after_two_steps_equal_their_reference(runs):
    ranks, reference = runs
    for kind in ("gradients", "weights"):
        found = merged([block for run in ranks for block in getattr(run, kind)], PAPER_NET)
        assert_same(found, merged(getattr(reference, kind), PAPER_NET), FLOAT64_TOLERANCE)


def test_per_round_updates_are_not_the_one_device_nets(runs, references):
    ranks, _ = runs
    weights = merged([block for run in ranks for block in run.weights], PAPER_NET)
    single = merged(references(PAPER_NET)["float64"].weights, PAPER_NET)
    assert relative_error(weights["fc8.weight"], single["fc8.weight"]) > 1e-6


def learning_rates_by_layer() -> dict[str, float]:
    config = TrainConfig(mode="weird-trick", arch=PAPER_NET,
                         options={"exchange": "one-at-a-time", "fc_update": "per-round"}, num_classes=CLASSES,
                         batch_size=512, lr=0.01, lr_scaling="linear", timeout_s=60)
    layout = build(config, torch.device("cpu"))
    optimizer = make_optimizer(layout.parameters(), config, layout.learning_rates())
    rate = {param: group["lr"] for group in optimizer.param_groups for param in group["params"]}
    return {key.split(".")[0]: rate[param] for key, _, param, _ in layout.blocks()}


def test_per_round_fc_layers_learn_at_the_rate_scaled_for_a_rounds_batch(tmp_path):
    """--lr-scaling linear, global batch 512 on 2 ranks: the convs' updates average over 512 samples (rate x4),
    the FC layers' over a round's 256 (x2)."""
    rates = run_distributed(learning_rates_by_layer, RANKS, tmp_path)[0]
    assert {layer: rates[layer] for layer in ("conv1", "conv5", "fc6", "fc8")} == \
        pytest.approx({"conv1": 0.04, "conv5": 0.04, "fc6": 0.02, "fc8": 0.02})
