"""LRN's Triton kernels (`--triton-lrn`) compute what LRN's torch ops compute, forward and backward:
checked on the CPU under Triton's interpreter (tests/lrn_kernel_errors.py), on the GPU by test_speed.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.lrn_kernel_errors import CASES

pytestmark = pytest.mark.slow  # Triton kernels (a GPU)

pytest.importorskip("triton", reason="Triton comes with torch's CUDA wheels on Linux only")

FLOAT32_TOLERANCE, BF16_TOLERANCE = 1e-6, 1e-2


@pytest.fixture(scope="module")
def kernel_errors() -> dict[str, dict[str, float]]:
    done = subprocess.run([sys.executable, "-m", "tests.lrn_kernel_errors"], capture_output=True, text=True,
                          env={**os.environ, "TRITON_INTERPRET": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", CASES)
def test_triton_lrn_equals_lrn_forward_and_backward(kernel_errors, case):
    tolerance = BF16_TOLERANCE if "bf16" in case else FLOAT32_TOLERANCE
    found = kernel_errors[case]
    assert found["forward"] <= tolerance and found["backward"] <= tolerance, found
    assert found["keeps the layout"], found
