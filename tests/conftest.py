"""The order the tests run in, and fixtures shared by the equivalence tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.equivalence import STEPS, Run, run_reference

REFERENCE_BATCH = 4
# The modules that take longest, longest first: pytest-xdist hands each worker a module at a time in the order
# collected, so these start first and the workers end close together.
LONGEST_FIRST = ("test_faults.py", "test_training.py", "test_strategies.py", "test_cli.py", "test_everyday.py",
                 "test_bench.py", "test_paper_split.py", "test_report.py", "test_speed.py", "test_predict.py",
                 "test_data.py", "test_resharding.py", "test_registry.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)


@pytest.fixture(scope="session")
def references() -> Callable[[str, int], dict[str, Run]]:
    """The one-device reference runs per architecture and batch (4 unless a layout needs more): float64 for 2
    steps, float32 for 1."""
    cache: dict[tuple[str, int], dict[str, Run]] = {}

    def reference(arch: str, batch: int = REFERENCE_BATCH) -> dict[str, Run]:
        if (arch, batch) not in cache:
            cache[arch, batch] = {"float64": run_reference(arch, batch, STEPS, torch.float64),
                                  "float32": run_reference(arch, batch, 1, torch.float32)}
        return cache[arch, batch]

    return reference
