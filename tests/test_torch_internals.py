"""The private parts of torch this project leans on, each where no public API does the job (the reason is
beside each use). Should torch move or change one, these fail first and name it, instead of a layout failing
mid-run."""

from __future__ import annotations

import inspect

import torch
from torch.nn.parallel import DistributedDataParallel


def test_ddp_can_still_be_told_which_parameters_to_leave_out():
    ignore = DistributedDataParallel._set_params_and_buffers_to_ignore_for_model
    assert list(inspect.signature(ignore).parameters) == ["module", "params_and_buffers_to_ignore"]


def test_fsdp2_still_takes_collectives_of_ours_in_its_defaults_shape():
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather, DefaultReduceScatter

    assert list(inspect.signature(DefaultAllGather.__call__).parameters) == [
        "self", "output_tensor", "input_tensor", "group", "async_op"]
    assert list(inspect.signature(DefaultReduceScatter.__call__).parameters) == [
        "self", "output_tensor", "input_tensor", "group", "op", "async_op"]


def test_dtensors_functional_collectives_are_still_the_ops_the_ledger_counts():
    functional = torch.ops._c10d_functional
    for op in ("all_gather_into_tensor", "reduce_scatter_tensor", "all_reduce", "wait_tensor"):
        assert hasattr(functional, op), op
