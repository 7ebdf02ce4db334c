"""Fixtures shared by the equivalence tests."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from tests.equivalence import STEPS, Run, run_reference

REFERENCE_BATCH = 4


def pytest_configure() -> None:
    """A thread per pytest-xdist worker, and per process it spawns (the equivalence runs' ranks), as
    tests/launching.ENV gives the launched runs: two workers on two cores each running torch on a thread per core
    keep their threads spinning on each other."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


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
