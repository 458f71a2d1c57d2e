"""GroupNorm + SiLU in three short launches, registered as `bbf_rt::group_norm_silu`.

torch's GroupNorm gives each (sample, group) pair one thread block for its statistics. The VAE has at
most 8 groups, so at batch 1 a 1280x720 activation of 4M elements per group is reduced by 8 blocks on
a 132-SM GPU (the profile of bench/profile_player.py: ~70% of the VAE's kernel time). Here each group
(a contiguous run of C/G channels x H x W elements in NCHW) is split into chunks:
1. `_stats`: one program per (group, chunk) writes the chunk's mean and M2 (sum of squared deviations)
   in fp32: every SM is busy;
2. `_combine`: one program per group merges the chunks (Chan's parallel formula: mean, then
   M2 = sum M2_i + n_i (mean_i - mean)^2, which does not cancel like E[x^2] - E[x]^2) into mean, rstd;
3. `_apply`: (x - mean) * rstd * w[c] + b[c], SiLU, stored in x's dtype.
Bytes: read x twice, write once (torch's GroupNorm then SiLU: read 3x, write 2x).

Channels-last input (N, C, H, W) with NHWC strides, as a channels_last VAE produces, is read in place:
`_stats_nhwc` and `_apply_nhwc` take tiles of BLOCK // C pixels x all C channels (C a power of two), the
group sums coming from a (pixels, G, C/G) reshape of the tile; the output keeps the NHWC layout, so the
next cuDNN convolution needs no NCHW<->NHWC transpose (the profile's nchwToNhwc / nhwcToNchw kernels).
`_combine` is shared: a chunk of P pixels holds P * C/G elements of each group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16

BLOCK = 4096


@triton.jit
def _stats(X, MEAN, M2, L, NCH, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    x = tl.load(X + row * L + offs, mask=mask, other=0.0).to(tl.float32)
    n = tl.minimum(L - ch * BLOCK, BLOCK).to(tl.float32)
    mean = tl.sum(x, axis=0) / n
    d = tl.where(mask, x - mean, 0.0)
    tl.store(MEAN + row * NCH + ch, mean)
    tl.store(M2 + row * NCH + ch, tl.sum(d * d, axis=0))


@triton.jit
def _combine(MEAN, M2, STATS, L, NCH, eps, CHUNK: tl.constexpr, CB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([CB], dtype=tl.float32)
    for start in range(0, NCH, CB):
        i = start + tl.arange(0, CB)
        m = i < NCH
        n = tl.minimum(L - i * CHUNK, CHUNK).to(tl.float32)
        acc += tl.where(m, tl.load(MEAN + row * NCH + i, mask=m, other=0.0) * n, 0.0)
    mean = tl.sum(acc, axis=0) / L
    acc2 = tl.zeros([CB], dtype=tl.float32)
    for start in range(0, NCH, CB):
        i = start + tl.arange(0, CB)
        m = i < NCH
        n = tl.minimum(L - i * CHUNK, CHUNK).to(tl.float32)
        dm = tl.load(MEAN + row * NCH + i, mask=m, other=0.0) - mean
        acc2 += tl.where(m, tl.load(M2 + row * NCH + i, mask=m, other=0.0) + n * dm * dm, 0.0)
    var = tl.sum(acc2, axis=0) / L
    tl.store(STATS + row * 2, mean)
    tl.store(STATS + row * 2 + 1, 1.0 / tl.sqrt(var + eps))


@triton.jit
def _silu_round(y, SILU: tl.constexpr, RNE: tl.constexpr):
    """The shared epilogue of both apply kernels: optional SiLU, then optional bf16 round-to-nearest-even."""
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    if RNE:
        y = rne_bf16(y)
    return y


@triton.jit
def _apply(X, W, B, STATS, OUT, L, HW, C, CG, G,
           HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, RNE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    x = tl.load(X + row * L + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.load(STATS + row * 2)
    rstd = tl.load(STATS + row * 2 + 1)
    y = (x - mean) * rstd
    c = (row % G) * CG + offs // HW
    if HAS_W:
        y = y * tl.load(W + c, mask=mask, other=1.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + c, mask=mask, other=0.0).to(tl.float32)
    y = _silu_round(y, SILU, RNE)
    tl.store(OUT + row * L + offs, y.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _stats_nhwc(X, MEAN, M2, HW, NCH, G: tl.constexpr, C: tl.constexpr, CG: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    p = ch * BP + tl.arange(0, BP).to(tl.int64)
    c = tl.arange(0, C)
    pm = p < HW
    x = tl.load(X + n * HW * C + p[:, None] * C + c[None, :], mask=pm[:, None], other=0.0).to(tl.float32)
    cnt = (tl.minimum(HW - ch * BP, BP) * CG).to(tl.float32)
    mean = tl.sum(tl.reshape(tl.sum(x, axis=0), [G, CG]), axis=1) / cnt  # (G,)
    mean_c = tl.reshape(tl.broadcast_to(mean[:, None], [G, CG]), [C])
    d = tl.where(pm[:, None], x - mean_c[None, :], 0.0)
    m2 = tl.sum(tl.reshape(tl.sum(d * d, axis=0), [G, CG]), axis=1)
    g = tl.arange(0, G)
    tl.store(MEAN + (n * G + g) * NCH + ch, mean)
    tl.store(M2 + (n * G + g) * NCH + ch, m2)


@triton.jit
def _apply_nhwc(X, W, B, STATS, OUT, HW, G, C: tl.constexpr, CG: tl.constexpr,
                HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr, RNE: tl.constexpr, BP: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1) * BP + tl.arange(0, BP).to(tl.int64)
    c = tl.arange(0, C)
    pm = p[:, None] < HW
    offs = n * HW * C + p[:, None] * C + c[None, :]
    x = tl.load(X + offs, mask=pm, other=0.0).to(tl.float32)
    grp = n * G + c // CG
    mean = tl.load(STATS + grp * 2)
    rstd = tl.load(STATS + grp * 2 + 1)
    y = (x - mean[None, :]) * rstd[None, :]
    if HAS_W:
        y = y * tl.load(W + c).to(tl.float32)[None, :]
    if HAS_B:
        y = y + tl.load(B + c).to(tl.float32)[None, :]
    y = _silu_round(y, SILU, RNE)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=pm)


def _pow2(v: int) -> bool:
    return v > 0 and v & (v - 1) == 0


def nhwc(x: torch.Tensor, groups: int) -> bool:
    """True when `x` is read in its channels-last layout (4-D, NHWC strides and not also NCHW-contiguous,
    C and groups powers of two, C <= BLOCK); the output then has the same layout."""
    return (x.dim() == 4 and _pow2(x.shape[1]) and _pow2(groups) and x.shape[1] <= BLOCK
            and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous())


def _launch_nhwc(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
                 silu: bool) -> torch.Tensor:
    N, C, H, W = x.shape
    HW, CG = H * W, C // groups
    out = torch.empty_like(x)  # keeps the channels-last strides
    if out.numel() == 0:
        return out
    bp = BLOCK // C
    nch = triton.cdiv(HW, bp)
    rows = N * groups
    part = torch.empty((2, rows, nch), dtype=torch.float32, device=x.device)
    stats = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
    wrap_triton(_stats_nhwc)[(N, nch)](x, part[0], part[1], HW, nch, G=groups, C=C, CG=CG, BP=bp, num_warps=8)
    wrap_triton(_combine)[(rows,)](part[0], part[1], stats, CG * HW, nch, eps, CHUNK=CG * bp, CB=1024, num_warps=4)
    w = weight if weight is not None else stats
    b = bias if bias is not None else stats
    wrap_triton(_apply_nhwc)[(N, nch)](
        x, w, b, stats, out, HW, groups, C=C, CG=CG, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        RNE=INTERPRET and x.dtype == torch.bfloat16, BP=bp, num_warps=8)
    return out


def launch(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
           silu: bool) -> torch.Tensor:
    if nhwc(x, groups):
        return _launch_nhwc(x, weight, bias, groups, eps, silu)
    x = x.contiguous()
    N, C = x.shape[0], x.shape[1]
    HW = x[0, 0].numel()
    CG = C // groups
    L = CG * HW
    rows = N * groups
    out = torch.empty_like(x)
    if out.numel() == 0:
        return out
    nch = triton.cdiv(L, BLOCK)
    part = torch.empty((2, rows, nch), dtype=torch.float32, device=x.device)
    stats = torch.empty((rows, 2), dtype=torch.float32, device=x.device)
    wrap_triton(_stats)[(rows, nch)](x, part[0], part[1], L, nch, BLOCK=BLOCK, num_warps=8)
    wrap_triton(_combine)[(rows,)](part[0], part[1], stats, L, nch, eps, CHUNK=BLOCK, CB=1024, num_warps=4)
    w = weight if weight is not None else stats  # any pointer: unused when HAS_W is False
    b = bias if bias is not None else stats
    wrap_triton(_apply)[(rows, nch)](
        x, w, b, stats, out, L, HW, C, CG, groups, HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
        RNE=INTERPRET and x.dtype == torch.bfloat16, BLOCK=BLOCK, num_warps=8)
    return out


def _op_impl(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int, eps: float,
             silu: bool) -> torch.Tensor:
    return launch(x, weight, bias, groups, eps, silu)


def _fake(x, weight, bias, groups, eps, silu):
    return torch.empty_like(x) if nhwc(x, groups) else torch.empty_like(x, memory_format=torch.contiguous_format)


_op = register_op("group_norm_silu", _op_impl, _fake)


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) as kernels/group_norm/reference.py; x (N, C, *spatial), weight/bias (C,) or None.

    Statistics and the affine in fp32; returned in x's dtype, channels-last if x is (see `nhwc`), else
    contiguous."""
    if x.dim() < 2 or not isinstance(groups, int) or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"group_norm_silu: x {tuple(x.shape)} must be (N, C, ...) with C divisible by groups={groups!r}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"group_norm_silu: {name} {tuple(t.shape)} must be (C={x.shape[1]},)")
    return _op(x, weight, bias, groups, float(eps), bool(silu))
