"""QK RMSNorm fused with rotary position embedding, eager PyTorch (the oracle)."""
from __future__ import annotations

import torch


def rms_norm_rope(
    x: torch.Tensor, weight: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, eps: float,
) -> torch.Tensor:
    """RMSNorm over the full width, then RoPE on each head's interleaved channel pairs.

    x: (B, L, H*D); weight: (H*D,); cos, sin: (B or 1, L, D/2) fp32 angles' cos/sin.
    Returns (B, L, H, D) in x's dtype. The norm and the rotation are computed in fp32.
    """
    B, L, C = x.shape
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
    xf = xf.view(B, L, heads, C // heads // 2, 2)
    x0, x1 = xf[..., 0], xf[..., 1]  # (B, L, H, D/2)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    return out.view(B, L, heads, C // heads).to(x.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim in fp32, cast back to x's dtype. x: (..., C); weight: (C,)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
