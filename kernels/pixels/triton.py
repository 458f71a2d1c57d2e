"""Pixel passes of the player: decoded frames -> display pixels in one pass (`bbf_rt::to_uint8_nhwc`),
and the boundary frames' cosine similarity in one read (`bbf_rt::boundary_similarity`).

The engine turned the VAE's (N, 3, H, W) bf16 output into host-ready (N, h, w, 3) uint8 in five torch
ops, four of them over an fp32 copy (bench/profile_player.py: the decode stage ~1.8 ms longer than the
graphed decoder at batch 4, 720p). Here one program reads BX pixels x 3 channels of one output row through
x's strides (channels-last or NCHW), computes round((clamp(x, -1, 1) + 1) * 127.5) in fp32 with ties to
even, exactly the reference, and writes the interleaved RGB bytes. Bytes: read the crop, write a third
(bf16) of it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import register_op

BX = 256


@triton.jit
def _to_uint8(X, OUT, Hc, Wc, sxn, sxc, sxh, sxw, BX: tl.constexpr):
    row = tl.program_id(1)  # n * Hc + y
    n = (row // Hc).to(tl.int64)
    y = row % Hc
    xs = tl.program_id(0) * BX + tl.arange(0, BX)
    c = tl.arange(0, 4)
    m = (xs < Wc)[:, None] & (c < 3)[None, :]
    v = tl.load(X + n * sxn + y * sxh + (xs[:, None] * sxw + c[None, :] * sxc), mask=m, other=0.0).to(tl.float32)
    v = (tl.minimum(tl.maximum(v, -1.0), 1.0) + 1.0) * 127.5
    r = tl.floor(v + 0.5)
    r = tl.where((r - v == 0.5) & (r % 2 == 1), r - 1.0, r)  # ties to even, as torch.round
    o = (n * Hc + y) * Wc * 3 + xs[:, None] * 3 + c[None, :]
    tl.store(OUT + o, r.to(tl.uint8), mask=m)


def _impl(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    N = x.shape[0]
    out = torch.empty((N, height, width, 3), dtype=torch.uint8, device=x.device)
    if out.numel() == 0:
        return out
    wrap_triton(_to_uint8)[(triton.cdiv(width, BX), N * height)](x, out, height, width, *x.stride(), BX=BX,
                                                                  num_warps=4)
    return out


def _fake(x, height, width):
    return x.new_empty((x.shape[0], height, width, 3), dtype=torch.uint8)


_op = register_op("to_uint8_nhwc", _impl, _fake)


def to_uint8_nhwc(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """As kernels/pixels/reference.py: (N, 3, H, W) float -> (N, height, width, 3) uint8 contiguous."""
    if x.dim() != 4 or x.shape[1] != 3 or not x.is_floating_point():
        raise ValueError(f"to_uint8_nhwc: x {tuple(x.shape)} {x.dtype} must be float (N, 3, H, W)")
    if not (0 < height <= x.shape[2] and 0 < width <= x.shape[3]):
        raise ValueError(f"to_uint8_nhwc: crop {height}x{width} must fit the frames' {x.shape[2]}x{x.shape[3]}")
    return _op(x, int(height), int(width))


SIM_BLOCK = 1024  # pixels per program of boundary_similarity


@triton.jit
def _similarity_partials(A, B, OUT, HW, W, sab, sac, sah, saw, sbb, sbc, sbh, sbw, eps, BLOCK: tl.constexpr):
    """Sum over BLOCK pixels of one pair of dot(a, b) / max(|a| |b|, eps) over RGB, in fp32."""
    eps = tl.cast(eps, tl.float32)
    n = tl.program_id(1).to(tl.int64)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    y, x = p // W, p % W
    c = tl.arange(0, 4)
    m = (p < HW)[:, None] & (c < 3)[None, :]
    a = tl.load(A + n * sab + (y * sah + x * saw)[:, None] + c[None, :] * sac, mask=m, other=0.0).to(tl.float32)
    b = tl.load(B + n * sbb + (y * sbh + x * sbw)[:, None] + c[None, :] * sbc, mask=m, other=0.0).to(tl.float32)
    na = tl.sqrt(tl.sum(a * a, 1))
    nb = tl.sqrt(tl.sum(b * b, 1))
    cos = tl.sum(a * b, 1) / tl.maximum(na * nb, eps)
    tl.store(OUT + n * tl.num_programs(0) + tl.program_id(0), tl.sum(tl.where(p < HW, cos, 0.0), 0))


def _sim_impl(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    N, _, H, W = a.shape
    nblk = triton.cdiv(H * W, SIM_BLOCK)
    part = torch.empty((N, nblk), dtype=torch.float32, device=a.device)
    if part.numel() == 0:
        return torch.full((N,), float("nan"), dtype=torch.float32, device=a.device)
    wrap_triton(_similarity_partials)[(nblk, N)](a, b, part, H * W, W, *a.stride(), *b.stride(), eps, BLOCK=SIM_BLOCK,
                                                 num_warps=4)
    return part.sum(1) / (H * W)  # a fixed order: the same d for the same frames, run after run


def _sim_fake(a, b, eps):
    return a.new_empty((a.shape[0],), dtype=torch.float32)


_sim_op = register_op("boundary_similarity", _sim_impl, _sim_fake)


def boundary_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """As kernels/pixels/reference.py: (B, 3, H, W) pairs, any strides and float dtype -> (B,) fp32, reading
    each frame once (the reference makes seven passes over fp32 copies)."""
    if a.dim() != 4 or a.shape[1] != 3 or a.shape != b.shape or not (a.is_floating_point() and b.is_floating_point()):
        raise ValueError(f"boundary_similarity: frames {tuple(a.shape)} {a.dtype} and {tuple(b.shape)} {b.dtype} "
                         "must be float (B, 3, H, W) of one shape")
    return _sim_op(a, b, float(eps))
