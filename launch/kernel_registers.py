"""Registers and spills of LRN's Triton kernels (alexnet_mp/kernels.py) as launched on conv1's and
conv2's maps, compiled for a GPU architecture without needing that GPU: Triton compiles to PTX, and
the ptxas that ships with Triton reports what each kernel uses. A kernel that spills reads and writes
its spilled registers through memory; the kernels' tile sizes were chosen so that none does.

    python launch/kernel_registers.py            # sm_90 (H100, H200)
    python launch/kernel_registers.py --arch 100
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from alexnet_mp import kernels

# (name, kernel, pointer arguments, values per program, warps)
KERNELS = [("forward", kernels._lrn_forward, 2, kernels.FORWARD_TILE, kernels.FORWARD_WARPS),
           ("backward", kernels._lrn_backward, 3, kernels.BACKWARD_TILE, kernels.BACKWARD_WARPS)]
MAPS = {"conv1": 96, "conv2": 256}  # channels; both LRNs normalise two towers' groups


def usage(kernel, pointers: int, tile: int, warps: int, channels: int, dtype: str, arch: int) -> str:
    padded = triton.next_power_of_2(channels)
    types = [f"*{dtype}"] * pointers + ["i32", "fp32", "fp32", "fp32"] + ["constexpr"] * 5
    source = ASTSource(fn=kernel, signature=dict(zip(kernel.arg_names, types, strict=True)),
                       constexprs={"C": channels, "G": channels // 2, "C_POW2": padded, "HALF": 2,
                                   "BLOCK": max(1, tile // padded)})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    with tempfile.TemporaryDirectory() as scratch:
        ptx = Path(scratch) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        report = subprocess.run([str(ptxas), "-v", f"--gpu-name=sm_{arch}a", str(ptx), "-o", "/dev/null"],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report).group(1)
    spilled = re.search(r"(\d+) bytes spill stores", report).group(1)
    return f"{registers} registers, {spilled} bytes spilled"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 for sm_90")
    args = parser.parse_args()
    for name, kernel, pointers, tile, warps in KERNELS:
        for maps, channels in MAPS.items():
            for dtype in ("bf16", "fp32"):
                found = usage(kernel, pointers, tile, warps, channels, dtype, args.arch)
                print(f"{name:8} {maps} {dtype}: {tile} values x {warps} warps per program: {found}")


if __name__ == "__main__":
    main()
