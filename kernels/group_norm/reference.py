"""GroupNorm + SiLU, eager PyTorch (the oracle and the CPU / export path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def group_norm_silu(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, groups: int,
                    eps: float, silu: bool = True) -> torch.Tensor:
    """silu(group_norm(x)) (or group_norm(x) with silu=False); x (N, C, *spatial), weight/bias (C,).

    Exactly what the VAE ran before the fused op: torch's GroupNorm (fp32 statistics inside, output
    rounded to x's dtype), then SiLU in x's dtype."""
    y = F.group_norm(x, groups, weight, bias, eps)
    return F.silu(y) if silu else y
