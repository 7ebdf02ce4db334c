"""LRN as two hand-written Triton kernels (`--triton-lrn`): the function of `model._ChannelLRN`, on maps
whose channels are innermost in memory (channels_last maps seen as (b, h, w, c)).

Why: compiled, LRN's fused kernels ran far from their memory-bound floor on an H100 (the profile is in
docs/results/choices.md). Here each program takes a block of pixels with all their
channels: forward reads the maps once and writes once; backward reads the maps and the gradient once
and writes once. The channel windows are shifted loads of the same rows, served from the cache, and
every sum is kept in float32, as `model._ChannelLRN` keeps it for bf16 and float32 maps (float64
maps, which the equivalence tests use, are not taken: `lrn` refuses them).

The kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1),
which is how the CPU test suite checks them against `model._ChannelLRN`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# Values per program and warps, chosen with launch/kernel_registers.py (ptxas on the kernels compiled for
# sm_90, no GPU needed) so that neither spills registers: backward at 4096 values and 4 warps spilled 2-4 KB.
FORWARD_TILE, FORWARD_WARPS = 2048, 4
BACKWARD_TILE, BACKWARD_WARPS = 1024, 8


@triton.jit
def _window_sum_of_squares(x_ptr, offsets, group, centre, valid, C: tl.constexpr, G: tl.constexpr,
                           HALF: tl.constexpr, BLOCK: tl.constexpr, C_POW2: tl.constexpr):
    """Per pixel, the sum of x^2 over the window around channel `centre`, within `group`."""
    total = tl.zeros([BLOCK, C_POW2], tl.float32)
    for i in tl.static_range(2 * HALF + 1):
        channel = centre + (i - HALF)
        inside = valid & (channel >= 0) & (channel < C) & (channel // G == group)
        v = tl.load(x_ptr + offsets + channel, mask=inside, other=0.0).to(tl.float32)
        total += v * v
    return total


@triton.jit
def _lrn_forward(x_ptr, out_ptr, pixels, alpha, beta, k, C: tl.constexpr, G: tl.constexpr,
                 C_POW2: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
    c = tl.arange(0, C_POW2)[None, :]
    valid, offsets = (rows < pixels) & (c < C), rows * C
    x = tl.load(x_ptr + offsets + c, mask=valid, other=0.0).to(tl.float32)
    d = k + alpha * _window_sum_of_squares(x_ptr, offsets, c // G, c, valid, C, G, HALF, BLOCK, C_POW2)
    tl.store(out_ptr + offsets + c, (x * tl.exp(-beta * tl.log(d))).to(out_ptr.dtype.element_ty), mask=valid)


@triton.jit
def _lrn_backward(x_ptr, grad_ptr, out_ptr, pixels, alpha, beta, k, C: tl.constexpr, G: tl.constexpr,
                  C_POW2: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    """dL/dx = g d^-beta - 2 alpha beta x S(g x d^(-beta-1)), S the window sum (model._ChannelLRN)."""
    rows = (tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)[:, None]
    c = tl.arange(0, C_POW2)[None, :]
    valid, offsets, group = (rows < pixels) & (c < C), rows * C, c // G
    coupling = tl.zeros([BLOCK, C_POW2], tl.float32)
    for i in tl.static_range(2 * HALF + 1):  # the channels whose windows hold c: those in c's window
        j = c + (i - HALF)
        inside = valid & (j >= 0) & (j < C) & (j // G == group)
        xj = tl.load(x_ptr + offsets + j, mask=inside, other=0.0).to(tl.float32)
        gj = tl.load(grad_ptr + offsets + j, mask=inside, other=0.0).to(tl.float32)
        dj = k + alpha * _window_sum_of_squares(x_ptr, offsets, group, j, valid, C, G, HALF, BLOCK, C_POW2)
        coupling += gj * xj * tl.exp((-beta - 1.0) * tl.log(dj))
        if i == HALF:  # j is c itself: its own terms (unrolled at compile time)
            x, own_term = xj, gj * tl.exp(-beta * tl.log(dj))
    grad_in = own_term - 2.0 * alpha * beta * x * coupling
    tl.store(out_ptr + offsets + c, grad_in.to(out_ptr.dtype.element_ty), mask=valid)


def _launch(kernel, tile: int, warps: int, tensors: tuple[Tensor, ...], size: int, alpha: float, beta: float,
            k: float, groups: int) -> Tensor:
    """Runs `kernel` over blocks of pixels (`tile` values each, all channels of a pixel in one block)."""
    out = torch.empty_like(tensors[0])
    channels = tensors[0].shape[-1]
    pixels, padded = tensors[0].numel() // channels, triton.next_power_of_2(channels)
    block = max(1, tile // padded)
    kernel[(triton.cdiv(pixels, block),)](*tensors, out, pixels, alpha, beta, k, C=channels, G=channels // groups,
                                          C_POW2=padded, HALF=size // 2, BLOCK=block, num_warps=warps)
    return out


@torch.library.custom_op("alexnet_mp::lrn", mutates_args=())
def lrn(maps: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    """LRN along the last axis of contiguous `maps` (model.LRN's formula)."""
    if maps.dtype == torch.float64:
        raise ValueError("the Triton LRN computes in float32: run float64 without --triton-lrn")
    return _launch(_lrn_forward, FORWARD_TILE, FORWARD_WARPS, (maps,), size, alpha, beta, k, groups)


@torch.library.custom_op("alexnet_mp::lrn_backward", mutates_args=())
def lrn_backward(maps: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    return _launch(_lrn_backward, BACKWARD_TILE, BACKWARD_WARPS, (maps, grad.contiguous()), size, alpha, beta, k,
                   groups)


@lrn.register_fake
def _(maps: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    return torch.empty_like(maps)


@lrn_backward.register_fake
def _(maps: Tensor, grad: Tensor, size: int, alpha: float, beta: float, k: float, groups: int) -> Tensor:
    return torch.empty_like(maps)


def _save_maps(ctx, inputs: tuple, output: Tensor) -> None:
    maps, *settings = inputs
    ctx.save_for_backward(maps)
    ctx.settings = settings


def _backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
    (maps,) = ctx.saved_tensors
    return lrn_backward(maps, grad, *ctx.settings), None, None, None, None, None


lrn.register_autograd(_backward, setup_context=_save_maps)
