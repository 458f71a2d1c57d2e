"""LayerNorm / RMSNorm (no affine) + adaLN modulation in one pass, registered as `bbf_rt::norm_modulate`;
and `bbf_rt::residual_norm_modulate`, the gated residual before it fused in (see that kernel).

Each program owns ROWS whole token rows of one frame of one sample, so it loads that frame's shift and
scale once and keeps the rows in registers between the statistics and the output: x is read once and
the output written once (2 * B * L * C * itemsize bytes, plus the small (B, F, C) shift/scale).
Mean, variance and the modulation are computed in fp32; the output is cast to x's dtype.
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16



@triton.jit
def _norm_modulate_kernel(X, SHIFT, SCALE, OUT, S, C, F, eps,
                          sxb, sxl, sxc, shb, shf, shc, scb, scf, scc, sob, sol,
                          ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr, RNE: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    pid_s = tl.program_id(0)  # row tile within the frame
    pid_bf = tl.program_id(1)  # b * F + f
    b = (pid_bf // F).to(tl.int64)
    f = pid_bf % F
    rows = pid_s * ROWS + tl.arange(0, ROWS)
    l = f * S + rows  # token index in the sample
    cols = tl.arange(0, BLOCK_C)
    cmask = cols < C
    mask = (rows < S)[:, None] & cmask[None, :]
    x = tl.load(X + b * sxb + l[:, None] * sxl + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    if RMS:
        y = x * tl.rsqrt(tl.sum(x * x, 1) / C + eps)[:, None]
    else:
        mean = tl.sum(x, 1) / C
        xc = tl.where(cmask[None, :], x - mean[:, None], 0.0)
        y = xc * tl.rsqrt(tl.sum(xc * xc, 1) / C + eps)[:, None]
    shift = tl.load(SHIFT + b * shb + f * shf + cols * shc, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scb + f * scf + cols * scc, mask=cmask, other=0.0).to(tl.float32)
    out = y * (1.0 + scale[None, :]) + shift[None, :]
    if RNE:
        out = rne_bf16(out)
    tl.store(OUT + b * sob + l[:, None] * sol + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def launch_params(C: int) -> tuple[int, int, int]:
    """(BLOCK_C, ROWS, num_warps): whole rows in registers."""
    block_c = triton.next_power_of_2(C)
    # measured on the H100 at 32760 x {384, 1536, 5120} (bench_ops.py --sweep): 4 warps, >= 2 rows and
    # ~4k-element tiles were best at every width (2.5-2.75 TB/s, 83-92% of the copy rate)
    rows = max(2, min(16, 4096 // block_c))
    return block_c, rows, 4


def launch(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool,
           rows: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    B, L, C = x.shape
    F = shift.shape[1]
    S = L // F
    out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_c, r, w = launch_params(C)
    r, w = rows or r, num_warps or w
    grid = (triton.cdiv(S, r), B * F)
    wrap_triton(_norm_modulate_kernel)[grid](
        x, shift, scale, out, S, C, F, eps, *x.stride(), *shift.stride(), *scale.stride(), out.stride(0), out.stride(1),
        ROWS=r, BLOCK_C=block_c, RMS=rms, RNE=INTERPRET and x.dtype == torch.bfloat16, num_warps=w)
    return out


def _op_impl(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool) -> torch.Tensor:
    return launch(x, shift, scale, eps, rms)


_op = register_op("norm_modulate", _op_impl, lambda x, shift, scale, eps, rms: x.new_empty(x.shape))


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False,
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift, as kernels/norm_modulate/reference.py.

    x: (B, L, C) frame-major tokens, L = F * S; shift, scale: (B, F, C) (F = 1: per sample), any float
    dtype and strides. Statistics and modulation in fp32; returns (B, L, C) contiguous in x's dtype.
    """
    if x.dim() != 3 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"norm_modulate: x {tuple(x.shape)} must be (B, L, C), shift {tuple(shift.shape)} and "
                         f"scale {tuple(scale.shape)} (B, F, C)")
    B, L, C = x.shape
    if shift.shape[0] != B or shift.shape[2] != C or shift.shape[1] < 1 or L % shift.shape[1]:
        raise ValueError(f"norm_modulate: shift/scale {tuple(shift.shape)} must be (B={B}, F, C={C}) with F dividing L={L}")
    return _op(x, shift, scale, float(eps), bool(rms))


