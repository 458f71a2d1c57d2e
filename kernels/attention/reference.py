"""Attention, eager PyTorch: the oracle for the Triton kernel and the path used on CPU and for ONNX."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v over keys.

    q: (B, Lq, H, D); k, v: (B, Lk, H, D) in one dtype; key_mask: (B, Lk) bool, True = attend.
    Returns (B, Lq, H, D) in q's dtype. A query whose keys are all masked gets a finite (uniform)
    average instead of NaN; callers zero such rows through their gate. Accumulation follows
    PyTorch's SDPA at the input precision (fp32 softmax inside the fused backends).
    """
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, L, D)
    mask = None
    if key_mask is not None:
        # finite large negative instead of -inf: fully masked rows stay finite (see docstring)
        neg = torch.finfo(q.dtype).min / 2
        mask = torch.zeros(key_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~key_mask, neg)
        mask = mask[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale)
    return out.transpose(1, 2)
