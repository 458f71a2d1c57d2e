"""LayerNorm / RMSNorm + adaLN modulation, eager PyTorch (the oracle)."""
from __future__ import annotations

import torch


def norm_modulate_fp32(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False,
) -> torch.Tensor:
    """norm_modulate's result before the cast back: (B, L, C) fp32 (what the fused FP8 quantiser reads)."""
    B, L, C = x.shape
    F = shift.shape[1]
    xf = x.float().view(B, F, L // F, C)
    if rms:
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    else:
        mu = xf.mean(-1, keepdim=True)
        var = (xf - mu).pow(2).mean(-1, keepdim=True)
        y = (xf - mu) * torch.rsqrt(var + eps)
    y = y * (1 + scale.float()[:, :, None, :]) + shift.float()[:, :, None, :]
    return y.view(B, L, C)


def norm_modulate(
    x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float, rms: bool = False,
) -> torch.Tensor:
    """norm(x) * (1 + scale) + shift with a scale and shift per sample and frame.

    x: (B, L, C) tokens, frame-major, L = F * S; shift, scale: (B, F, C) (F = 1: per sample).
    The norm has no affine weights (adaLN supplies them). Statistics in fp32; returns x's dtype.
    """
    return norm_modulate_fp32(x, shift, scale, eps, rms).to(x.dtype)
