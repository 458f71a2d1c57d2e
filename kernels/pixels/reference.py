"""Decoded frames -> display pixels, eager PyTorch (the oracle and the CPU path)."""
from __future__ import annotations

import torch


def to_uint8_nhwc(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, 3, H, W) float frames in [-1, 1] -> (N, height, width, 3) uint8 of the top-left crop:
    round((clamp(x, -1, 1) + 1) * 127.5) in fp32, ties to even (what the engine did in five torch ops)."""
    y = ((x.float()[..., :height, :width].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous()
