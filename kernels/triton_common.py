"""Helpers shared by the Triton kernels (never by the references)."""
from __future__ import annotations

import os

import triton
import triton.language as tl

# Under TRITON_INTERPRET=1 (CPU tests) a few numerics differ from the GPU; the kernels correct for them.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def rne_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32. Only under TRITON_INTERPRET, whose
    fp32 -> bf16 cast truncates (the GPU cast rounds to nearest): the tests then see the GPU's numerics."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)
