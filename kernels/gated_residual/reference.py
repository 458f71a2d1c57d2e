"""Gated residual x + gate * y, eager PyTorch (the oracle)."""
from __future__ import annotations

import torch


def gated_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x + gate * y with a gate per sample and frame.

    x, y: (B, L, C), frame-major with L = F * S; gate: (B, F, C) (F = 1: per sample).
    Computed in fp32, returned in x's dtype (the residual stream's precision).
    """
    B, L, C = x.shape
    F = gate.shape[1]
    out = x.float().view(B, F, L // F, C) + gate.float()[:, :, None, :] * y.float().view(B, F, L // F, C)
    return out.view(B, L, C).to(x.dtype)
