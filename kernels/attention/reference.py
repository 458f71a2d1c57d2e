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
    if key_mask is None:
        return F.scaled_dot_product_attention(qt, kt, vt, scale=scale).transpose(1, 2)
    # a boolean mask, never a huge additive bias: bf16 autocast on CUDA turned a finite -1.7e38 bias into
    # NaN for fully masked rows. Those rows attend to every key here and are replaced by V's mean below.
    empty = ~key_mask.any(-1)  # (B,)
    mask = (key_mask | empty[:, None])[:, None, None, :]  # (B, 1, 1, Lk)
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale).transpose(1, 2)
    uniform = v.mean(dim=1, keepdim=True).to(out.dtype)  # (B, 1, H, D)
    return torch.where(empty[:, None, None, None], uniform, out)
