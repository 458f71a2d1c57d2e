"""Boundary fusion: the decoded in-between frame rebuilt from the boundary frames' own pixels.

A frame decoded from a 16-channel, stride-8 latent is blurred (the compact VAE reconstructs at 27-29 dB),
while the boundary frames hold the sharp pixels of almost everything the in-between frame shows. The
fusion head reads the decoded frame x and the two boundary frames, estimates where each pixel of x sits
in frame0 and in frame1 (two flows at 1/4 resolution, dilated convolutions for a wide view), warps both
boundary frames there, and mixes the two warps with x itself per pixel (softmax weights) plus a small
RGB residual:

    out = a0 * warp(frame0, f0) + a1 * warp(frame1, f1) + ax * x + r,   (a0, a1, ax) = softmax(logits)

Where the latent shows content neither boundary has (disocclusions, new light), the head can keep x.
The output layer starts at zero with the x logit biased up, so an untrained head returns x (to
within softmax(0, 0, 4) = 2% of each warp) and training starts from the plain decoder's quality.

Frames are (N, 3, H, W) in [-1, 1] with H, W multiples of 4; tau (N,) is each frame's time in (0, 1).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bbf_rt import ops
from bbf_rt.errors import BBFInputError
from bbf_rt.kernels.fusion.reference import full_flows, warp

__all__ = ["BoundaryFusion", "warp"]

_X_BIAS = 4.0  # initial logit of the decoded frame against 0 for each warp


def _conv(conv: nn.Conv2d, x: Tensor, residual: Tensor | None = None) -> Tensor:
    """conv(x) (+ residual) through bbf_rt.ops.conv2d: on CUDA the bias (and residual) in one Triton pass."""
    return ops.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, residual, conv.dilation)


class _DilatedBlock(nn.Module):
    """x + conv(lrelu(conv(x))), both 3x3 with the same dilation."""

    def __init__(self, width: int, dilation: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)
        self.conv2 = nn.Conv2d(width, width, 3, padding=dilation, dilation=dilation)

    def forward(self, x: Tensor) -> Tensor:
        return _conv(self.conv2, F.leaky_relu(_conv(self.conv1, x), 0.1), residual=x)


class BoundaryFusion(nn.Module):
    """Decoded frame + boundary frames + tau -> refined frame; see the module docstring.

    width: channels of the 1/4-resolution flow estimator; blocks: its dilated residual blocks (dilations
    1, 2, 4, 8, ...); fine: channels of the full-resolution mixing convolutions.
    """

    def __init__(self, width: int = 48, blocks: int = 4, fine: int = 16) -> None:
        super().__init__()
        self.coarse_in = nn.Conv2d(10, width, 3, padding=1)  # x, frame0, frame1 (pooled) and tau
        self.coarse = nn.ModuleList(_DilatedBlock(width, 2**i) for i in range(blocks))
        self.coarse_out = nn.Conv2d(width, 4, 3, padding=1)  # two flows in 1/4-resolution pixels
        self.fine_in = nn.Conv2d(15, fine, 3, padding=1)  # x, both warps, both boundary frames
        self.fine_mid = nn.Conv2d(fine, fine, 3, padding=1)
        self.fine_out = nn.Conv2d(fine, 6, 3, padding=1)  # logits (warp0, warp1, x) and an RGB residual
        for conv in (self.coarse_out, self.fine_out):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        with torch.no_grad():
            self.fine_out.bias[2] = _X_BIAS

    @staticmethod
    def check(x: Tensor, frame0: Tensor, frame1: Tensor, tau: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != 3:
            raise BBFInputError(f"fusion: decoded frames have shape {tuple(x.shape)}; allowed is (N, 3, H, W)")
        for name, t in (("frame0", frame0), ("frame1", frame1)):
            if tuple(t.shape) != tuple(x.shape):
                raise BBFInputError(f"fusion: {name} has shape {tuple(t.shape)}, the decoded frames {tuple(x.shape)}")
        if tuple(tau.shape) != (x.shape[0],):
            raise BBFInputError(f"fusion: tau has shape {tuple(tau.shape)}; allowed is ({x.shape[0]},), one time per frame")
        if x.shape[-1] % 4 or x.shape[-2] % 4:
            raise BBFInputError(f"fusion: frame size {tuple(x.shape[-2:])} must be a multiple of 4")

    def coarse_flows(self, x: Tensor, frame0: Tensor, frame1: Tensor, tau: Tensor) -> Tensor:
        """(N, 4, H/4, W/4) flows from x to frame0 (channels 0-1) and to frame1 (2-3), in 1/4-resolution pixels."""
        n, _, h, w = x.shape
        small = [F.avg_pool2d(t, 4) for t in (x, frame0, frame1)]  # pooled one by one: no full-size concat
        small.append(tau.to(x.dtype).view(n, 1, 1, 1).expand(n, 1, h // 4, w // 4))
        c = F.leaky_relu(_conv(self.coarse_in, torch.cat(small, 1)), 0.1)
        for block in self.coarse:
            c = block(c)
        return _conv(self.coarse_out, c)

    def flows(self, x: Tensor, frame0: Tensor, frame1: Tensor, tau: Tensor) -> Tensor:
        """(N, 4, H, W) full-resolution flows (x4 in value, bilinear x4 upsampling), in pixels."""
        return full_flows(self.coarse_flows(x, frame0, frame1, tau))

    def forward(self, x: Tensor, frame0: Tensor, frame1: Tensor, tau: Tensor) -> Tensor:
        self.check(x, frame0, frame1, tau)
        # (x, warp0, warp1, frame0, frame1, 0): on CUDA one Triton pass (kernels/fusion) from the coarse flows
        packed = ops.fusion_pack(self.coarse_flows(x, frame0, frame1, tau), x, frame0, frame1)
        w16 = F.pad(self.fine_in.weight, (0, 0, 0, 0, 0, 1))  # a zero weight for the zero plane
        if packed.is_contiguous(memory_format=torch.channels_last):
            w16 = w16.contiguous(memory_format=torch.channels_last)
        f = F.leaky_relu(ops.conv2d(packed, w16, self.fine_in.bias, 1, 1), 0.1)
        f = F.leaky_relu(_conv(self.fine_mid, f), 0.1)
        # softmax over (warp0, warp1, x) logits, the weighted sum and the RGB residual (one pass on CUDA)
        return ops.fusion_mix(_conv(self.fine_out, f), packed)
