"""Embeddings of the BBF DiT: sinusoidal features, 3D RoPE tables, the start-end difference scalar."""
from __future__ import annotations

import math

import torch
from torch import nn

from bbf_rt import ops


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of a float tensor: (...,) -> (..., dim) fp32 (cos half, then sin half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def boundary_similarity(frame0: torch.Tensor, frame1: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Mean per-pixel cosine similarity of two frames over RGB (EDEN's start-end difference).

    frame0, frame1: (B, 3, H, W) in [0, 1] (any float dtype). Returns (B,) fp32; 1 = identical
    directions at every pixel, lower = larger change. Computed in fp32 (ops.boundary_similarity).
    """
    return ops.boundary_similarity(frame0, frame1, eps)


def normalised_difference(similarity: torch.Tensor, mu: float, sigma: float) -> torch.Tensor:
    """d = (s - mu) / sigma: the scalar the difference embedding Linear(1, dim) consumes. (B,) -> (B,)."""
    return (similarity - mu) / sigma


class TimeMLP(nn.Module):
    """sinusoidal(value * 1000) -> Linear -> SiLU -> Linear: embeds flow time or frame timestamps."""

    def __init__(self, freq_dim: int, dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.fc1 = nn.Linear(freq_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, value: torch.Tensor) -> torch.Tensor:  # (...,) -> (..., dim)
        h = sinusoidal(value * 1000.0, self.freq_dim).to(self.fc1.weight.dtype)
        return self.fc2(torch.nn.functional.silu(self.fc1(h)))


class Rope3D(nn.Module):
    """3D rotary embedding over (time, row, col); the head dim is split per `ModelConfig.rope_split`.

    Angles are computed in fp32 from positions in forward, since frame times are continuous (any
    rational timestamp), not a fixed integer grid. The inverse frequencies are made in forward too
    (a few hundred floats; constant-folded by export) so that casting the model to bf16 cannot
    round them, which a float buffer would suffer.
    """

    def __init__(self, split: tuple[int, int, int], theta: float, time_scale: float) -> None:
        super().__init__()
        self.split, self.theta, self.time_scale = split, theta, time_scale

    def _inv_freq(self, i: int, device: torch.device) -> torch.Tensor:
        d = self.split[i]
        return 1.0 / (self.theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d))

    def forward(self, times: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor]:
        """times: (B, F) timestamps of frames; every frame has a rows x cols grid of tokens.

        Returns cos, sin: (B, F*rows*cols, D/2) fp32, tokens frame-major then row-major.
        """
        B, F = times.shape
        dev = times.device
        t = (times.float() * self.time_scale)[:, :, None, None, None] * self._inv_freq(0, dev)  # (B,F,1,1,dt/2)
        r = torch.arange(rows, device=dev, dtype=torch.float32)[:, None, None] * self._inv_freq(1, dev)  # (R,1,dh/2)
        c = torch.arange(cols, device=dev, dtype=torch.float32)[None, :, None] * self._inv_freq(2, dev)  # (1,C,dw/2)
        ang = torch.cat(
            [
                t.expand(B, F, rows, cols, t.shape[-1]),
                r[None, None].expand(B, F, rows, cols, r.shape[-1]),
                c[None, None].expand(B, F, rows, cols, c.shape[-1]),
            ],
            dim=-1,
        ).reshape(B, F * rows * cols, -1)
        return torch.cos(ang), torch.sin(ang)
