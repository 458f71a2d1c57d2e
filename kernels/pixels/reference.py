"""Decoded frames -> display pixels, eager PyTorch (the oracle and the CPU path)."""
from __future__ import annotations

import torch


def to_uint8_nhwc(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) float frames in [-1, 1] -> (N, height, width, 3) uint8 of the top-left crop:
    round((clamp(x, -1, 1) + 1) * 127.5) in fp32, ties to even (what the engine did in five torch ops)."""
    y = ((x.float()[..., :height, :width].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()


def boundary_similarity(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-pixel cosine similarity over RGB of (B, 3, H, W) frame pairs, in fp32 -> (B,) fp32
    (the start-end difference the DiT embeds; 1 = the same colour direction at every pixel)."""
    a, b = a.float(), b.float()
    dot = (a * b).sum(1)
    na = a.pow(2).sum(1).sqrt()
    nb = b.pow(2).sum(1).sqrt()
    return (dot / (na * nb).clamp_min(eps)).mean(dim=(-2, -1))
