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


def residual_norm_modulate(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float,
    rms: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated residual and the next norm_modulate on its result: r = x + gate * y, then
    (r, norm(r) * (1 + scale) + shift).

    x, y: (B, L, C) frame-major; gate: (B, Fg, C) and shift, scale: (B, Fm, C), each per sample (F = 1)
    or per frame (F dividing L), independently. r is rounded to x's dtype before the norm reads it (as
    the two ops in sequence); both results are returned in x's dtype.
    """
    B, L, C = x.shape
    Fg = gate.shape[1]
    r = x.float().view(B, Fg, L // Fg, C) + gate.float()[:, :, None, :] * y.float().view(B, Fg, L // Fg, C)
    r = r.view(B, L, C).to(x.dtype)
    return r, norm_modulate(r, shift, scale, eps, rms)
