"""Every layout computes what the one-device reference computes, on real gloo processes: logits,
loss, every gradient, and the weights after 2 SGD steps (momentum, weight decay, dropout on);
tolerances in tests/equivalence.py. Its ledger equals the analytic count from the layer shapes.

The cases come from the registry: every layout at each world size it runs (2 and 4, or its one), on the
paper net, with every value of each of its options that a comparison covers at least once; and on the owt
net at its smallest world size. Both nets are their debug flavors (tests/equivalence.py says why)."""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch import Tensor

from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.plan import predict
from alexnet_mp.predict import plan_parts
from alexnet_mp.processes import run_distributed
from alexnet_mp.speed import Variant
from alexnet_mp.strategies import LAYOUTS
from alexnet_mp.strategies.weird_trick import EXCHANGE
from tests.conftest import REFERENCE_BATCH
from tests.equivalence import (
    FLOAT32_TOLERANCE,
    FLOAT64_TOLERANCE,
    OWT_NET,
    PAPER_NET,
    Run,
    assert_same,
    layout_logits,
    ledger_of,
    merged,
    relative_error,
    run_layout_in_bf16_too,
)

pytestmark = pytest.mark.slow  # every layout held to the one-device reference on real processes


@dataclass(frozen=True)
class Case:
    mode: str
    arch: str
    ranks: int
    options: tuple[tuple[str, object], ...] = ()  # the layout's own, as given
    batch: int = REFERENCE_BATCH

    def __str__(self) -> str:
        return "-".join(map(str, (self.mode, self.arch, self.ranks, *(value for _, value in self.options))))


def runnable(mode: str, arch: str, ranks: int, options: dict) -> Case | None:
    """The case, at the smallest batch the layout takes that the reference batch divides; None if it refuses."""
    cls = LAYOUTS[mode]
    config = TrainConfig(mode=mode, arch=arch, batch_size=REFERENCE_BATCH, options=options)
    try:
        batch = math.lcm(REFERENCE_BATCH, cls.batch_multiple(ranks, config))
        cls.check(ranks, TrainConfig(mode=mode, arch=arch, batch_size=batch, options=options))
    except UsageError:
        return None
    return Case(mode, arch, ranks, tuple(options.items()), batch)


def layout_cases(mode: str) -> list[Case]:
    """The layout's defaults at each world size; then, greedily, the settings that cover most of its options'
    compared values not yet covered; then the owt net at the smallest world size."""
    cls = LAYOUTS[mode]
    counts = (cls.fixed_world_size,) if cls.fixed_world_size else (2, 4)
    chosen = [case for ranks in counts if (case := runnable(mode, PAPER_NET, ranks, {}))]
    defaults = {(option.name, option.default) for option in cls.options}
    uncovered = {(option.name, value) for option in cls.options for value in option.compared} - defaults
    candidates = [case for ranks in counts for options in cls.compared()
                  if (case := runnable(mode, PAPER_NET, ranks, options))]
    while uncovered and candidates:
        best = max(candidates, key=lambda case: len(uncovered & set(case.options)))
        if not uncovered & set(best.options):
            break
        chosen.append(best)
        uncovered -= set(best.options)
    owt = next((case for ranks in counts if (case := runnable(mode, OWT_NET, ranks, {}))), None)
    return chosen + ([owt] if owt else [])


CASES = [case for mode in LAYOUTS for case in layout_cases(mode)]


def run_case(case: Case, scratch: Path) -> list[dict[str, Run]]:
    """Each rank's runs of `case` (float64, float32, and float32 under bf16 autocast)."""
    args = (case.mode, case.arch, case.batch, dict(case.options))
    if case.ranks == 1:
        return [run_layout_in_bf16_too(*args)]
    return run_distributed(run_layout_in_bf16_too, case.ranks, scratch / str(case), *args)


def outcome(case: Case, ranks: list[dict[str, Run]]) -> tuple[list[float], Tensor]:
    """What two cases that compute the same function must agree on: the float64 losses of every step and
    the float32 logits."""
    return ranks[0]["float64"].losses, layout_logits([r["float32"] for r in ranks], 0, case.batch)


