"""QK RMSNorm over the full width fused with RoPE per head, registered as `bbf_rt::rms_norm_rope`.

Each program holds ROWS token rows as (ROWS, pairs, 2) tiles: the interleaved channel pairs that RoPE
rotates sit side by side, so a row is read from DRAM once, normalised (fp32 sum of squares over all C
channels), weighted and rotated, and written once as (B, L, H, D). Rows wider than 1024 pairs are
processed in chunks, two passes (the second pass re-reads from L1/L2, not DRAM). Bytes:
2 * B * L * C * itemsize plus the cos/sin tables (Bc * L * D/2 * 4 bytes each, Bc = 1 or B).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16



@triton.jit
def _rms_norm_rope_kernel(X, W, COS, SIN, OUT, L, C, eps,
                          sxb, sxl, sxc, sw, scb, scl, scd, ssb, ssl, ssd, sob, sol,
                          HALF: tl.constexpr, ROWS: tl.constexpr, BLOCK_P: tl.constexpr, NCHUNK: tl.constexpr,
                          RNE: tl.constexpr):
    eps = tl.cast(eps, tl.float32)  # Inductor passes Python floats as fp64: keep the math in fp32
    pid_l = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_l * ROWS + tl.arange(0, ROWS)
    p0 = tl.arange(0, BLOCK_P)  # channel pair index over all heads: head p // HALF, frequency p % HALF
    two = tl.arange(0, 2)
    rmask = rows < L
    x_row = X + b * sxb + rows[:, None, None] * sxl
    if NCHUNK > 1:  # wide rows: a first pass for the sum of squares; the second re-reads from L1/L2
        ss = tl.zeros([ROWS], tl.float32)
        for c in tl.range(0, NCHUNK):
            col = 2 * (c * BLOCK_P + p0)[:, None] + two[None, :]
            m3 = rmask[:, None, None] & (col < C)[None, :, :]
            x = tl.load(x_row + col[None, :, :] * sxc, mask=m3, other=0.0).to(tl.float32)
            ss += tl.sum(tl.sum(x * x, 2), 1)
        rstd = tl.rsqrt(ss / C + eps)
    for c in tl.range(0, NCHUNK):
        p = c * BLOCK_P + p0
        col = 2 * p[:, None] + two[None, :]  # (BLOCK_P, 2) channel index
        pmask = p < C // 2
        m2 = rmask[:, None] & pmask[None, :]
        m3 = m2[:, :, None] & (two < 2)[None, None, :]
        x = tl.load(x_row + col[None, :, :] * sxc, mask=m3, other=0.0).to(tl.float32)
        if NCHUNK == 1:
            rstd = tl.rsqrt(tl.sum(tl.sum(x * x, 2), 1) / C + eps)
        w = tl.load(W + col * sw, mask=pmask[:, None] & (two < 2)[None, :], other=0.0).to(tl.float32)
        x = x * rstd[:, None, None] * w[None, :, :]
        x0, x1 = tl.split(x)  # (ROWS, BLOCK_P) even / odd channels
        j = p % HALF
        cs = tl.load(COS + b * scb + rows[:, None] * scl + j[None, :] * scd, mask=m2, other=0.0)
        sn = tl.load(SIN + b * ssb + rows[:, None] * ssl + j[None, :] * ssd, mask=m2, other=0.0)
        out = tl.join(x0 * cs - x1 * sn, x0 * sn + x1 * cs)  # (ROWS, BLOCK_P, 2)
        if RNE:
            out = rne_bf16(out)
        tl.store(OUT + b * sob + rows[:, None, None] * sol + col[None, :, :], out.to(OUT.dtype.element_ty), mask=m3)


def launch_params(C: int) -> tuple[int, int, int, int]:
    """(BLOCK_P, NCHUNK, ROWS, num_warps). Rows of up to 1024 channel pairs stay in registers (one pass;
    measured best on the H100 with ~1k pairs per program and 4 warps: 4 rows at C=384, 1 at C=1536);
    wider rows (C=5120: 56% of the copy rate in one pass) go in chunks of 512 pairs, two passes, one row
    per program with 8 warps (74.5-74.6% of copy in two sessions' sweeps, against 71.3% for 2 rows and 4).
    A heads-tiled variant (cos/sin loaded once per row, broadcast over the heads) was slower at its best,
    54% vs 67% of copy at C=320 and 71% vs 83% at C=1536, and was dropped (ops-h100.jsonl, triton_heads)."""
    pairs = C // 2
    if pairs <= 1024:
        block_p = triton.next_power_of_2(pairs)
        return block_p, 1, max(1, min(16, 1024 // block_p)), 4
    return 512, triton.cdiv(pairs, 512), 1, 8


def launch(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
           rows: int | None = None, num_warps: int | None = None, chunk: int | None = None) -> torch.Tensor:
    """`rms_norm_rope` with explicit launch parameters (None: launch_params); chunk = pairs per chunk
    (0: the whole row in one pass)."""
    B, L, C = x.shape
    D = C // heads
    out = torch.empty((B, L, heads, D), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    block_p, nchunk, r, w = launch_params(C)
    if chunk is not None:
        block_p = chunk or triton.next_power_of_2(C // 2)
        nchunk = triton.cdiv(C // 2, block_p)
    r, w = rows or r, num_warps or w
    # a table shared by the batch (Bc = 1) is read with batch stride 0
    scb = cos.stride(0) if cos.shape[0] > 1 else 0
    ssb = sin.stride(0) if sin.shape[0] > 1 else 0
    grid = (triton.cdiv(L, r), B)
    wrap_triton(_rms_norm_rope_kernel)[grid](
        x, weight, cos, sin, out, L, C, eps, *x.stride(), weight.stride(0),
        scb, cos.stride(1), cos.stride(2), ssb, sin.stride(1), sin.stride(2), out.stride(0), out.stride(1),
        HALF=D // 2, ROWS=r, BLOCK_P=block_p, NCHUNK=nchunk, RNE=INTERPRET and x.dtype == torch.bfloat16,
        num_warps=w)
    return out


def _op_impl(x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int,
             eps: float) -> torch.Tensor:
    return launch(x, weight, cos, sin, heads, eps)


def _fake(x, weight, cos, sin, heads, eps):
    B, L, C = x.shape
    return x.new_empty((B, L, heads, C // heads))


_op = register_op("rms_norm_rope", _op_impl, _fake)


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
) -> torch.Tensor:
    """RMSNorm over the full width, then RoPE on each head's interleaved pairs, as kernels/rope/reference.py.

    x: (B, L, H*D) any strides; weight: (H*D,); cos, sin: (B or 1, L, D/2) fp32. Returns (B, L, H, D)
    contiguous in x's dtype; norm and rotation in fp32.
    """
    if x.dim() != 3 or heads < 1 or x.shape[2] % heads or (x.shape[2] // heads) % 2:
        raise ValueError(f"rms_norm_rope: x {tuple(x.shape)} must be (B, L, H*D) with heads={heads} and D even")
    B, L, C = x.shape
    half = C // heads // 2
    if weight.shape != (C,):
        raise ValueError(f"rms_norm_rope: weight {tuple(weight.shape)} must be ({C},)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1:] != (L, half):
            raise ValueError(f"rms_norm_rope: {name} {tuple(t.shape)} must be (1 or {B}, {L}, {half})")
    return _op(x, weight, cos, sin, int(heads), float(eps))
