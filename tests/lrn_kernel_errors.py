"""Run as a script under Triton's interpreter (TRITON_INTERPRET=1, set by tests/test_kernels.py): prints,
as JSON, the relative differences between LRN with its Triton kernels and LRN with torch ops, forward
and backward, for the maps of each case. A script, because the interpreter is chosen when the kernels
are defined, and in the test process it would also take over torch.compile's own Triton kernels."""

from __future__ import annotations

import json

import torch
from torch import nn

from alexnet_mp.model import LRN
from alexnet_mp.speed import apply_triton_lrn

# case: (channels, groups, dtype, channels_last). 70 pixels: the last program's block is partly past the end.
CASES = {
    "conv1 maps, channels_last, float32": (96, 2, torch.float32, True),
    "conv2 maps, channels_last, float32": (256, 2, torch.float32, True),
    "conv1 maps, NCHW, float32": (96, 2, torch.float32, False),
    "one group, float32": (20, 1, torch.float32, True),
    "conv1 maps, channels_last, bf16": (96, 2, torch.bfloat16, True),
}


def relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def errors(channels: int, groups: int, dtype: torch.dtype, channels_last: bool) -> dict[str, float]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, channels, 5, 7, generator=generator) * 30  # large enough that the window sum matters
    grad = torch.randn(2, channels, 5, 7, generator=generator)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x, grad = (t.to(dtype).contiguous(memory_format=layout) for t in (x, grad))
    results = []
    for triton in (False, True):
        lrn = nn.Sequential(LRN(groups=groups))
        if triton:
            apply_triton_lrn(lrn)
        maps = x.clone().requires_grad_()
        out = lrn(maps)
        (grad_in,) = torch.autograd.grad(out, maps, grad)
        results.append((out, grad_in))
    (out, grad_in), (triton_out, triton_grad_in) = results
    return {"forward": relative(triton_out, out), "backward": relative(triton_grad_in, grad_in),
            "keeps the layout": float(triton_out.stride() == out.stride())}


if __name__ == "__main__":
    print(json.dumps({name: errors(*case) for name, case in CASES.items()}))
