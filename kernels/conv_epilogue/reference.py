"""The VAE's convolution epilogues, eager PyTorch (the oracle and the CPU / export path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def conv_epilogue(y: torch.Tensor, bias: torch.Tensor | None, residual: torch.Tensor | None = None) -> torch.Tensor:
    """y + bias[c] (+ residual) over (N, C, H, W); fp32 math, returned in y's dtype (one rounding).

    y is a convolution's output without its bias; what torch computes for conv(x) with bias then
    `residual + conv(x)` up to the one rounding less."""
    out = y.float()
    if bias is not None:
        out = out + bias.float().view(1, -1, *([1] * (y.dim() - 2)))
    if residual is not None:
        out = out + residual.float()
    return out.to(y.dtype)


def upsample_nearest2x(x: torch.Tensor) -> torch.Tensor:
    """Nearest-neighbour 2x upsampling of (N, C, H, W): out[..., y, x] = in[..., y // 2, x // 2]."""
    return F.interpolate(x, scale_factor=2.0, mode="nearest")