# Each case's outcome, a few numbers, kept as the module's fixture moves on (its runs, gigabytes, are not).
OUTCOMES: dict[Case, tuple[list[float], Tensor]] = {}


@pytest.fixture(scope="session")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layouts")


@pytest.fixture(scope="module", params=CASES, ids=str)
def layout(request: pytest.FixtureRequest, scratch: Path) -> tuple[Case, list[dict[str, Run]]]:
    ranks = run_case(request.param, scratch)
    OUTCOMES[request.param] = outcome(request.param, ranks)
    return request.param, ranks


def test_the_cases_cover_every_layout_and_every_compared_option_value():
    assert {case.mode for case in CASES} == set(LAYOUTS)
    for mode, cls in LAYOUTS.items():
        for option in cls.options:
            covered = {dict(case.options).get(option.name, option.default) for case in CASES if case.mode == mode}
            assert set(option.compared) <= covered, f"{mode} {option.flag}"


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
    expected = LAYOUTS[spec.mode].costs.expected_traffic(spec.arch, spec.ranks, spec.batch, num_classes=10)
    for rank, r in enumerate(ranks):
        assert ledger_of(r["float32"]).sent() == pytest.approx(expected[rank]), f"rank {rank}"


def test_plan_predicts_the_bytes_the_ledger_measured(layout):
    spec, ranks = layout
    predicted = predict(spec.mode, spec.arch, spec.ranks, spec.batch, device_tflops=1.0, num_classes=10,
                        options=dict(spec.options))
    assert predicted.bytes_per_rank == pytest.approx([r["float32"].sent_bytes for r in ranks])


def test_a_bf16_step_sends_on_each_link_the_bytes_the_cost_model_counts_in_bf16(layout):
    spec, ranks = layout
    parts = plan_parts(spec.mode, spec.arch, spec.ranks, spec.batch, 10, dict(spec.options), Variant("bf16"))
    together = len(parts) // spec.ranks
    for rank, r in enumerate(ranks):
        predicted: dict[tuple[str, str], float] = defaultdict(float)
        for part in parts[rank * together:(rank + 1) * together]:
            for (link, direction), elements in part.traffic.items():
                predicted[link, direction] += elements * part.element_bytes[link]
        measured: dict[tuple[str, str], float] = defaultdict(float)
        for (_, link, direction), sent in r["bf16"].traffic_bytes.items():
            measured[link, direction] += sent
        assert measured == pytest.approx(predicted), f"rank {rank}"


def test_the_parameters_the_cost_model_steps_with_the_foreach_kernel_are_the_dtensors_the_layout_holds(layout):
    spec, ranks = layout
    costs = LAYOUTS[spec.mode].costs
    for rank, r in enumerate(ranks):
        dtensors = r["float32"].dtensors
        assert dtensors == {key: costs.holds_dtensors(key.split(".")[0]) for key in dtensors}, f"rank {rank}"


def test_every_block_two_ranks_hold_has_the_same_weights_on_both_after_two_steps(layout):
    """Only the first holder's blocks are compared with the reference; every other holder must equal it."""
    spec, ranks = layout
    holders: dict[str, list[float]] = {}
    for r in ranks:
        for block, checksum in r["float64"].held.items():
            holders.setdefault(block, []).append(checksum)
    replicated = {block: sums for block, sums in holders.items() if len(sums) > 1}
    if not replicated:
        pytest.skip(f"{spec}: no block is held by two ranks")
    for block, sums in replicated.items():
        assert sums == pytest.approx([sums[0]] * len(sums), rel=1e-12), block


def test_weird_trick_exchange_schemes_give_the_same_results_as_each_other(scratch):
    results = {}
    for scheme in EXCHANGE.compared:
        case = runnable("weird-trick", PAPER_NET, 2, {} if scheme == EXCHANGE.default else {EXCHANGE.name: scheme})
        if case not in OUTCOMES:  # run alone, without the module's other tests
            OUTCOMES[case] = outcome(case, run_case(case, scratch))
        results[scheme] = OUTCOMES[case]
    (losses_a, logits_a), *others = results.values()
    for losses, logits in others:
        assert losses == pytest.approx(losses_a, rel=FLOAT64_TOLERANCE)
        assert relative_error(logits, logits_a) <= FLOAT32_TOLERANCE
