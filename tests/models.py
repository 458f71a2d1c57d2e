"""Model helpers shared by the tests (tests/ is on sys.path, as for media.py)."""
from __future__ import annotations

import torch


@torch.no_grad()
def trained_gates(dit: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Give every condition branch a non-zero gate, as training would; a fresh model's gates are zero,
    which would hide every condition (and every difference a test wants to see). Returns `dit`."""
    g = torch.Generator().manual_seed(seed)
    for blk in dit.blocks:
        for br in blk.branches.values():
            br.gate.copy_(torch.randn(br.gate.shape, generator=g))
    return dit


def within_2x(out: torch.Tensor, low: torch.Tensor, oracle: torch.Tensor, what: str = "kernel") -> tuple[float, float]:
    """The project's accuracy rule (the flash-attention rule): max |out - oracle| <= 2 x max |low - oracle|,
    where `low` is plain PyTorch at out's precision and `oracle` fp32, plus a floor of 1e-5 x the oracle's
    scale. Returns (out's error, low's error)."""
    assert out.shape == oracle.shape and out.dtype == low.dtype
    assert torch.isfinite(out).all(), f"{what} output has NaN/Inf (unwritten or overflowed elements)"
    err = (out.float() - oracle.float()).abs().max().item()
    base = (low.float() - oracle.float()).abs().max().item()
    floor = 1e-5 * max(1.0, oracle.abs().max().item())
    assert err <= 2 * base + floor, f"{what} error {err:.3g} > 2 x PyTorch error {base:.3g} + {floor:.1g}"
    return err, base
