"""The epilogues cuDNN leaves to separate passes in the VAE, registered as `bbf_rt::conv_epilogue` and
`bbf_rt::upsample_nearest2x`.

torch adds a convolution's bias after cuDNN returns, as a broadcast add that on channels-last
activations runs PyTorch's non-vectorised elementwise path, and the residual add of a ResBlock is one
more pass; nearest 2x upsampling in NHWC ran at ~0.4 TB/s (bench/profile_player.py on the H100):
- `_epilogue`: y + bias[c] (+ residual) over the flat, dense tensor (NCHW or NHWC, the channel taken from
  the element index), fp32 math, one rounding. Bytes: read y (and the residual), write once.
- `_up2`: each program reads BX/2 pixels x all channels of one input row and writes them twice to each
  of the two output rows it feeds. NCHW is the C = 1 case of the same indexing (planes of N*C rows).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, rne_bf16

BLOCK = 4096


@triton.jit
def _epilogue(Y, BIAS, R, OUT, n, HW, C: tl.constexpr, NHWC: tl.constexpr, HAS_B: tl.constexpr,
              HAS_R: tl.constexpr, RNE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    y = tl.load(Y + offs, mask=m, other=0.0).to(tl.float32)
    if HAS_B:
        c = offs % C if NHWC else (offs // HW) % C
        y += tl.load(BIAS + c, mask=m, other=0.0).to(tl.float32)
    if HAS_R:
        y += tl.load(R + offs, mask=m, other=0.0).to(tl.float32)
    if RNE:
        y = rne_bf16(y)
    tl.store(OUT + offs, y.to(OUT.dtype.element_ty), mask=m)


@triton.jit
def _up2(X, OUT, W, C: tl.constexpr, CP: tl.constexpr, BX: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # input row: n * H + y (NHWC) or (n * C + c) * H + y (NCHW, C = 1)
    ox = tl.program_id(1) * BX + tl.arange(0, BX)  # output columns
    c = tl.arange(0, CP)
    w2 = 2 * W
    m = (ox < w2)[:, None] & (c < C)[None, :]
    v = tl.load(X + (row * W + ox[:, None] // 2) * C + c[None, :], mask=m)
    o = (2 * row * w2 + ox[:, None]) * C + c[None, :]
    tl.store(OUT + o, v, mask=m)
    tl.store(OUT + o + w2 * C, v, mask=m)


def layout(t: torch.Tensor) -> str | None:
    """'nchw' or 'nhwc' for a dense 4-D tensor in one of those layouts (NCHW when both hold), else None."""
    if t.dim() != 4:
        return None
    if t.is_contiguous():
        return "nchw"
    if t.is_contiguous(memory_format=torch.channels_last):
        return "nhwc"
    return None


def _same_layout(t: torch.Tensor, lay: str) -> torch.Tensor:
    return t.contiguous() if lay == "nchw" else t.contiguous(memory_format=torch.channels_last)


def _epilogue_impl(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None) -> torch.Tensor:
    lay = layout(y) or "nchw"
    y = _same_layout(y, lay)
    out = torch.empty_like(y)
    if out.numel() == 0:
        return out
    r = _same_layout(residual, lay) if residual is not None else y
    N, C, H, W = y.shape
    wrap_triton(_epilogue)[(triton.cdiv(y.numel(), BLOCK),)](
        y, bias if bias is not None else y, r, out, y.numel(), H * W, C=C, NHWC=lay == "nhwc",
        HAS_B=bias is not None, HAS_R=residual is not None, RNE=INTERPRET and y.dtype == torch.bfloat16,
        BLOCK=BLOCK, num_warps=8)
    return out


def _up2_impl(x: torch.Tensor) -> torch.Tensor:
    lay = layout(x) or "nchw"
    x = _same_layout(x, lay)
    N, C, H, W = x.shape
    out = torch.empty((N, C, 2 * H, 2 * W), dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last if lay == "nhwc" else torch.contiguous_format)
    if out.numel() == 0:
        return out
    c, rows = (C, N * H) if lay == "nhwc" else (1, N * C * H)
    cp = triton.next_power_of_2(c)
    bx = max(1, min(triton.next_power_of_2(2 * W), 4096 // cp))
    wrap_triton(_up2)[(rows, triton.cdiv(2 * W, bx))](x, out, W, C=c, CP=cp, BX=bx, num_warps=4)
    return out


def _epilogue_fake(y, bias, residual):
    return torch.empty_like(y) if layout(y) else torch.empty_like(y, memory_format=torch.contiguous_format)


def _up2_fake(x):
    N, C, H, W = x.shape
    fmt = torch.channels_last if layout(x) == "nhwc" else torch.contiguous_format
    return x.new_empty((N, C, 2 * H, 2 * W)).contiguous(memory_format=fmt)


if INTERPRET:  # wrap_triton cannot trace interpreted kernels: opaque custom ops with fake impls
    _epi_op = torch.library.custom_op("bbf_rt::conv_epilogue", _epilogue_impl, mutates_args=())
    _epi_op.register_fake(_epilogue_fake)
    _up_op = torch.library.custom_op("bbf_rt::upsample_nearest2x", _up2_impl, mutates_args=())
    _up_op.register_fake(_up2_fake)
else:
    _epi_op = triton_op("bbf_rt::conv_epilogue", _epilogue_impl, mutates_args=())
    _up_op = triton_op("bbf_rt::upsample_nearest2x", _up2_impl, mutates_args=())


def conv_epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y + bias[c] (+ residual) as kernels/conv_epilogue/reference.py; y (N, C, H, W), bias (C,) or None,
    residual y's shape. Returned in y's dtype and layout (channels-last stays channels-last)."""
    if y.dim() != 4:
        raise ValueError(f"conv_epilogue: y {tuple(y.shape)} must be (N, C, H, W)")
    if bias is not None and tuple(bias.shape) != (y.shape[1],):
        raise ValueError(f"conv_epilogue: bias {tuple(bias.shape)} must be (C={y.shape[1]},)")
    if residual is not None and residual.shape != y.shape:
        raise ValueError(f"conv_epilogue: residual {tuple(residual.shape)} must match y {tuple(y.shape)}")
    return _epi_op(y, bias, residual)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest 2x upsampling of (N, C, H, W) as kernels/conv_epilogue/reference.py, in x's layout."""
    if x.dim() != 4:
        raise ValueError(f"upsample_nearest2x: x {tuple(x.shape)} must be (N, C, H, W)")
    return _up_op(x)
