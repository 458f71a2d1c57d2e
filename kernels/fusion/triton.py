"""The fusion head's full-resolution passes, registered as `bbf_rt::fusion_pack` and `bbf_rt::fusion_mix`.

In torch the head's full-resolution work after its 1/4-resolution flow estimate was ~20 passes: the x4
bilinear upsampling of the flows, per warp an fp32 copy of the frame, four fp32 grid passes and
grid_sample, a 15-channel concat, then softmax over an fp32 copy of the logits and five elementwise ops.
- `_pack`: each program takes BX pixels of one row; it upsamples the four flow channels on the fly
  (align_corners=False, x4 in value, fp32), samples both boundary frames bilinearly at p + flow (borders
  repeat, fp32 coordinates and weights) and writes the head's channels-last input (x, warp0, warp1,
  frame0, frame1, 0) once. Bytes: read x and both frames (the 2x2 neighbourhoods from L1/L2), write 16
  channels.
- `_mix`: softmax of the three logits in fp32 and the weighted sum plus residual, one rounding. Bytes:
  read 6 logits and 9 packed channels, write 3.
Inputs of any strides; fp32 math throughout (the reference rounds its flows to the input dtype first).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from bbf_rt.kernels.triton_common import INTERPRET, register_op, rne_bf16

BX = 128
PACKED = 16


@triton.jit
def _pixels(H, W, BX: tl.constexpr):
    """This program's pixels: grid (cdiv(W, BX), N * H) -> (row = n * H + y, n (int64), y, the BX columns,
    their in-frame mask, channel lanes 0..3)."""
    row = tl.program_id(1)
    xs = tl.program_id(0) * BX + tl.arange(0, BX)
    return row, (row // H).to(tl.int64), row % H, xs, xs < W, tl.arange(0, 4)


@triton.jit
def _sample3(F, n, y0, y1, x0, x1, wy, wx, sn, sc, sh, sw, c, m):
    """Bilinear sample of channels c (BX, 4) at the corners (y0|y1, x0|x1) with weights wy, wx (BX,)."""
    base = F + n * sn + c[None, :] * sc
    v00 = tl.load(base + (y0 * sh + x0 * sw)[:, None], mask=m, other=0.0).to(tl.float32)
    v01 = tl.load(base + (y0 * sh + x1 * sw)[:, None], mask=m, other=0.0).to(tl.float32)
    v10 = tl.load(base + (y1 * sh + x0 * sw)[:, None], mask=m, other=0.0).to(tl.float32)
    v11 = tl.load(base + (y1 * sh + x1 * sw)[:, None], mask=m, other=0.0).to(tl.float32)
    wx2, wy2 = wx[:, None], wy[:, None]
    return (1.0 - wy2) * ((1.0 - wx2) * v00 + wx2 * v01) + wy2 * ((1.0 - wx2) * v10 + wx2 * v11)


@triton.jit
def _warp_coords(pos, flow, size):
    """Sampling position pos + flow clamped to [0, size - 1] -> (lower index, upper index, weight)."""
    p = tl.minimum(tl.maximum(pos + flow, 0.0), (size - 1).to(tl.float32))
    i0 = tl.floor(p)
    return i0.to(tl.int32), tl.minimum(i0.to(tl.int32) + 1, size - 1), p - i0


@triton.jit
def _pack(FQ, X, F0, F1, OUT, H, W, HQ, WQ, sqn, sqc, sqh, sqw, sxn, sxc, sxh, sxw,
          s0n, s0c, s0h, s0w, s1n, s1c, s1h, s1w, BX: tl.constexpr, RNE: tl.constexpr):
    row, n, y, xs, pm, c4 = _pixels(H, W, BX)
    m4 = pm[:, None] & (c4 < 4)[None, :]
    m3 = pm[:, None] & (c4 < 3)[None, :]
    # flows: bilinear x4 upsampling (align_corners=False: src = (dst + 0.5) / 4 - 0.5, floored at 0)
    sy = tl.maximum((y.to(tl.float32) + 0.5) * 0.25 - 0.5, 0.0)
    qy0 = tl.floor(sy).to(tl.int32)
    qy1 = tl.minimum(qy0 + 1, HQ - 1)
    ly = sy - qy0.to(tl.float32)
    sx = tl.maximum((xs.to(tl.float32) + 0.5) * 0.25 - 0.5, 0.0)
    qx0 = tl.floor(sx).to(tl.int32)
    qx1 = tl.minimum(qx0 + 1, WQ - 1)
    lx = sx - qx0.to(tl.float32)
    fl = _sample3(FQ, n, qy0, qy1, qx0, qx1, tl.zeros_like(lx) + ly, lx, sqn, sqc, sqh, sqw, c4, m4) * 4.0
    fx0 = tl.sum(tl.where(c4[None, :] == 0, fl, 0.0), 1)
    fy0 = tl.sum(tl.where(c4[None, :] == 1, fl, 0.0), 1)
    fx1 = tl.sum(tl.where(c4[None, :] == 2, fl, 0.0), 1)
    fy1 = tl.sum(tl.where(c4[None, :] == 3, fl, 0.0), 1)
    xf = xs.to(tl.float32)
    yf = tl.zeros_like(xf) + y.to(tl.float32)
    o = OUT + (row.to(tl.int64) * W + xs)[:, None] * 16 + c4[None, :]
    ax0, ax1, wx = _warp_coords(xf, fx0, W)
    ay0, ay1, wy = _warp_coords(yf, fy0, H)
    w0 = _sample3(F0, n, ay0, ay1, ax0, ax1, wy, wx, s0n, s0c, s0h, s0w, c4, m3)
    ax0, ax1, wx = _warp_coords(xf, fx1, W)
    ay0, ay1, wy = _warp_coords(yf, fy1, H)
    w1 = _sample3(F1, n, ay0, ay1, ax0, ax1, wy, wx, s1n, s1c, s1h, s1w, c4, m3)
    if RNE:
        w0, w1 = rne_bf16(w0), rne_bf16(w1)
    xv = tl.load(X + n * sxn + y * sxh + xs[:, None] * sxw + c4[None, :] * sxc, mask=m3, other=0.0)
    v0 = tl.load(F0 + n * s0n + y * s0h + xs[:, None] * s0w + c4[None, :] * s0c, mask=m3, other=0.0)
    v1 = tl.load(F1 + n * s1n + y * s1h + xs[:, None] * s1w + c4[None, :] * s1c, mask=m3, other=0.0)
    dt = OUT.dtype.element_ty
    tl.store(o, xv.to(dt), mask=m3)
    tl.store(o + 3, w0.to(dt), mask=m3)
    tl.store(o + 6, w1.to(dt), mask=m3)
    tl.store(o + 9, v0.to(dt), mask=m3)
    tl.store(o + 12, v1.to(dt), mask=m3)
    tl.store(o + 15, tl.zeros_like(w0).to(dt), mask=pm[:, None] & (c4 < 1)[None, :])


@triton.jit
def _mix(LG, P, OUT, H, W, sln, slc, slh, slw, son, soc, soh, sow, BX: tl.constexpr, RNE: tl.constexpr):
    row, n, y, xs, pm, c4 = _pixels(H, W, BX)
    m3 = pm[:, None] & (c4 < 3)[None, :]
    lg = LG + n * sln + y * slh + xs[:, None] * slw
    logit = tl.load(lg + c4[None, :] * slc, mask=m3, other=0.0).to(tl.float32)
    logit = tl.where((c4 < 3)[None, :], logit, float("-inf"))  # rows past W stay finite (no NaN)
    res = tl.load(lg + (c4[None, :] + 3) * slc, mask=m3, other=0.0).to(tl.float32)
    e = tl.exp(logit - tl.max(logit, 1)[:, None])  # the masked 4th column is exp(-inf) = 0
    a = e / tl.sum(e, 1)[:, None]
    a0 = tl.sum(tl.where(c4[None, :] == 0, a, 0.0), 1)[:, None]
    a1 = tl.sum(tl.where(c4[None, :] == 1, a, 0.0), 1)[:, None]
    ax = tl.sum(tl.where(c4[None, :] == 2, a, 0.0), 1)[:, None]
    p = P + (row.to(tl.int64) * W + xs)[:, None] * 16 + c4[None, :]
    xv = tl.load(p, mask=m3, other=0.0).to(tl.float32)
    w0 = tl.load(p + 3, mask=m3, other=0.0).to(tl.float32)
    w1 = tl.load(p + 6, mask=m3, other=0.0).to(tl.float32)
    out = a0 * w0 + a1 * w1 + ax * xv + res
    if RNE:
        out = rne_bf16(out)
    tl.store(OUT + n * son + y * soh + xs[:, None] * sow + c4[None, :] * soc, out.to(OUT.dtype.element_ty), mask=m3)


def _pack_impl(flow_q: torch.Tensor, x: torch.Tensor, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    N, _, H, W = x.shape
    out = torch.empty((N, PACKED, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    wrap_triton(_pack)[(triton.cdiv(W, BX), N * H)](
        flow_q, x, frame0, frame1, out, H, W, flow_q.shape[2], flow_q.shape[3], *flow_q.stride(), *x.stride(),
        *frame0.stride(), *frame1.stride(), BX=BX, RNE=INTERPRET and x.dtype == torch.bfloat16, num_warps=4)
    return out


def _pack_fake(flow_q, x, frame0, frame1):
    N, _, H, W = x.shape
    return x.new_empty((N, PACKED, H, W)).contiguous(memory_format=torch.channels_last)


def _mix_impl(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    N, _, H, W = packed.shape
    out = torch.empty((N, 3, H, W), dtype=packed.dtype, device=packed.device, memory_format=torch.channels_last)
    if out.numel() == 0:
        return out
    wrap_triton(_mix)[(triton.cdiv(W, BX), N * H)](
        logits, packed, out, H, W, *logits.stride(), *out.stride(), BX=BX,
        RNE=INTERPRET and packed.dtype == torch.bfloat16, num_warps=4)
    return out


def _mix_fake(logits, packed):
    N, _, H, W = packed.shape
    return packed.new_empty((N, 3, H, W)).contiguous(memory_format=torch.channels_last)


_pack_op = register_op("fusion_pack", _pack_impl, _pack_fake)
_mix_op = register_op("fusion_mix", _mix_impl, _mix_fake)


def _check_frames(x: torch.Tensor, frame0: torch.Tensor, frame1: torch.Tensor) -> None:
    if x.dim() != 4 or x.shape[1] != 3 or min(x.shape[2:]) < 2:
        raise ValueError(f"fusion_pack: x {tuple(x.shape)} must be (N, 3, H, W) with H, W >= 2")
    for name, t in (("frame0", frame0), ("frame1", frame1)):
        if t.shape != x.shape or t.dtype != x.dtype:
            raise ValueError(f"fusion_pack: {name} {tuple(t.shape)} {t.dtype} must match x {tuple(x.shape)} {x.dtype}")


def pack(flow_q: torch.Tensor, x: torch.Tensor, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    """As kernels/fusion/reference.py pack: (N, 4, H/4, W/4) flows, three (N, 3, H, W) frames ->
    (N, 16, H, W) channels-last in x's dtype."""
    _check_frames(x, frame0, frame1)
    N, _, H, W = x.shape
    if flow_q.dim() != 4 or tuple(flow_q.shape) != (N, 4, H // 4, W // 4) or H % 4 or W % 4:
        raise ValueError(f"fusion_pack: flow_q {tuple(flow_q.shape)} must be ({N}, 4, {H // 4}, {W // 4}) "
                         f"for frames of {H}x{W} (multiples of 4)")
    return _pack_op(flow_q, x, frame0, frame1)


def mix(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """As kernels/fusion/reference.py mix: (N, 6, H, W) logits + residual, (N, 16, H, W) packed input from
    `pack` (channels-last) -> (N, 3, H, W) channels-last."""
    if packed.dim() != 4 or packed.shape[1] != PACKED or not packed.is_contiguous(memory_format=torch.channels_last):
        raise ValueError(f"fusion_mix: packed {tuple(packed.shape)} must be (N, 16, H, W) channels-last (from pack)")
    N, _, H, W = packed.shape
    if tuple(logits.shape) != (N, 6, H, W):
        raise ValueError(f"fusion_mix: logits {tuple(logits.shape)} must be ({N}, 6, {H}, {W})")
    return _mix_op(logits, packed)
