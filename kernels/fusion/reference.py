"""The fusion head's full-resolution passes, eager PyTorch (the oracle and the CPU path).

`pack`: the 1/4-resolution flow estimate -> full-resolution flows (x4 in value, bilinear x4 upsampling),
both boundary frames warped with them (bbf_rt.model.fusion.warp), and the head's full-resolution input
(N, 16, H, W) = (x, warp0, warp1, frame0, frame1, a zero plane); `mix`: softmax over three logits, the
weighted sum of warp0, warp1 and x, plus an RGB residual. Exactly the ops the head ran before the kernels.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

PACKED = 16  # channels of the packed input: 15 used, one zero plane so NHWC rows are 32 bytes in bf16


def full_flows(flow_q: torch.Tensor) -> torch.Tensor:
    """(N, 4, h, w) flows in 1/4-resolution pixels -> (N, 4, 4h, 4w) in full-resolution pixels."""
    return F.interpolate(flow_q * 4.0, scale_factor=4, mode="bilinear", align_corners=False)


def warp(frame: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Backward warp: out[p] = frame[p + flow[p]], flow (N, 2, H, W) in pixels (x, y); bilinear, borders
    repeat; H, W >= 2.

    Sampled in fp32 whatever the inputs' dtype: bf16 sampling coordinates would be off by several
    pixels at 720p (8 mantissa bits over [-1, 1]). Returns frame's dtype. Written with symbolic sizes
    in mind (no Python-side float of H or W), so torch.export keeps H and W dynamic."""
    n, _, h, w = frame.shape
    fl = flow.float()
    xs = torch.arange(w, device=frame.device, dtype=torch.float32).view(1, 1, w)
    ys = torch.arange(h, device=frame.device, dtype=torch.float32).view(1, h, 1)
    gx = (xs + fl[:, 0]) * (2.0 / (w - 1)) - 1.0  # align_corners=True: pixel 0 -> -1, pixel w-1 -> +1
    gy = (ys + fl[:, 1]) * (2.0 / (h - 1)) - 1.0
    out = F.grid_sample(frame.float(), torch.stack((gx, gy), -1), mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.to(frame.dtype)


def pack(flow_q: torch.Tensor, x: torch.Tensor, frame0: torch.Tensor, frame1: torch.Tensor) -> torch.Tensor:
    """-> (N, 16, H, W) in x's dtype: x, warp(frame0, f[:, :2]), warp(frame1, f[:, 2:]), frame0, frame1, 0."""
    fl = full_flows(flow_q)
    w0, w1 = warp(frame0, fl[:, :2]), warp(frame1, fl[:, 2:])
    return torch.cat((x, w0, w1, frame0, frame1, torch.zeros_like(x[:, :1])), 1)


def mix(logits: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """(N, 6, H, W) head output (3 logits for warp0, warp1, x; an RGB residual) and the packed input ->
    a0 * warp0 + a1 * warp1 + ax * x + residual, (a0, a1, ax) = softmax in fp32; in packed's dtype."""
    x, w0, w1 = packed[:, 0:3], packed[:, 3:6], packed[:, 6:9]
    a = torch.softmax(logits[:, :3].float(), 1).to(x.dtype)
    return a[:, :1] * w0 + a[:, 1:2] * w1 + a[:, 2:3] * x + logits[:, 3:6]
