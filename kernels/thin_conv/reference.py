"""3x3 convolution (stride 1, padding 1), eager PyTorch (the oracle and the CPU / export path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def thin_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.conv2d(x, weight, bias, stride=1, padding=1); x (N, Cin, H, W), weight (Cout, Cin, 3, 3)."""
    return F.conv2d(x, weight, bias, 1, 1)