@triton.jit
def residual_norm_rows(X, Y, G, SHIFT, SCALE, R, b, rows, cols, L, C, SG, SM, eps,
                       sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, shb, shf, shc, scb, scf, scc, srb, srl,
                       RMS: tl.constexpr, RNE: tl.constexpr):
    """The body both fused residual + norm kernels share (this one's bf16 output and kernels/fp8_linear's
    e4m3 one): loads x, y and each row's gate and shift/scale by its frame (their frame counts may
    differ; tiny tables, cached), stores r = x + gate * y in R's dtype and returns
    norm(r) * (1 + scale) + shift as fp32 (ROWS, BLOCK_C), 0 outside rows < L and cols < C."""
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    cmask = cols < C
    mask = (rows < L)[:, None] & cmask[None, :]
    fg = (rows // SG)[:, None]
    fm = (rows // SM)[:, None]
    x = tl.load(X + b * sxb + rows[:, None] * sxl + cols[None, :] * sxc, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b * syb + rows[:, None] * syl + cols[None, :] * syc, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * sgb + fg * sgf + cols[None, :] * sgc, mask=mask, other=0.0).to(tl.float32)
    r = x + g * y
    if RNE:
        r = rne_bf16(r)
    r = r.to(R.dtype.element_ty)
    tl.store(R + b * srb + rows[:, None] * srl + cols[None, :], r, mask=mask)
    r = r.to(tl.float32)  # the norm reads the rounded residual stream, as the two ops in sequence
    if RMS:
        h = r * tl.rsqrt(tl.sum(r * r, 1) / C + eps)[:, None]
    else:
        mean = tl.sum(r, 1) / C
        rc = tl.where(cmask[None, :], r - mean[:, None], 0.0)
        h = rc * tl.rsqrt(tl.sum(rc * rc, 1) / C + eps)[:, None]
    shift = tl.load(SHIFT + b * shb + fm * shf + cols[None, :] * shc, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * scb + fm * scf + cols[None, :] * scc, mask=mask, other=0.0).to(tl.float32)
    return tl.where(mask, h * (1.0 + scale) + shift, 0.0)


@triton.jit
def _residual_norm_modulate_kernel(X, Y, G, SHIFT, SCALE, R, OUT, L, C, SG, SM, eps,
                                   sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, shb, shf, shc, scb, scf, scc,
                                   srb, srl, sob, sol,
                                   ROWS: tl.constexpr, BLOCK_C: tl.constexpr, RMS: tl.constexpr, RNE: tl.constexpr):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)  # token index in the sample
    cols = tl.arange(0, BLOCK_C)
    out = residual_norm_rows(X, Y, G, SHIFT, SCALE, R, b, rows, cols, L, C, SG, SM, eps,
                             sxb, sxl, sxc, syb, syl, syc, sgb, sgf, sgc, shb, shf, shc, scb, scf, scc, srb, srl,
                             RMS, RNE)
    if RNE:
        out = rne_bf16(out)
    mask = (rows < L)[:, None] & (cols < C)[None, :]
    tl.store(OUT + b * sob + rows[:, None] * sol + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


def residual_launch(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                    eps: float, rms: bool, rows: int | None = None,
                    num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    B, L, C = x.shape
    r_out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    out = torch.empty((B, L, C), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return r_out, out
    block_c, r, w = launch_params(C)
    r, w = rows or r, num_warps or w
    grid = (triton.cdiv(L, r), B)
    wrap_triton(_residual_norm_modulate_kernel)[grid](
        x, y, gate, shift, scale, r_out, out, L, C, L // gate.shape[1], L // shift.shape[1], eps,
        *x.stride(), *y.stride(), *gate.stride(), *shift.stride(), *scale.stride(),
        r_out.stride(0), r_out.stride(1), out.stride(0), out.stride(1),
        ROWS=r, BLOCK_C=block_c, RMS=rms, RNE=INTERPRET and x.dtype == torch.bfloat16, num_warps=w)
    return r_out, out


def _residual_op_impl(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                      eps: float, rms: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_launch(x, y, gate, shift, scale, eps, rms)


_residual_op = register_op("residual_norm_modulate", _residual_op_impl,
                           lambda x, y, gate, shift, scale, eps, rms: (x.new_empty(x.shape), x.new_empty(x.shape)))


def residual_norm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(r, norm(r) * (1 + scale) + shift) with r = x + gate * y, as kernels/norm_modulate/reference.py.

    One pass: x and y are read once, r and the normalised rows written once (4 * B * L * C * itemsize
    bytes, against 5 for gated_residual then norm_modulate). x, y: (B, L, C) frame-major, any strides;
    gate: (B, Fg, C), shift/scale: (B, Fm, C), each F dividing L. Returns two (B, L, C) contiguous tensors
    in x's dtype.
    """
    check_residual_norm_args("residual_norm_modulate", x, y, gate, shift, scale)
    return _residual_op(x, y, gate, shift, scale, float(eps), bool(rms))


def check_residual_norm_args(op: str, x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor,
                             scale: torch.Tensor) -> None:
    """The shape rules of both fused residual + norm ops (this one and kernels/fp8_linear's), as ValueErrors
    named after `op`."""
    if x.dim() != 3 or y.shape != x.shape or gate.dim() != 3 or shift.dim() != 3 or shift.shape != scale.shape:
        raise ValueError(f"{op}: x {tuple(x.shape)} and y {tuple(y.shape)} must be equal (B, L, C), "
                         f"gate {tuple(gate.shape)}, shift {tuple(shift.shape)} and scale {tuple(scale.shape)} (B, F, C)")
    B, L, C = x.shape
    for name, t in (("gate", gate), ("shift/scale", shift)):
        if t.shape[0] != B or t.shape[2] != C or t.shape[1] < 1 or L % t.shape[1]:
            raise ValueError(f"{op}: {name} {tuple(t.shape)} must be (B={B}, F, C={C}) with F dividing L={L}")
