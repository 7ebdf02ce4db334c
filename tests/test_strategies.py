"""Every layout computes what the one-device reference computes, on real gloo processes: logits,
loss, every gradient, and the weights after 2 SGD steps (momentum, weight decay, dropout on);
tolerances in tests/equivalence.py. Its ledger equals the analytic count from the layer shapes."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from alexnet_mp.plan import predict
from alexnet_mp.processes import run_distributed
from alexnet_mp.strategies import STRATEGIES
from tests.conftest import REFERENCE_BATCH as BATCH
from tests.equivalence import (
    FLOAT32_TOLERANCE,
    FLOAT64_TOLERANCE,
    assert_same,
    layout_logits,
    ledger_of,
    merged,
    relative_error,
    run_layout_both_precisions,
)

pytestmark = pytest.mark.slow  # every layout held to the one-device reference on real processes


@dataclass(frozen=True)
class Layout:
    mode: str
    arch: str
    ranks: int
    options: tuple[tuple[str, object], ...] = ()  # the layout's own: exchange, schedule, microbatches
    batch: int = BATCH

    def __str__(self) -> str:
        return "-".join(map(str, (self.mode, self.arch, self.ranks, *(value for _, value in self.options))))


def exchange(scheme: str) -> tuple[tuple[str, object], ...]:
    return (("exchange", scheme),)


def pipelined(schedule: str, microbatches: int) -> tuple[tuple[str, object], ...]:
    return ("schedule", schedule), ("microbatches", microbatches)


LAYOUTS = [
    Layout("single", "paper", 1),
    Layout("data-parallel", "paper", 2),
    Layout("data-parallel", "paper", 4),
    Layout("data-parallel", "owt", 2),
    Layout("weird-trick", "paper", 2, exchange("all")),
    Layout("weird-trick", "paper", 2, exchange("one-at-a-time")),
    Layout("weird-trick", "paper", 2, exchange("slice")),
    Layout("weird-trick", "paper", 4, exchange("all")),
    Layout("weird-trick", "paper", 4, exchange("one-at-a-time")),
    Layout("weird-trick", "paper", 4, exchange("slice"), batch=16),  # (c) sends 1/N of each rank's 1/N a round
    Layout("weird-trick", "owt", 2, exchange("all")),
    Layout("paper-split", "paper", 4),
    Layout("fsdp", "paper", 2),
    Layout("fsdp", "paper", 4),
    # GPipe with one micro-batch, more than the stages, and fewer; 1F1B (M >= N) with more than the stages, and as many
    *(Layout("pipeline", "paper", 2, pipelined("gpipe", microbatches)) for microbatches in (1, 4)),
    Layout("pipeline", "paper", 4, pipelined("gpipe", 2)),
    Layout("pipeline", "paper", 2, pipelined("1f1b", 4)),
    Layout("pipeline", "paper", 4, pipelined("1f1b", 4)),
    Layout("tensor-parallel", "paper", 2),
    Layout("tensor-parallel", "paper", 4),
]


# Per weird-trick scheme on 2 ranks: float64 losses of every step and float32 logits, compared at the end.
SCHEME_RESULTS: dict[str, tuple[list[float], object]] = {}


@pytest.fixture(scope="module", params=LAYOUTS, ids=str)
def layout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[Layout, list[dict]]:
    spec: Layout = request.param
    args = (spec.mode, spec.arch, spec.batch, dict(spec.options))
    if spec.ranks == 1:
        ranks = [run_layout_both_precisions(*args)]
    else:
        ranks = run_distributed(run_layout_both_precisions, spec.ranks, tmp_path_factory.mktemp(str(spec)), *args)
    if spec.mode == "weird-trick" and spec.ranks == 2 and spec.arch == "paper":
        SCHEME_RESULTS[dict(spec.options)["exchange"]] = (ranks[0]["float64"].losses,
                                         layout_logits([r["float32"] for r in ranks], 0, BATCH))
    return spec, ranks


def test_logits_and_loss_equal_single_device(layout, references):
    spec, ranks = layout
    for precision, tolerance in (("float32", FLOAT32_TOLERANCE), ("float64", FLOAT64_TOLERANCE)):
        runs, reference = [r[precision] for r in ranks], references(spec.arch, spec.batch)[precision]
        assert relative_error(layout_logits(runs, 0, spec.batch), reference.logits[0]) <= tolerance
        assert runs[0].losses[0] == pytest.approx(reference.losses[0], rel=tolerance)


def test_gradients_equal_single_device(layout, references):
    spec, ranks = layout
    for precision, tolerance in (("float32", FLOAT32_TOLERANCE), ("float64", FLOAT64_TOLERANCE)):
        gradients = merged([block for r in ranks for block in r[precision].gradients], spec.arch)
        assert_same(gradients, merged(references(spec.arch, spec.batch)[precision].gradients, spec.arch), tolerance)


def test_weights_after_two_sgd_steps_equal_single_device(layout, references):
    spec, ranks = layout
    reference = references(spec.arch, spec.batch)["float64"]
    weights = merged([block for r in ranks for block in r["float64"].weights], spec.arch)
    assert_same(weights, merged(reference.weights, spec.arch), FLOAT64_TOLERANCE)
    assert ranks[0]["float64"].losses == pytest.approx(reference.losses, rel=FLOAT64_TOLERANCE)


def test_ledger_equals_the_analytic_count(layout):
    spec, ranks = layout
    expected = STRATEGIES[spec.mode].expected_traffic(spec.arch, spec.ranks, spec.batch, num_classes=10)
    for rank, r in enumerate(ranks):
        assert ledger_of(r["float32"]).sent() == pytest.approx(expected[rank]), f"rank {rank}"


def test_plan_predicts_the_bytes_the_ledger_measured(layout):
    spec, ranks = layout
    predicted = predict(spec.mode, spec.arch, spec.ranks, spec.batch, device_tflops=1.0, num_classes=10,
                        exchange=dict(spec.options).get("exchange"))
    assert predicted.bytes_per_rank == pytest.approx([r["float32"].sent_bytes for r in ranks])


def test_replicas_of_a_piece_hold_the_same_weights_after_two_steps(layout):
    """Only the first replica's weights are compared with the reference; the others must equal it."""
    spec, ranks = layout
    replica_groups = {"data-parallel": [list(range(spec.ranks))],
                      "paper-split": [[0, 2], [1, 3]] if spec.ranks == 4 else []}
    for group in replica_groups.get(spec.mode, []):
        checksums = [ranks[rank]["float64"].checksum for rank in group]
        assert checksums == pytest.approx([checksums[0]] * len(group), rel=1e-12)


def test_weird_trick_exchange_schemes_give_the_same_results_as_each_other():
    (losses_a, logits_a), *others = (SCHEME_RESULTS[s] for s in ("all", "one-at-a-time", "slice"))
    for losses, logits in others:
        assert losses == pytest.approx(losses_a, rel=FLOAT64_TOLERANCE)
        assert relative_error(logits, logits_a) <= FLOAT32_TOLERANCE
