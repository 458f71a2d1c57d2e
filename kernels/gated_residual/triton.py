"""Gated residual x + gate * y in one pass, registered as `bbf_rt::gated_residual`.

Programs own a (ROWS, BLOCK_C) tile inside one frame of one sample, so the (B, F, C) gate is loaded
once per tile. Bytes: read x and y, write the output (3 * B * L * C * itemsize) plus the gate. fp32 math,
output in x's dtype.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16



@triton.jit
def _gated_residual_kernel(X, Y, G, OUT, S, C, F,
                           sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, sob, sol,
                           ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RNE: tl.constexpr):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    pid_bf = tl.program_id(2)
    b = (pid_bf // F).to(tl.int64)
    f = pid_bf % F
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    l = f * S + rows
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < S)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + l[:, None] * sxl + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * syb + l[:, None] * syl + cols[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * sgb + f * sgf + cols * sgc, mask=cmask, other=0.0).to(tl.float32)
    out = x + g[None, :] * y
    if RNE:
        out = rne_bf16(out)
    tl.store(OUT + b * sob + l[:, None] * sol + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def launch_params(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): column tiles that divide C where possible, ~8k elements per program."""
    block_c = min(triton.next_power_of_2(C), 512)
    while block_c > 64 and C % block_c:
        block_c //= 2
    if C % block_c:
        block_c = min(triton.next_power_of_2(C), 512)
    rows = max(1, 8192 // block_c)
    return block_c, rows, 8


def launch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, rows: int | None = None,
           num_warps: int | None = None) -> torch.Tensor:
    B, L, C = x.shape
    F = gate.shape[1]
    S = L // F
    out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, r, w = launch_params(C)
    r, w = rows or r, num_warps or w
    grid = (triton.cdiv(S, r), triton.cdiv(C, block_c), B * F)
    wrap_triton(_gated_residual_kernel)[grid](
        x, y, gate, out, S, C, F, *x.stride(), *y.stride(), *gate.stride(), out.stride(0), out.stride(1),
        ROWS=r, BLOCK_C=block_c, RNE=INTERPRET and x.dtype == torch.bfloat16, num_warps=w)
    return out


def _op_impl(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return launch(x, y, gate)


_op = register_op("gated_residual", _op_impl, lambda x, y, gate: x.new_empty(x.shape))


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y, as kernels/gated_residual/reference.py.

    x, y: (B, L, C), frame-major with L = F * S, any strides; gate: (B, F, C) (F = 1: per sample).
    Computed in fp32, returned (B, L, C) contiguous in x's dtype.
    """
    if x.dim() != 3 or y.shape != x.shape or gate.dim() != 3:
        raise ValueError(f"gated_residual: x {tuple(x.shape)} and y {tuple(y.shape)} must be equal (B, L, C), "
                         f"gate {tuple(gate.shape)} (B, F, C)")
    B, L, C = x.shape
    if gate.shape[0] != B or gate.shape[2] != C or gate.shape[1] < 1 or L % gate.shape[1]:
        raise ValueError(f"gated_residual: gate {tuple(gate.shape)} must be (B={B}, F, C={C}) with F dividing L={L}")
    return _op(x, y, gate)
