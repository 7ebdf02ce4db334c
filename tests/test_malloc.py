"""A training process's malloc on a CPU: which blocks it maps afresh, the ones the cost model counts."""

from __future__ import annotations

import ctypes

import pytest
import torch

from alexnet_mp.malloc import FRESH_BLOCK_BYTES, in_reused_memory
from alexnet_mp.processes import run_distributed
from tests.launching import in_process, process_state_restored

pytestmark = pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="reads glibc's mallinfo2")


def bytes_mapped_for(nbytes: int) -> int:
    """How many more bytes glibc holds in blocks it mapped on their own (mallinfo2's hblkhd) while this process
    holds a tensor of `nbytes` than before it."""
    fields = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]
    mallinfo2 = ctypes.CDLL(None).mallinfo2
    mallinfo2.restype = type("mallinfo2", (ctypes.Structure,), {"_fields_": fields})
    before = mallinfo2().hblkhd
    block = torch.empty(nbytes, dtype=torch.uint8)
    during = mallinfo2().hblkhd
    del block
    return during - before


@pytest.mark.parametrize("nbytes", [FRESH_BLOCK_BYTES // 2, 2 * FRESH_BLOCK_BYTES])
def test_a_process_the_lab_starts_maps_afresh_exactly_the_blocks_the_cost_model_counts_as_fresh(tmp_path, nbytes):
    """Its malloc held steady (`steady_malloc`): a fresh process's default threshold, 128 KiB, would map both."""
    mapped = run_distributed(bytes_mapped_for, 1, tmp_path, nbytes)[0]
    assert (mapped >= nbytes) == (nbytes >= FRESH_BLOCK_BYTES)


def test_a_process_that_reuses_its_freed_memory_maps_no_block_afresh(tmp_path):
    reused = run_distributed(in_reused_memory, 1, tmp_path, bytes_mapped_for, 2 * FRESH_BLOCK_BYTES)[0]
    assert reused == 0


def test_a_training_run_holds_its_malloc_steady_before_its_loop_allocates(tmp_path, monkeypatch, capsys):
    from alexnet_mp import cli, loop

    calls: list[str] = []
    monkeypatch.setattr(cli, "steady_malloc", lambda: calls.append("steady_malloc"))
    monkeypatch.setattr(loop, "train", lambda config, accelerator: calls.append("train"))
    with process_state_restored():
        result = in_process(capsys, "train", "--mode", "single", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 0 and calls == ["steady_malloc", "train"]
