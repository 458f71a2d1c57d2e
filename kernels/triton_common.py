"""Helpers shared by the Triton kernels (never by the references)."""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.library import triton_op

# Under TRITON_INTERPRET=1 (CPU tests) a few numerics differ from the GPU; the kernels correct for them.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def register_op(name: str, impl, fake):
    """`impl` as the torch op `bbf_rt::<name>`: a triton_op on the GPU (torch.compile, export and
    AOTInductor see the kernels inside; fake tensors come from tracing impl); under TRITON_INTERPRET,
    whose kernels wrap_triton cannot trace, an opaque custom_op with `fake` for its fake tensors."""
    if INTERPRET:
        op = torch.library.custom_op(f"bbf_rt::{name}", impl, mutates_args=())
        op.register_fake(fake)
        return op
    return triton_op(f"bbf_rt::{name}", impl, mutates_args=())


@triton.jit
def rne_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32. Only under TRITON_INTERPRET, whose
    fp32 -> bf16 cast truncates (the GPU cast rounds to nearest): the tests then see the GPU's numerics."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def rne_e4m3(x):
    """fp32 in [-448, 448] -> the nearest float8 e4m3 value (ties to even), still as fp32. Only under
    TRITON_INTERPRET, whose fp32 -> fp8 cast truncates (the GPU's cvt.rn rounds to nearest): 3 mantissa
    bits for normals (|x| >= 2^-6), a 2^-9 grid for subnormals (added to and taken from 1.5 * 2^14, whose
    fp32 spacing is 2^-9). The cast of the result is then exact."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000
    normal = bits.to(tl.float32, bitcast=True)
    sub = (x + 24576.0) - 24576.0
    return tl.where(tl.abs(x) >= 0.015625, normal, sub)
