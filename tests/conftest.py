"""Fixtures shared by the equivalence tests."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from tests.equivalence import STEPS, Run, run_reference

REFERENCE_BATCH = 4


@pytest.fixture(scope="session")
def references() -> Callable[[str], dict[str, Run]]:
    """The one-device reference runs per architecture, at batch 4: float64 for 2 steps, float32 for 1."""
    cache: dict[str, dict[str, Run]] = {}

    def reference(arch: str) -> dict[str, Run]:
        if arch not in cache:
            cache[arch] = {"float64": run_reference(arch, REFERENCE_BATCH, STEPS, torch.float64),
                           "float32": run_reference(arch, REFERENCE_BATCH, 1, torch.float32)}
        return cache[arch]

    return reference
