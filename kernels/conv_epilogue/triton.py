"""The epilogues cuDNN leaves to separate passes in the VAE, registered as `bbf_rt::conv_epilogue`,
`bbf_rt::upsample_nearest2x` and `bbf_rt::shuffle_epilogue`.

torch adds a convolution's bias after cuDNN returns, as a broadcast add that on channels-last
activations runs PyTorch's non-vectorised elementwise path, and the residual add of a ResBlock is one
more pass; nearest 2x upsampling in NHWC ran at ~0.4 TB/s (bench/profile_player.py on the H100):
- `_epilogue`: y + bias[c] (+ residual) over the flat, dense tensor (NCHW or NHWC, the channel taken from
  the element index), fp32 math, one rounding. Bytes: read y (and the residual), write once.
- `_up2`: each program reads BX/2 pixels x all channels of one input row and writes them twice to each
  of the two output rows it feeds. NCHW is the C = 1 case of the same indexing (planes of N*C rows).
- `_shuffle2`: pixel shuffle by 2 + bias into NHWC, the second half of `ops.upsample_conv2d`'s
  sub-pixel form (`subpixel_weight`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16

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


@triton.jit
def _shuffle2(Y, BIAS, OUT, W, C: tl.constexpr, CP: tl.constexpr, BJ: tl.constexpr, HAS_B: tl.constexpr,
              RNE: tl.constexpr):
    """out[n, 2i + a, 2j + b, c] = y[n, i, j, 4c + 2a + b] (+ bias[c]): pixel shuffle by 2 into NHWC."""
    row = tl.program_id(0).to(tl.int64)  # n * H + i
    j = tl.program_id(1) * BJ + tl.arange(0, BJ)
    c = tl.arange(0, CP)
    m = (j < W)[:, None] & (c < C)[None, :]
    b = tl.load(BIAS + c, mask=c < C, other=0.0).to(tl.float32) if HAS_B else tl.zeros([CP], tl.float32)
    src = Y + (row * W + j[:, None]) * (4 * C) + 4 * c[None, :]
    w2 = 2 * W
    for ph in tl.static_range(4):
        v = tl.load(src + ph, mask=m, other=0.0).to(tl.float32) + b[None, :]
        if RNE:
            v = rne_bf16(v)
        dst = OUT + ((2 * row + ph // 2) * w2 + 2 * j[:, None] + ph % 2) * C + c[None, :]
        tl.store(dst, v.to(OUT.dtype.element_ty), mask=m)


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


def _shuffle_impl(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    y = y.contiguous(memory_format=torch.channels_last)
    N, C4, H, W = y.shape
    C = C4 // 4
    out = torch.empty((N, C, 2 * H, 2 * W), dtype=y.dtype, device=y.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    cp = triton.next_power_of_2(C)
    bj = max(1, min(triton.next_power_of_2(W), 2048 // cp))
    wrap_triton(_shuffle2)[(N * H, triton.cdiv(W, bj))](
        y, bias if bias is not None else y, out, W, C=C, CP=cp, BJ=bj, HAS_B=bias is not None,
        RNE=INTERPRET and y.dtype == torch.bfloat16, num_warps=4)
    return out


def _shuffle_fake(y, bias):
    N, C4, H, W = y.shape
    return y.new_empty((N, C4 // 4, 2 * H, 2 * W)).contiguous(memory_format=torch.channels_last)


def _epilogue_fake(y, bias, residual):
    return torch.empty_like(y) if layout(y) else torch.empty_like(y, memory_format=torch.contiguous_format)


def _up2_fake(x):
    N, C, H, W = x.shape
    fmt = torch.channels_last if layout(x) == "nhwc" else torch.contiguous_format
    return x.new_empty((N, C, 2 * H, 2 * W)).contiguous(memory_format=fmt)


_epi_op = register_op("conv_epilogue", _epilogue_impl, _epilogue_fake)
_up_op = register_op("upsample_nearest2x", _up2_impl, _up2_fake)
_sh_op = register_op("shuffle_epilogue", _shuffle_impl, _shuffle_fake)


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


def shuffle_epilogue(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """pixel_shuffle(y, 2) + bias[c], returned channels-last; y (N, 4C, H, W), bias (C,) or None."""
    if y.dim() != 4 or y.shape[1] % 4:
        raise ValueError(f"shuffle_epilogue: y {tuple(y.shape)} must be (N, 4C, H, W)")
    if bias is not None and tuple(bias.shape) != (y.shape[1] // 4,):
        raise ValueError(f"shuffle_epilogue: bias {tuple(bias.shape)} must be (C={y.shape[1] // 4},)")
    return _sh_op(y, bias)


def subpixel_weight(weight: torch.Tensor) -> torch.Tensor:
    """The (4 Cout, Cin, 3, 3) weight whose 3x3 conv at low resolution, pixel-shuffled by 2, equals the
    (Cout, Cin, 3, 3) conv (padding 1) of the nearest-2x-upsampled input: output phase (a, b) of a
    low-res pixel reads its rows {-1: tap 0, 0: taps 1-2} (a = 0) or {0: taps 0-1, +1: tap 2} (a = 1),
    columns likewise, so each phase's kernel is 2x2 sums of the taps (summed in fp32, in the weight's
    dtype after; 16 of the 36 products per output, 4/9 of the full-resolution conv's FLOPs)."""
    co, ci = weight.shape[:2]
    w = weight.float()

    def phases(t: torch.Tensor, dim: int) -> torch.Tensor:  # taps (0, 1, 2) on `dim` -> (2, ..., 3 offsets)
        t0, t1, t2 = t.unbind(dim)
        z = torch.zeros_like(t0)  # built on the device: no host copy, so this runs inside CUDA graph capture
        return torch.stack([torch.stack([t0, t1 + t2, z], dim), torch.stack([z, t0 + t1, t2], dim)])

    w = phases(phases(w, 2), 4)  # (b, a, Cout, Cin, 3, 3): a from the rows (dim 2), then b from the columns
    w = w.permute(2, 1, 0, 3, 4, 5)  # (Cout, a, b, Cin, 3, 3)
    return w.reshape(4 * co, ci, 3, 3).to(weight.dtype).contiguous(memory_format=torch.channels_last)
